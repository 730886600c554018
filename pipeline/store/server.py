"""``rag-pipeline serve-store``: a Chroma server (``chroma run``) for multi-node runs, in the foreground.

It is started and stopped with the helpers of the LLM servers (:mod:`pipeline.servers.process`: the same port
check naming the process that holds the port, its own session / process group, ``PR_SET_PDEATHSIG`` so that a
kill -9 of ``serve-store`` does not leave Chroma running, SIGTERM then SIGKILL of the whole group), and readiness
is a 200 from Chroma's ``/api/v2/heartbeat`` polled while checking that the child is alive
(:func:`pipeline.servers.process.wait_http_ready`).
"""

from __future__ import annotations

import logging
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from pipeline.errors import StoreError
from pipeline.servers.process import (
    POLL_INTERVAL_S,
    check_port_free,
    die_with_parent,
    stop_processes,
    wait_http_ready,
)

log = logging.getLogger(__name__)


def chroma_executable() -> Path:
    """The ``chroma`` console script installed next to the current Python.

    Raises:
        StoreError: it does not exist (chromadb not installed in this environment).
    """
    exe = Path(sys.executable).parent / "chroma"
    if not exe.exists():
        raise StoreError(f"{exe} not found: chromadb is not installed in this Python environment")
    return exe


def heartbeat_url(host: str, port: int) -> str:
    """The Chroma (1.x) heartbeat endpoint of a server bound to ``host:port`` (wildcard hosts -> 127.0.0.1)."""
    connect = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in connect and not connect.startswith("["):
        connect = f"[{connect}]"
    return f"http://{connect}:{port}/api/v2/heartbeat"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the kernel's choice; another process could take it before use)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class StoreServer:
    """A Chroma server over a local store directory, started by this process and stopped with it.

    Used by ``run`` for ``store.shared`` (one copy of the index per node, :mod:`pipeline.store.mode`). The
    server runs in its own session / process group with ``PR_SET_PDEATHSIG`` (a kill -9 of the parent takes it
    down), its output goes to ``log_path``, and :meth:`stop` sends SIGTERM then SIGKILL to the group.

    Args:
        path: the store directory (the one a ``PersistentClient`` would open).
        host: interface to bind (``127.0.0.1``: the RAG workers of this node only).
        port: TCP port; 0 = a free port chosen now.
        log_path: file receiving the server's stdout and stderr (None: inherited).
        shutdown_timeout_s: seconds between SIGTERM and SIGKILL in :meth:`stop`.
    """

    def __init__(self, path: str | Path, host: str = "127.0.0.1", port: int = 0, *,
                 log_path: str | Path | None = None, shutdown_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.shutdown_timeout_s = shutdown_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` for ``store.chroma_url``."""
        return f"http://{self.host}:{self.port}"

    def start(self, ready_timeout_s: float = 60.0, abort: Callable[[], bool] | None = None) -> str:
        """Start ``chroma run`` and wait until its heartbeat answers; returns :attr:`url`.

        Raises:
            StoreError: ``chroma`` missing, the port in use (message names its owner), the server exited or
                did not answer within ``ready_timeout_s`` (the server is stopped first).
        """
        exe = chroma_executable()
        check_port_free(self.host, self.port, "store port", hint="choose another port", error=StoreError)
        cmd = [str(exe), "run", "--path", str(self.path), "--host", self.host, "--port", str(self.port)]
        log.info("starting the node's Chroma server: %s", shlex.join(cmd))
        out = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "ab")  # noqa: SIM115 - kept open by the child only
        try:
            self.proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent,  # noqa: PLW1509
                                         stdout=out, stderr=subprocess.STDOUT if out else None,
                                         stdin=subprocess.DEVNULL)
        finally:
            if out is not None:
                out.close()
        stop: list[float] = []
        try:
            _wait_ready(self.proc, heartbeat_url(self.host, self.port), ready_timeout_s, stop, abort)
        except BaseException:
            self.stop()
            raise
        return self.url

    def alive(self) -> bool:
        """True while the server process runs."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL after ``shutdown_timeout_s`` (idempotent)."""
        if self.proc is not None and self.proc.poll() is None:
            stop_processes([self.proc], self.shutdown_timeout_s)


def serve_store(
    path: str | Path,
    host: str,
    port: int,
    *,
    on_ready: Callable[[str], None] | None = None,
    ready_timeout_s: float = 60.0,
    shutdown_timeout_s: float = 10.0,
) -> int:
    """Run ``chroma run --path PATH --host HOST --port PORT`` in the foreground until it exits.

    SIGINT, SIGTERM, SIGHUP and SIGUSR1 received by this process stop the server (SIGTERM to its process
    group, SIGKILL after ``shutdown_timeout_s``).

    Args:
        path: persistence directory (created if missing).
        host: interface to bind (``0.0.0.0`` for other nodes to connect).
        port: TCP port.
        on_ready: called once with the server URL (``http://host:port``) when it answers.
        ready_timeout_s: longest wait for the first heartbeat, seconds.
        shutdown_timeout_s: seconds between SIGTERM and SIGKILL.

    Returns:
        0 if the server stopped because of a signal to this process, else the server's exit status.

    Raises:
        StoreError: ``chroma`` missing, the port already in use, the server exited or did not answer
            before ``ready_timeout_s``.
    """
    exe = chroma_executable()
    if not 0 < port < 65536:
        raise StoreError(f"--port {port}: expected 1-65535")
    check_port_free(host or "0.0.0.0", port, "store port", hint="choose another --port", error=StoreError)
    Path(path).mkdir(parents=True, exist_ok=True)
    cmd = [str(exe), "run", "--path", str(path), "--host", host, "--port", str(port)]
    log.info("starting: %s", shlex.join(cmd))
    stop_requested: list[float] = []
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent)  # noqa: PLW1509

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping chroma (pid %d)", signal.Signals(signum).name, proc.pid)
        stop_requested.append(time.monotonic())

    sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1]
    previous = {s: signal.signal(s, on_signal) for s in sigs}
    try:
        public = socket.getfqdn() if host in ("0.0.0.0", "", "::") else host
        _wait_ready(proc, heartbeat_url(host, port), ready_timeout_s, stop_requested)
        if proc.poll() is None and not stop_requested and on_ready is not None:
            on_ready(f"http://{public}:{port}")
        while proc.poll() is None and not stop_requested:
            time.sleep(POLL_INTERVAL_S)
        if stop_requested:
            stop_processes([proc], shutdown_timeout_s)
            return 0
        return proc.returncode
    finally:
        if proc.poll() is None:
            stop_processes([proc], shutdown_timeout_s)
        for s, h in previous.items():
            signal.signal(s, h)


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float, stop_requested: list[float],
                abort: Callable[[], bool] | None = None) -> None:
    """Poll Chroma's heartbeat until it answers 200; return early once a stop was requested or ``abort()``.

    Raises:
        StoreError: the server exited, or did not answer within ``timeout_s`` seconds.
    """

    def stop() -> bool:
        return bool(stop_requested) or (abort is not None and abort())

    def exited(rc: int) -> StoreError:
        return StoreError(f"chroma exited with status {rc} before it was ready (see its output above)")

    def timed_out() -> StoreError:
        return StoreError(f"chroma did not answer {url} within {timeout_s:.0f} s")

    wait_http_ready(proc, url, time.monotonic() + timeout_s, statuses=(200,), request_timeout_s=2.0, stop=stop,
                    exit_error=exited, timeout_error=timed_out)


__all__ = ["StoreServer", "chroma_executable", "free_port", "heartbeat_url", "serve_store"]
