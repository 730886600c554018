"""Endpoint health during a run: probes, a state per endpoint, background restarts of managed servers.

One :class:`EndpointMonitor` per run, owned by the main process. Its thread probes every LLM endpoint each
``servers.health_interval_s`` seconds (in parallel, each probe with its own timeout) and keeps one state per
endpoint::

    up ──(process exited, connection refused/closed, or no answer for servers.health_timeout_s)──> down
    down ──(managed, restarts allowed)──> restarting ──(ready)──> up
                                              └──(startup failed MAX_RESTARTS times in a row)──> failed
    down ──(attached: a probe answers again)──> up

- A managed server is probed on its health path (``/health``), an attached endpoint on ``/v1/models`` (the
  OpenAI-compatible route every server has). A refused connection is down at once (nothing listens); a probe
  that times out counts only after ``servers.health_timeout_s`` without any answer (a server under full batch
  may answer slowly): an alive server that stopped answering (hung, SIGSTOP) is down then, and restarted.
- Restarts run in their own threads (one per server, long-lived: a server started from a thread gets
  PR_SET_PDEATHSIG'd when that thread exits), so a restart never blocks the scheduler, the probes of other
  endpoints, commits or signal handling. :meth:`freeze` (called at the first SIGINT/SIGTERM/SIGUSR1 and
  whenever the run stops) forbids new restarts and cancels those in progress: no restart during shutdown.
- A server that came back is counted again from zero after it stayed up for ``RESTART_RESET_S``.

The scheduler asks :meth:`any_up` (dispatch pauses when it is False) and :meth:`all_up` (a record whose LLM
request failed with retryable errors gets a failure row only while every endpoint is up).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

log = logging.getLogger(__name__)

UP, DOWN, RESTARTING, FAILED = "up", "down", "restarting", "failed"
MAX_RESTARTS = 3
"""Consecutive restarts of one managed server before it is left down (``failed``)."""
RESTART_RESET_S = 300.0
"""A restarted server that stays up this long has its restart count reset."""
PROBE_CONNECT_TIMEOUT_S = 2.0
PROBE_READ_TIMEOUT_S = 10.0


@dataclass
class EndpointHealth:
    """State of one endpoint.

    Attributes:
        url: base URL.
        port: managed server's port, None for an attached endpoint.
        state: ``up``, ``down``, ``restarting`` or ``failed``.
        last_ok: monotonic time of the last successful probe (or of the monitor's start).
        restarts: restarts since the last reset; ``restarted_at``: monotonic time of the last one.
        reason: why it went down, for logs.
    """

    url: str
    port: int | None
    state: str = UP
    last_ok: float = 0.0
    restarts: int = 0
    restarted_at: float = 0.0
    reason: str = ""


class EndpointMonitor:
    """Probe endpoints, track their state, restart managed servers in the background.

    Args:
        endpoints: every LLM endpoint of the run (RAG and generation), base URLs.
        servers_cfg: ``Config.servers`` (``health_interval_s``, ``health_timeout_s``, ``shutdown_timeout_s``).
        pool: the :class:`pipeline.servers.pool.ServerPool` of managed servers, or None (attach mode).
        api_key: sent to attached endpoints as ``Authorization: Bearer``; never logged.
    """

    def __init__(self, endpoints: list[str], servers_cfg: Any, pool: Any = None, api_key: str | None = None) -> None:
        self.cfg = servers_cfg
        self.pool = pool
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        managed = {s.url: s for s in pool.specs} if pool is not None else {}
        self._paths = {u: (managed[u].health_path if u in managed else "/v1/models") for u in endpoints}
        now = time.monotonic()
        self.eps: dict[str, EndpointHealth] = {
            u: EndpointHealth(u, managed[u].port if u in managed else None, UP, now) for u in dict.fromkeys(endpoints)
        }
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._frozen = threading.Event()
        self._thread: threading.Thread | None = None
        self._probe_pool = ThreadPoolExecutor(max_workers=max(1, len(self.eps)), thread_name_prefix="probe")
        n_managed = sum(1 for e in self.eps.values() if e.port is not None)
        self._restart_pool = (ThreadPoolExecutor(max_workers=n_managed, thread_name_prefix="server-restart")
                              if n_managed else None)
        self.total_restarts = 0

    # -- queries (main thread) --------------------------------------------------------------
    def _select(self, urls: list[str] | None) -> list[EndpointHealth]:
        return [self.eps[u] for u in urls if u in self.eps] if urls is not None else list(self.eps.values())

    def any_up(self, urls: list[str] | None = None) -> bool:
        """True if at least one of ``urls`` (default: every endpoint) is up."""
        with self._lock:
            return any(e.state == UP for e in self._select(urls))

    def all_up(self, urls: list[str] | None = None) -> bool:
        """True if every one of ``urls`` (default: all) that is not given up on (``failed``) is up, and one is."""
        with self._lock:
            live = [e for e in self._select(urls) if e.state != FAILED]
            return bool(live) and all(e.state == UP for e in live)

    def states(self, urls: list[str] | None = None) -> dict[str, str]:
        """``{url: state}`` of ``urls`` (default: every endpoint)."""
        with self._lock:
            return {e.url: e.state for e in self._select(urls)}

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the probing thread (daemon)."""
        self._thread = threading.Thread(target=self._run, name="endpoint-monitor", daemon=True)
        self._thread.start()

    def freeze(self) -> None:
        """No new restart from now on, and restarts in progress are abandoned (the run is stopping)."""
        self._frozen.set()

    def stop(self) -> None:
        """Freeze, stop probing, and let restart threads end (their servers are stopped by the pool)."""
        self.freeze()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=PROBE_CONNECT_TIMEOUT_S + PROBE_READ_TIMEOUT_S + 1.0)
        self._probe_pool.shutdown(wait=False, cancel_futures=True)
        if self._restart_pool is not None:
            self._restart_pool.shutdown(wait=False, cancel_futures=True)

    # -- the probing thread -----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except RuntimeError:  # the probe pool was shut down by stop()
                return
            self._stop.wait(self.cfg.health_interval_s)

    def check(self) -> None:
        """One round: probe every endpoint that is not restarting, update states, start restarts."""
        with self._lock:
            for e in self.eps.values():
                if self._startup_status(e) == "failed" and e.state != FAILED:
                    e.state, e.reason = FAILED, "the server failed to start (servers.startup_attempts)"
            # a managed server still starting is the pool's (degrading startup): not probed yet
            todo = [e.url for e in self.eps.values()
                    if e.state in (UP, DOWN) and self._startup_status(e) not in ("planned", "starting")]
        results = dict(zip(todo, self._probe_pool.map(self._probe, todo), strict=True))
        now = time.monotonic()
        for url, (ok, refused, detail) in results.items():
            self._update(url, ok, refused, detail, now)

    def _startup_status(self, e: EndpointHealth) -> str | None:
        """The pool's startup status of a managed server (``planned``, ``starting``, ``ready``, ``failed``)."""
        if self.pool is None or e.port is None or not hasattr(self.pool, "state"):
            return None
        for spec in self.pool.specs:
            if spec.port == e.port:
                return self.pool.state[spec.index].status
        return None

    def _probe(self, url: str) -> tuple[bool, bool, str]:
        """``(answered, connection refused, detail)`` of one probe; a managed server's exit counts as refused."""
        e = self.eps[url]
        if e.port is not None and self.pool is not None:
            code = self.pool.returncode(e.port)
            if code is not None:
                return False, True, f"process exited (code {code})"
        try:
            with requests.Session() as http:
                http.trust_env = False  # never through an http_proxy from the environment
                r = http.get(url + self._paths[url], headers=self._headers,
                             timeout=(PROBE_CONNECT_TIMEOUT_S, min(PROBE_READ_TIMEOUT_S, self.cfg.health_timeout_s)))
        except requests.ConnectTimeout:
            return False, False, "connect timeout"
        except requests.ConnectionError as exc:
            # refused, reset or closed without an answer: nothing serves on that port now
            return False, True, f"connection failed ({type(exc).__name__})"
        except requests.RequestException as exc:
            return False, False, f"no answer ({type(exc).__name__})"
        ok = r.status_code == 200 or (e.port is not None and r.status_code in (401, 403))
        return ok, False, f"HTTP {r.status_code}"

    def _update(self, url: str, ok: bool, refused: bool, detail: str, now: float) -> None:
        restart = False
        with self._lock:
            e = self.eps[url]
            if e.state not in (UP, DOWN):
                return
            if ok:
                if e.state == DOWN:
                    log.warning("endpoint %s answers again", url)
                e.state, e.last_ok = UP, now
                if e.restarts and now - e.restarted_at > RESTART_RESET_S:
                    e.restarts = 0
                return
            silent_s = now - e.last_ok
            if e.state == UP and (refused or silent_s > self.cfg.health_timeout_s):
                e.state = DOWN
                e.reason = detail if refused else f"no answer to its health probe for {silent_s:.0f} s ({detail})"
                log.warning("endpoint %s is down: %s", url, e.reason)
            if e.state == DOWN and e.port is not None and not self._frozen.is_set():
                if e.restarts >= MAX_RESTARTS:
                    e.state = FAILED
                    log.error("server %s went down %d times after restarts: left down", url, e.restarts + 1)
                else:
                    e.restarts += 1
                    e.state = RESTARTING
                    restart = True
        if restart and self._restart_pool is not None:
            log.warning("restarting the server on port %d (%d/%d): %s", e.port, e.restarts, MAX_RESTARTS, e.reason)
            self._restart_pool.submit(self._restart, e)

    def _restart(self, e: EndpointHealth) -> None:
        try:
            if self._frozen.is_set():
                raise RuntimeError("the run is stopping")
            self.pool.restart(e.port, cancel=self._frozen)
        except Exception as exc:  # noqa: BLE001 - logged; the endpoint stays down and is retried or given up
            with self._lock:
                e.state = DOWN if e.restarts < MAX_RESTARTS else FAILED
            if not self._frozen.is_set():
                log.error("restart of the server on port %d failed: %s", e.port, str(exc).splitlines()[0])
            return
        now = time.monotonic()
        with self._lock:
            e.state, e.last_ok, e.restarted_at = UP, now, now
            self.total_restarts += 1


__all__ = ["DOWN", "FAILED", "RESTARTING", "UP", "EndpointHealth", "EndpointMonitor", "MAX_RESTARTS"]
