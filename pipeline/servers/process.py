"""Ports and child processes of the servers we start (LLM servers, the node's Chroma server).

- Ports: :func:`port_in_use` (can a server bind it?), :func:`port_owner` (who holds it), :func:`check_port_free`
  and :func:`wait_port_free` (raise naming the owner).
- Processes: each server runs in its own session / process group (``start_new_session=True``) with
  :func:`die_with_parent` as ``preexec_fn``; :func:`stop_processes` sends SIGTERM to each group, then SIGKILL.
- Readiness: :func:`http_ready` is one probe, :func:`wait_http_ready` polls a URL until it answers while
  checking that the child is alive. Probes never go through an ``http_proxy`` of the environment: the servers
  are local.
- Logs: :func:`log_tail` for error messages, :func:`describe_exit` for an exit status.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection
from pathlib import Path

import requests

from pipeline.errors import ServerError

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 15
"""Lines of a server's log quoted in error messages."""
POLL_INTERVAL_S = 0.2
"""Seconds between two checks of a starting server (health probe, process alive, port free)."""
READY_STATUSES = (200, 401, 403)
"""HTTP statuses of an LLM server's health path that mean it is up: 200, or 401/403 from a server started with an
API key (it answers, so it is up)."""


# ------------------------------------------------------------------------------------------------
# Ports
# ------------------------------------------------------------------------------------------------


def port_owner(port: int) -> str | None:
    """Who listens on TCP ``port``, if psutil can see it (a process of this user), else None.

    Returns:
        ``pid 123 (python -m pipeline.servers.cpu_server ...)`` followed by the same socket in the format of
        ``ss -ltnp`` (``users:(("python",pid=123,fd=7))``), which launch_servers.sh printed before it used
        this function.
    """
    import psutil

    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return None
    for c in conns:
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
            try:
                proc = psutil.Process(c.pid)
                name = proc.name()
                cmd = " ".join(proc.cmdline()) or name
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                name, cmd = "?", "?"
            fd = f",fd={c.fd}" if c.fd is not None and c.fd >= 0 else ""
            return f'pid {c.pid} ({cmd[:120]}) users:(("{name}",pid={c.pid}{fd}))'
    return None


def port_in_use(host: str, port: int, *, error: type[Exception] = ServerError) -> bool:
    """True if a server could not bind ``host:port`` (binds with SO_REUSEADDR, as uvicorn does).

    Args:
        host: interface (``""`` = every IPv4 interface; an address with ``:`` is IPv6).
        port: TCP port.
        error: exception class raised when binding fails for another reason than the port being taken.

    Raises:
        error: the address cannot be bound at all (e.g. not an address of this machine).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise error(f"cannot bind {host}:{port}: {exc.strerror}") from None
    return False


def check_port_free(
    host: str,
    port: int,
    what: str = "port",
    *,
    hint: str = "choose another --base-port",
    error: type[Exception] = ServerError,
) -> None:
    """Raise if ``host:port`` is taken: ``"<what> P on H is already in use by <owner> (stop that process or
    <hint>)"``.

    Args:
        host: interface the server will bind.
        port: TCP port.
        what: how the message names the port (``"port"``, ``"store port"``).
        hint: the alternative the message offers (the flag that chooses the port).
        error: exception class raised (e.g. :class:`pipeline.errors.StoreError` for the Chroma server).

    Raises:
        error: the port is in use (the owner named when :func:`port_owner` finds it), or cannot be bound.
    """
    if port_in_use(host, port, error=error):
        owner = port_owner(port)
        raise error(
            f"{what} {port} on {host} is already in use"
            + (f" by {owner}" if owner else "")
            + f" (stop that process or {hint})"
        )


def wait_port_free(host: str, port: int, wait_s: float = 10.0) -> None:
    """Wait up to ``wait_s`` seconds for ``host:port`` to be released (a server just stopped), then check it.

    Raises:
        ServerError: still in use after ``wait_s`` (see :func:`check_port_free`).
    """
    deadline = time.monotonic() + wait_s
    while port_in_use(host, port) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
    check_port_free(host, port)


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------


def describe_exit(code: int) -> str:
    """``"exited with code 2"``, or ``"was killed by signal SIGKILL"`` for a negative ``Popen.returncode``."""
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def die_with_parent() -> None:
    """In the forked child before exec: ask Linux to SIGKILL this server when the process that started it dies.

    Servers run in their own session (so Ctrl-C and our process-group signals are separate), which also
    detaches them from the parent's lifetime; without this a kill -9 of the main process would leave every
    server running (an orphan holding a GPU and a port). prctl(PR_SET_PDEATHSIG) is Linux-only; elsewhere the
    atexit/signal cleanup is all there is. Use as ``Popen(..., preexec_fn=die_with_parent)``.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to a process group we created; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_processes(procs: list[subprocess.Popen], shutdown_timeout_s: float) -> None:
    """SIGTERM each process group, wait up to ``shutdown_timeout_s`` in total, then SIGKILL what is left.

    Each ``Popen`` must lead its own process group (``start_new_session=True``). The SIGKILL sweep also
    reaches children the servers started in their group. Returns once every process was reaped (or 5 s
    after its SIGKILL).
    """
    for p in procs:
        if p.poll() is None:
            signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + shutdown_timeout_s
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.poll() is None:
            log.warning("pid %d ignored SIGTERM for %.0f s: sending SIGKILL", p.pid, shutdown_timeout_s)
        signal_group(p.pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5.0)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file (at most 16 KiB read), or a note if it cannot be read."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc.strerror})"
    return "\n".join(data.splitlines()[-lines:]) or "(empty log)"


# ------------------------------------------------------------------------------------------------
# Readiness
# ------------------------------------------------------------------------------------------------


def local_session() -> requests.Session:
    """A requests session for probes of local servers: ``trust_env`` off, so no ``http_proxy`` is used."""
    http = requests.Session()
    http.trust_env = False
    return http


def http_ready(
    http: requests.Session,
    url: str,
    statuses: Collection[int] = READY_STATUSES,
    timeout_s: float | tuple[float, float] = (1.0, 5.0),
) -> bool:
    """One probe: True if ``GET url`` answers one of ``statuses``; False on another status or no answer.

    Args:
        http: the session to send it with (:func:`local_session`).
        url: the full health URL.
        statuses: the HTTP statuses that mean ready.
        timeout_s: requests' timeout, seconds (connect, read) or one value for both.
    """
    try:
        return http.get(url, timeout=timeout_s).status_code in statuses
    except requests.RequestException:
        return False


def wait_http_ready(
    process: subprocess.Popen,
    url: str,
    deadline: float,
    *,
    statuses: Collection[int] = READY_STATUSES,
    request_timeout_s: float | tuple[float, float] = (1.0, 5.0),
    stop: Callable[[], bool] | None = None,
    exit_error: Callable[[int], Exception] | None = None,
    timeout_error: Callable[[], Exception] | None = None,
    interval_s: float = POLL_INTERVAL_S,
) -> bool:
    """Poll ``url`` until it answers one of ``statuses``, checking between probes that ``process`` still runs.

    Each round: ``stop()``, then the process, then one probe (:func:`http_ready`), then the deadline; then
    ``interval_s`` of sleep.

    Args:
        process: the server's process.
        url: its health URL.
        deadline: ``time.monotonic()`` value after which the wait fails.
        statuses: HTTP statuses that mean ready (default ``READY_STATUSES``; Chroma's heartbeat: ``(200,)``).
        request_timeout_s: timeout of one probe, seconds (connect, read) or one value for both.
        stop: polled each round; True ends the wait at once (returns False): a signal, a cancelled restart.
        exit_error: builds the exception raised when the process has exited, from its ``returncode``;
            default a :class:`ServerError` naming the pid and :func:`describe_exit`.
        timeout_error: builds the exception raised at the deadline; default a :class:`ServerError` naming
            ``url``.
        interval_s: seconds between rounds.

    Returns:
        True once ready, False if ``stop()`` returned True first.

    Raises:
        Exception: ``exit_error(returncode)`` if the process exits first, ``timeout_error()`` at the deadline.
    """
    with local_session() as http:
        while True:
            if stop is not None and stop():
                return False
            code = process.poll()
            if code is not None:
                if exit_error is not None:
                    raise exit_error(code)
                raise ServerError(f"process {process.pid} {describe_exit(code)} before {url} answered")
            if http_ready(http, url, statuses, request_timeout_s):
                return True
            if time.monotonic() > deadline:
                if timeout_error is not None:
                    raise timeout_error()
                raise ServerError(f"{url} did not answer before the deadline")
            time.sleep(interval_s)


__all__ = [
    "ALLOW_FLAG",
    "is_loopback",
    "open_listener_problem",
    "LOG_TAIL_LINES",
    "POLL_INTERVAL_S",
    "READY_STATUSES",
    "check_port_free",
    "describe_exit",
    "die_with_parent",
    "http_ready",
    "local_session",
    "log_tail",
    "port_in_use",
    "port_owner",
    "signal_group",
    "stop_processes",
    "wait_http_ready",
    "wait_port_free",
]


def is_loopback(host: str) -> bool:
    """True when ``host`` (a name or an address, IPv6 with or without brackets) is this machine's loopback:
    ``localhost`` or an address in 127.0.0.0/8 or ::1. A wildcard (``0.0.0.0``, ``::``, ``""``) is not."""
    import ipaddress

    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


ALLOW_FLAG = "--allow-unauthenticated-network"
"""The flag (and ``servers.allow_unauthenticated_network``) that lets a server without authentication bind a
non-loopback address."""


def open_listener_problem(host: str, *, authenticated: bool, allowed: bool, what: str, instead: str) -> str | None:
    """The rule for every server this tool starts: it binds the loopback unless the user says otherwise, and a
    server that checks no credential binds another address only when the user accepts that explicitly.

    Args:
        host: the address the server would bind (``0.0.0.0``, ``::`` and ``""`` are every interface).
        authenticated: the server requires a credential (an LLM server started with an API key).
        allowed: the user passed :data:`ALLOW_FLAG` (or set its config key).
        what: the server and the option that set ``host``, for the message, e.g. ``"serve-store --host"``.
        instead: what to do instead, for the message.

    Returns:
        None when the server may bind ``host``, else the one-line refusal.
    """
    if is_loopback(host) or authenticated or allowed:
        return None
    return (f"{what} {host or '0.0.0.0'}: refused: the server checks no credential, so anyone who can reach this "
            f"address could use it; {instead}, or pass {ALLOW_FLAG} to accept that risk")
