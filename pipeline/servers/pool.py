"""The managed LLM server pool: start the planned servers, wait until ready, watch, restart, stop.

:class:`ServerPool` runs the specs of :func:`pipeline.servers.plan.plan_servers`: it picks free ports (skipping
taken ones), starts the servers (each in its own session / process group, one log file each), reports them
ready as they answer their health path (degrading startup: a server that keeps failing is given up, the others
go on), restarts crashed ones and stops them (SIGTERM to each process group, SIGKILL after
``servers.shutdown_timeout_s``). It is a context manager and registers :meth:`ServerPool.stop` with
:mod:`atexit`, so exceptions and Ctrl-C clean up. SIGTERM to the *parent* only cleans up if the caller turns it
into an exception (``serve`` does).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import ConfigError, Interrupted, ServerError
from pipeline.servers.base import ServerSpec
from pipeline.servers.plan import plan_servers
from pipeline.servers.process import (
    POLL_INTERVAL_S,
    describe_exit,
    die_with_parent,
    http_ready,
    local_session,
    log_tail,
    port_in_use,
    port_owner,
    stop_processes,
    wait_http_ready,
    wait_port_free,
)

log = logging.getLogger(__name__)

PORT_SEARCH_SPAN = 200
"""Ports tried per server, from its nominal port up, before giving up."""
LOADING_NOTE_S = 60.0
"""A starting server that is not ready yet is logged (INFO, with its log's last line) this often, so a run
waiting through a long model load (``servers.startup_timeout_s``) never looks hung."""


@dataclass
class ServerState:
    """What happened to one managed server (``ServerPool.report`` puts it in the run manifest).

    Attributes:
        status: ``"planned"``, ``"starting"``, ``"ready"``, ``"restarting"`` (a server that was ready, being
            restarted by :meth:`ServerPool.restart`) or ``"failed"`` (gave up after ``servers.startup_attempts``
            starts; the run goes on without it).
        attempts: starts so far (restarts after a crash included).
        started_at: ``time.monotonic()`` of the current attempt's launch.
        ready_after_s: seconds from the first launch to ready, None until ready.
        error: why the last attempt failed (one line), None if none failed.
        skipped_ports: nominal ports that were taken by another process (HTTP and NCCL).
    """

    status: str = "planned"
    attempts: int = 0
    started_at: float = 0.0
    first_started_at: float = 0.0
    ready_after_s: float | None = None
    error: str | None = None
    skipped_ports: list[int] = dataclasses.field(default_factory=list)
    noted_at: float = 0.0  # monotonic time of the last "still loading" line


class ServerPool:
    """Managed LLM servers: start, wait until ready, watch, restart, stop. A context manager.

    Startup degrades instead of failing: :meth:`launch` starts every server at once (each on free ports),
    :meth:`poll_startup` (non-blocking) reports the servers that became ready, and retries a server that
    exited or did not answer within ``servers.startup_timeout_s`` up to ``servers.startup_attempts`` starts
    in all; after that it is ``"failed"`` and the others go on. :meth:`wait_ready` blocks until the first
    (``first_only``) or every server is settled; it raises only when no server is ready at all.
    :meth:`start` = launch + wait for every server (``serve``); ``run`` starts as soon as one is ready.

    Args:
        cfg: the configuration (``servers`` section: backend, ports, timeouts, model).
        log_dir: directory for one log file per server; default ``servers.log_dir``, else a new
            temporary directory.
        specs: run these instead of :func:`plan_servers` (used by tests for processes llama.cpp cannot
            imitate, e.g. one that ignores SIGTERM).

    Attributes:
        backend: ``"sglang"`` or ``"llamacpp"``.
        specs: the planned servers (ports final once launched).
        state: ``{index: ServerState}``.
        log_dir: where the logs go.

    Raises:
        ConfigError, ServerError: from :func:`plan_servers`.

    Example::

        with ServerPool(cfg, "out/.rag-pipeline/logs") as pool:
            client = LLMClient(pool.ready_endpoints, cfg.llm)
    """

    def __init__(
        self, cfg: Config, log_dir: str | Path | None = None, *, specs: list[ServerSpec] | None = None
    ) -> None:
        self.cfg = cfg
        self.log_dir = Path(
            log_dir or cfg.servers.log_dir or tempfile.mkdtemp(prefix="rag-pipeline-servers-")
        )
        self.specs = list(specs) if specs is not None else plan_servers(cfg, self.log_dir)
        if not self.specs:
            raise ConfigError("no server to start")
        self.backend = self.specs[0].backend
        self.state = {s.index: ServerState() for s in self.specs}
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self._closed = False  # set by stop(): a restart in progress must not start a server after it
        self._atexit = False
        self._launched = False

    # -- properties ------------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        """Base URLs (``http://127.0.0.1:11434``, ...) of every planned server, in port order."""
        return [s.url for s in self.specs]

    @property
    def ready_endpoints(self) -> list[str]:
        """Base URLs of the servers that became ready (a later crash not counted), in port order."""
        return [s.url for s in self.specs if self.state[s.index].status == "ready"]

    @property
    def pids(self) -> list[int]:
        """PIDs (= process group ids) of the running server processes, in port order."""
        with self._lock:
            return [self._procs[s.port].pid for s in self.specs if s.port in self._procs]

    def running(self) -> list[tuple[int, int]]:
        """``(pid, port)`` of each running server process, in port order (the PID is its process group id)."""
        with self._lock:
            return [(self._procs[s.port].pid, s.port) for s in self.specs if s.port in self._procs]

    def _spec(self, port: int) -> ServerSpec:
        for s in self.specs:
            if s.port == port:
                return s
        raise ServerError(f"no managed server on port {port} (ports: {[s.port for s in self.specs]})")

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Start every server and wait until each is ready or has failed every attempt.

        Returns:
            The endpoints of the ready servers, in port order (fewer than planned when some failed:
            logged, and in :meth:`report`).

        Raises:
            ServerError: no free port; no server became ready (the message names each server's last
                error: "exited with code C during startup; last log lines: ...", "not ready after T s").
                Every server started so far is stopped before the error propagates (also on
                KeyboardInterrupt).
        """
        self.launch()
        try:
            self.wait_ready(first_only=False)
        except BaseException:
            self.stop()
            raise
        return self.ready_endpoints

    def launch(self) -> None:
        """Choose free ports (:meth:`allocate_ports`) and start every server; returns at once.

        Raises:
            ServerError: the pool was already launched, no free port, or a command cannot be executed.
        """
        with self._lock:
            if self._launched:
                raise ServerError("server pool already started")
            self._closed = False
            self.allocate_ports()
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if not self._atexit:
                atexit.register(self.stop)
                self._atexit = True
            self._launched = True
            try:
                for s in self.specs:
                    self._launch(s, append=False)
            except BaseException:
                self.stop()
                raise

    def allocate_ports(self) -> None:
        """Move each server to the first free HTTP (and NCCL) port at or above its nominal one.

        A port held by another process (an Ollama on 11434, another job's server) is skipped with a
        warning naming its owner; ports chosen for earlier servers of the pool are skipped too. At most
        ``PORT_SEARCH_SPAN`` ports are tried per server.

        Raises:
            ServerError: no free port within the span.
        """
        taken: set[int] = set()
        for k, spec in enumerate(self.specs):
            port = self._free_port(spec, spec.port, taken, "port")
            taken.add(port)
            nccl = None
            if spec.nccl_port is not None:
                nccl = self._free_port(spec, spec.nccl_port, taken, "NCCL port")
                taken.add(nccl)
            if (port, nccl) != (spec.port, spec.nccl_port):
                self.specs[k] = spec.with_ports(port, nccl)

    def _free_port(self, spec: ServerSpec, start: int, taken: set[int], what: str) -> int:
        for port in range(start, min(start + PORT_SEARCH_SPAN, 65536)):
            if port in taken:
                continue
            if not port_in_use(spec.host, port):
                return port
            owner = port_owner(port)
            log.warning("%s %d on %s is in use%s: skipped", what, port, spec.host, f" by {owner}" if owner else "")
            self.state[spec.index].skipped_ports.append(port)
        raise ServerError(
            f"no free {what} for server {spec.index} in {start}..{start + PORT_SEARCH_SPAN - 1} on {spec.host} "
            "(choose another --base-port)"
        )

    def _launch(self, spec: ServerSpec, *, append: bool, restart: bool = False) -> None:
        """Start ``spec``'s process (status ``starting``; ``restarting`` for :meth:`restart` of a server that
        was ready, so that :meth:`poll_startup` does not report it as a server joining the run)."""
        log.debug("starting %s server on port %d: %s", spec.backend, spec.port, spec.shell_command())
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = spec.spawn_argv(dict(os.environ))
        with open(spec.log_path, "ab" if append else "wb") as logf:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **spec.env},
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            except OSError as exc:
                raise ServerError(
                    f"cannot start server on port {spec.port} ({spec.argv[0]}): {exc}"
                ) from None
        self._procs[spec.port] = proc
        st = self.state[spec.index]
        st.attempts += 1
        st.started_at = time.monotonic()
        if st.status == "planned":
            st.first_started_at = st.started_at
        st.status = "restarting" if restart else "starting"
        st.noted_at = st.started_at
        log.info("%s server on port %d started (pid %d, attempt %d; log %s)", spec.backend, spec.port, proc.pid,
                 st.attempts, spec.log_path)

    def poll_startup(self, *, log_failed: bool = True) -> list[ServerSpec]:
        """Check the starting servers once, without blocking (one health request each).

        A server that answers its health path becomes ``"ready"``. One that exited, or is not ready
        ``servers.startup_timeout_s`` after its launch (it is stopped), is started again on the same ports
        while it has attempts left (``servers.startup_attempts``), else ``"failed"`` (error logged with
        the tail of its log unless ``log_failed`` is False: the caller reports it).

        Returns:
            The servers that became ready during this call.
        """
        ready: list[ServerSpec] = []
        timeout_s = self.cfg.servers.startup_timeout_s
        with self._lock, local_session() as http:
            for s in self.specs:
                st = self.state[s.index]
                if st.status != "starting" or s.port not in self._procs:
                    continue
                proc = self._procs[s.port]
                code = proc.poll()
                if code is None and http_ready(http, s.url + s.health_path):
                    st.status = "ready"
                    st.ready_after_s = round(time.monotonic() - st.first_started_at, 3)
                    log.info("server on port %d is ready after %.1f s", s.port, st.ready_after_s)
                    ready.append(s)
                    continue
                if code is not None:
                    error = f"server on port {s.port} {describe_exit(code)} during startup"
                elif time.monotonic() - st.started_at > timeout_s:
                    error = f"server on port {s.port} not ready after {timeout_s:g} s (servers.startup_timeout_s)"
                    stop_processes([proc], self.cfg.servers.shutdown_timeout_s)
                else:
                    self._note_loading(s, st)
                    continue
                del self._procs[s.port]
                st.error = error
                tail = log_tail(s.log_path)
                if st.attempts < self.cfg.servers.startup_attempts:
                    log.warning("%s (attempt %d of %d): starting it again; last log lines (%s):\n%s", error,
                                st.attempts, self.cfg.servers.startup_attempts, s.log_path, tail)
                    try:
                        wait_port_free(s.host, s.port)
                        self._launch(s, append=True)
                        continue
                    except ServerError as exc:
                        st.error = str(exc)
                st.status = "failed"
                if log_failed:
                    log.error("%s; giving up after %d attempt(s), the run goes on without it; last log lines (%s):\n%s",
                              st.error, st.attempts, s.log_path, tail)
        return ready

    def _note_loading(self, s: ServerSpec, st: ServerState) -> None:
        """Log a starting server that is still loading, every :data:`LOADING_NOTE_S` seconds."""
        now = time.monotonic()
        if now - st.noted_at < LOADING_NOTE_S:
            return
        st.noted_at = now
        last = log_tail(s.log_path, 1).strip()[:160]
        log.info("server on port %d still loading after %.0f s (servers.startup_timeout_s = %g s); its log's last "
                 "line: %s", s.port, now - st.started_at, self.cfg.servers.startup_timeout_s, last)

    def wait_ready(self, first_only: bool = False, abort: Callable[[], bool] | None = None, *,
                   all_required: bool = False) -> list[str]:
        """Poll until one server is ready (``first_only``) or every server is ready or failed.

        Args:
            first_only: return as soon as one server is ready.
            abort: polled between checks; True stops the wait with :class:`Interrupted` (a signal).
            all_required: fail as soon as one server has failed (``servers.startup_attempts`` used up)
                instead of going on with the others.

        Returns:
            The ready endpoints so far, in port order.

        Raises:
            ServerError: every server failed (the message gives each one's last error and the log tail
                of the first); with ``all_required``, one server failed (its last error and log tail).
            Interrupted: ``abort()`` returned True.
        """
        while True:
            if abort is not None and abort():
                raise Interrupted("signal received while the servers were starting")
            self.poll_startup(log_failed=not all_required)
            statuses = [self.state[s.index].status for s in self.specs]
            if all_required and "failed" in statuses:
                s = self.specs[statuses.index("failed")]
                raise ServerError(f"{self.state[s.index].error}; last log lines ({s.log_path}):\n{log_tail(s.log_path)}")
            if (first_only and "ready" in statuses) or "starting" not in statuses:
                break
            time.sleep(POLL_INTERVAL_S)
        if "ready" not in statuses:
            errors = "; ".join(self.state[s.index].error or "?" for s in self.specs)
            first = self.specs[0]
            raise ServerError(
                f"no server could be started: {errors}; last log lines ({first.log_path}):\n{log_tail(first.log_path)}"
            )
        return self.ready_endpoints

    def starting(self) -> bool:
        """True while some server is still starting (``poll_startup`` has more to report)."""
        return any(st.status == "starting" for st in self.state.values())

    def check_alive(self) -> list[int]:
        """Ports of servers that were ready and whose process has exited since (empty list = all alive).

        Servers still starting or given up at startup are not listed (:meth:`poll_startup` handles them).
        """
        with self._lock:
            return [
                s.port
                for s in self.specs
                if self.state[s.index].status == "ready"
                and (s.port not in self._procs or self._procs[s.port].poll() is not None)
            ]

    def returncode(self, port: int) -> int | None:
        """Exit status of the server on ``port`` (None while it runs; negative = killed by that signal)."""
        with self._lock:
            proc = self._procs.get(port)
            return None if proc is None else proc.poll()

    def report(self) -> list[dict[str, Any]]:
        """One dict per server for the run manifest: index, backend, url, port, nccl_port, gpus
        (physical ids), status, attempts, ready_after_s, error, skipped_ports, log."""
        with self._lock:
            return [
                {
                    "index": s.index,
                    "backend": s.backend,
                    "url": s.url,
                    "port": s.port,
                    "nccl_port": s.nccl_port,
                    "gpus": list(s.gpus),
                    "status": self.state[s.index].status,
                    "running": s.port in self._procs and self._procs[s.port].poll() is None,
                    "attempts": self.state[s.index].attempts,
                    "ready_after_s": self.state[s.index].ready_after_s,
                    "error": self.state[s.index].error,
                    "skipped_ports": list(self.state[s.index].skipped_ports),
                    "log": str(s.log_path),
                }
                for s in self.specs
            ]

    def restart(self, port: int, cancel: threading.Event | None = None) -> str:
        """Stop (if needed) and start again the server on ``port``; wait until it is ready.

        The pool's lock is held only to swap the process: the wait for readiness (up to
        ``servers.startup_timeout_s``) runs without it, so :meth:`check_alive`, :meth:`returncode` and
        :meth:`stop` never wait for a restart. Call it from a long-lived thread (PR_SET_PDEATHSIG).

        Args:
            port: the server's port.
            cancel: set it to abandon the wait (the new process is stopped and ServerError raised).

        Returns:
            Its endpoint.

        Raises:
            ServerError: unknown port, the pool was stopped, port still taken after 10 s, cancelled, or the
                startup errors of :meth:`start`.
        """
        spec = self._spec(port)
        with self._lock:
            if self._closed:
                raise ServerError(f"server pool stopped: not restarting port {port}")
            old = self._procs.pop(port, None)
        if old is not None:
            stop_processes([old], self.cfg.servers.shutdown_timeout_s)
        wait_port_free(spec.host, port)
        with self._lock:
            if self._closed:
                raise ServerError(f"server pool stopped: not restarting port {port}")
            self._launch(spec, append=True, restart=True)
            proc = self._procs[port]
        try:
            self._wait_restarted(spec, proc, cancel)
        except BaseException:
            with self._lock:
                if self._procs.get(port) is proc:
                    del self._procs[port]
                self.state[spec.index].status = "ready"  # crashed-after-ready again: check_alive reports it
            stop_processes([proc], self.cfg.servers.shutdown_timeout_s)
            raise
        self.state[spec.index].status = "ready"  # crashed-after-ready: check_alive keeps reporting it
        log.warning("server on port %d restarted (pid %d)", port, proc.pid)
        return spec.url

    def _wait_restarted(self, spec: ServerSpec, proc: subprocess.Popen, cancel: threading.Event | None) -> None:
        """Wait until the restarted server ``proc`` answers its health path (``servers.startup_timeout_s``).

        Raises:
            ServerError: it exited, did not answer in time (both with its log tail), or ``cancel`` was set.
        """
        timeout_s = self.cfg.servers.startup_timeout_s
        port = spec.port

        def exited(code: int) -> ServerError:
            return ServerError(f"server on port {port} {describe_exit(code)} during startup; "
                               f"last log lines ({spec.log_path}):\n{log_tail(spec.log_path)}")

        def timed_out() -> ServerError:
            return ServerError(f"server on port {port} not ready after {timeout_s:g} s (servers.startup_timeout_s); "
                               f"last log lines ({spec.log_path}):\n{log_tail(spec.log_path)}")

        ready = wait_http_ready(proc, spec.url + spec.health_path, time.monotonic() + timeout_s,
                                stop=cancel.is_set if cancel is not None else None,
                                exit_error=exited, timeout_error=timed_out)
        if not ready:
            raise ServerError(f"startup of the server(s) on port(s) {[port]} cancelled")
        log.info("server on port %d is ready", port)

    def stop(self) -> None:
        """Stop every server: SIGTERM to each process group, SIGKILL after ``servers.shutdown_timeout_s``.

        Idempotent; safe to call from atexit, ``finally`` blocks and after a partial start.
        """
        with self._lock:
            self._closed = True
            procs = list(self._procs.values())
            self._procs.clear()
            if procs:
                log.info("stopping %d server(s)", len(procs))
                stop_processes(procs, self.cfg.servers.shutdown_timeout_s)
            if self._atexit:
                atexit.unregister(self.stop)
                self._atexit = False

    def __enter__(self) -> ServerPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["PORT_SEARCH_SPAN", "ServerPool", "ServerState"]
