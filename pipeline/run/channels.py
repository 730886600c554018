"""Isolated result channels: one pipe per worker, read by one thread each in the main process.

Why not one shared ``multiprocessing.Queue``: its writers share one pipe and one lock. A worker killed (OOM
killer, segfault in native code, kill -9) while its queue feeder thread holds that lock or is half-way through
writing a message leaves the lock held or a torn message in the shared pipe, and every other worker's results
are blocked or corrupted behind it.

Here each worker owns the write end of its own ``multiprocessing.Pipe(duplex=False)``; main closes its copy of
that end after the worker started, so the worker's death is seen as end-of-file on the read end. One daemon
thread per channel does the blocking ``recv()`` and moves whole messages into one in-process
``queue.Queue`` that the scheduler reads. Consequences:

- a torn message (the writer died mid-send) ends *that* channel with ``EOFError``; nothing else is affected;
- a writer stopped mid-send (SIGSTOP) blocks only its own reader thread until main kills the worker (then EOF);
- a worker's log lines (:class:`pipeline.messages.LogLine`) are logged by the reader thread itself, so they
  reach the run's stderr even while the main loop is busy;
- every message received counts as a sign of life: :attr:`ChannelReader.last_seen` (monotonic seconds) is the
  heartbeat clock of the worker (``workers.protocol.start_heartbeat`` sends a beat every few seconds).

Messages arrive on the merged queue as ``(tag, message)``; when a channel ends, ``(tag, None)`` is put once.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any

from pipeline.logs import emit_forwarded
from pipeline.messages import Heartbeat, LogLine

log = logging.getLogger(__name__)



class ChannelReader:
    """The read side of one worker's result pipe, drained by a daemon thread into a shared queue.

    Args:
        conn: the read end (``multiprocessing.connection.Connection``) of ``Pipe(duplex=False)``.
        tag: any object put beside each message (the scheduler passes its worker record).
        merged: the in-process ``queue.Queue`` receiving ``(tag, message)`` and ``(tag, None)`` at the end.

    Attributes:
        last_seen: ``time.monotonic()`` of the last message (heartbeats included), or of the start.
        closed: set once the channel reached end-of-file, a torn message or was closed by main.
    """

    def __init__(self, conn: Any, tag: Any, merged: queue.Queue) -> None:
        self.conn = conn
        self.tag = tag
        self.merged = merged
        self.last_seen = time.monotonic()
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"channel-{getattr(tag, 'name', tag)}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    return  # the writer exited or died (a half-written message ends here too)
                except Exception as exc:  # noqa: BLE001 - a corrupt message ends this channel only
                    log.error("result channel of %s: unreadable message (%s): channel closed",
                              getattr(self.tag, "name", self.tag), exc)
                    return
                self.last_seen = time.monotonic()
                if isinstance(msg, Heartbeat):  # a sign of life only: not forwarded
                    continue
                if isinstance(msg, LogLine):  # the worker's log line: to main's log now, not to the scheduler
                    try:
                        emit_forwarded(msg)
                    except Exception:  # noqa: BLE001 - a bad log line must not end the channel
                        log.debug("unprintable log line from %s", getattr(self.tag, "name", self.tag))
                    continue
                self.merged.put((self.tag, msg))
        finally:
            self.closed.set()
            with contextlib.suppress(OSError):
                self.conn.close()
            self.merged.put((self.tag, None))

    def join(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the reader thread to end."""
        self._thread.join(timeout_s)


def open_channel(ctx: Any) -> tuple[Any, Any]:
    """``(read_end, write_end)`` of a one-way pipe from ``ctx`` (a spawn context); the write end goes to the child."""
    return ctx.Pipe(duplex=False)


__all__ = ["ChannelReader", "open_channel"]
