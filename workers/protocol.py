"""The worker side of the protocol with main: the result channel, heartbeats, signals, the inbox.

The messages themselves are the dataclasses of :mod:`pipeline.messages`.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from typing import Any

from pipeline.messages import EndpointsUp, Heartbeat

POLL_S = 0.5


class ResultChannel:
    """The worker's end of its result pipe: ``put(msg)`` sends one whole message, thread-safe.

    ``multiprocessing.connection.Connection.send`` is not safe from several threads at once (a RAG worker's LLM
    threads and a generation process's threads all report results), so sends are serialised by a lock.
    If main is gone (broken pipe) the process exits at once: nobody will read its results.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def put(self, msg: tuple) -> None:
        with self._lock:
            try:
                self.conn.send(msg)
            except (BrokenPipeError, EOFError, OSError):
                os._exit(0)


def start_heartbeat(chan: ResultChannel, name: str, interval_s: float, parent_pid: int) -> threading.Thread:
    """Send a :class:`pipeline.messages.Heartbeat` every ``interval_s`` seconds from a daemon thread; exit if main died.

    A worker that is alive but stopped (SIGSTOP) or frozen with the GIL held sends no heartbeat: main declares
    it hung after ``run.heartbeat_timeout_s`` and replaces it.
    """

    def beat() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            chan.put(Heartbeat(name))
            time.sleep(interval_s)

    t = threading.Thread(target=beat, name=f"{name}-heartbeat", daemon=True)
    t.start()
    return t


def ignore_sigint() -> None:
    """Workers leave Ctrl-C, SIGTERM and SIGUSR1 to the parent, which coordinates shutdown (distilabel style).

    Ctrl-C reaches the whole foreground process group, and Slurm signals every process of a job on requeue or
    preemption: a worker that died on it would lose its in-flight records instead of finishing them in the grace
    period. The parent stops workers with the sentinel, then SIGKILL.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def get_work(inbox: Any, parent_pid: int, client: Any = None) -> list | None:
    """Block until work (a ``list[WorkItem]``) or the sentinel (None) arrives.

    An :class:`pipeline.messages.EndpointsUp` on the way is handed to ``client`` (the worker's
    :class:`pipeline.llm.client.LLMClient`, or None when the worker makes no LLM request) and the wait goes on.
    If the parent process died (kill -9 of main), exit the worker at once: nobody will read its results,
    and an orphan would keep its device and memory. The records it held are redone by the resumed run.
    """
    while True:
        try:
            msg = inbox.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent_pid:
                os._exit(0)
            continue
        if isinstance(msg, EndpointsUp):
            if client is not None:
                client.endpoints_up(msg.urls)
            continue
        return msg
