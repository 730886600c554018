"""The SGLang backend: one server per ``servers.tp_size`` GPUs.

Server i runs ``python -m sglang.launch_server --model-path M --host H --port P --tp-size T --nccl-port Q
[--mem-fraction-static F] --enable-metrics [extra args]`` with ``CUDA_VISIBLE_DEVICES`` set to its T physical GPU ids (visible
GPUs ``i*T .. i*T+T-1``); readiness is ``GET /health``; ``--enable-metrics`` serves SGLang's Prometheus
``GET /metrics``; under ``run.deterministic`` ``--enable-deterministic-inference`` is added (batch-invariant
kernels: a request's reply does not depend on the requests batched with it). The flags are checked with SGLang 0.5.23's own parser
(``ServerArgs.add_cli_args``, tests/test_sglang_managed.py). Several SGLang servers on one node collide
unless each has its own NCCL port, hence ``servers.nccl_base_port + 100 * slot + 10 * i``.
"""

from __future__ import annotations

import os
import sys

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.servers.base import Backend, PlanContext, ServerSpec
from pipeline.servers.gpus import detect_gpus, mem_fraction_static, physical_gpu_ids

NCCL_PORT_STRIDE = 10
"""Distance between the NCCL ports of consecutive SGLang servers (a server may open a few ports)."""
NCCL_PORT_BLOCK = 100
"""NCCL ports between the search starts of consecutive job slots."""
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_OFFLINE")
"""Hub/cache variables given explicitly to SGLang servers when set in our environment (shown by --dry-run,
kept by launchers that do not forward the environment): compute nodes are often offline."""


def default_sglang_command() -> tuple[str, ...]:
    """``python -m sglang.launch_server`` with this interpreter (SGLang installed in the same environment)."""
    return (sys.executable, "-m", "sglang.launch_server")


def nccl_ports(nccl_base_port: int, slot: int, n: int) -> list[int]:
    """Nominal NCCL ports of ``n`` servers: ``nccl_base_port + 100 * slot + 10 * i``."""
    first = nccl_base_port + NCCL_PORT_BLOCK * slot
    return [first + NCCL_PORT_STRIDE * i for i in range(n)]


class SGLangBackend(Backend):
    """Managed SGLang servers on this node's GPUs."""

    name = "sglang"
    health_path = "/health"

    def server_count(self, cfg: Config) -> int:
        """``detect_gpus(servers.gpus) // servers.tp_size``.

        Raises:
            ConfigError: no GPU, more GPUs asked than visible, or a GPU count not divisible by ``tp_size``.
        """
        n = detect_gpus(cfg.servers.gpus)
        if n < 1:
            raise ConfigError(
                "[servers] backend 'sglang' needs at least one GPU and none was found "
                "(set --gpus N, or use --backend llamacpp)"
            )
        tp = cfg.servers.tp_size
        if tp < 1 or n % tp:
            raise ConfigError(
                f"[servers] tp_size: {n} GPU(s) cannot be split into servers of tp_size={tp} GPUs "
                "(use a divisor of the GPU count, or --gpus)"
            )
        return n // tp

    def check_settings(self, cfg: Config) -> None:
        """``servers.model`` is named (SGLang has no default model).

        Raises:
            ConfigError: no ``servers.model``.
        """
        if not cfg.servers.model:
            raise ConfigError("[servers] model: required for the sglang backend (a HF model name or local path)")

    def plan(self, ctx: PlanContext) -> list[ServerSpec]:
        """One server per ``tp_size`` visible GPUs (see the module docstring for the command).

        The python running a server is ``sys.executable`` unless ``servers.sglang_command`` is set; the
        hub/cache variables of ``OFFLINE_ENV`` present in our environment are passed explicitly;
        ``--mem-fraction-static`` is :func:`pipeline.servers.gpus.mem_fraction_static` (left out when None).

        Raises:
            ConfigError: no ``servers.model``; ``CUDA_VISIBLE_DEVICES`` lists too few GPUs; NCCL ports above
                65535 or colliding with the HTTP ports; a bad ``mem_fraction_static``.
        """
        self.check_settings(ctx.cfg)
        s = ctx.cfg.servers
        tp = s.tp_size
        n = len(ctx.ports)
        gpu_ids = physical_gpu_ids(n * tp)
        nccl = nccl_ports(s.nccl_base_port, ctx.slot, n)
        clash = set(nccl) & set(ctx.ports)
        if clash or nccl[-1] > 65535:
            raise ConfigError(
                f"[servers] nccl_base_port: NCCL ports {nccl[0]}..{nccl[-1]} must be <= 65535 "
                f"and distinct from the HTTP ports (clash: {sorted(clash)})"
            )
        fraction = mem_fraction_static(ctx.cfg)
        command = tuple(s.sglang_command) or default_sglang_command()
        hub_env = {k: os.environ[k] for k in OFFLINE_ENV if k in os.environ}
        specs = []
        for i, (port, nccl_port) in enumerate(zip(ctx.ports, nccl, strict=True)):
            gpus = tuple(gpu_ids[i * tp : (i + 1) * tp])
            argv = (
                *command,
                "--model-path", s.model,
                "--host", s.host,
                "--port", str(port),
                "--tp-size", str(tp),
                "--nccl-port", str(nccl_port),
                *(("--mem-fraction-static", str(fraction)) if fraction is not None else ()),
                "--enable-metrics",
                *(("--enable-deterministic-inference",) if ctx.cfg.run.deterministic else ()),
                *s.extra_args,
            )  # fmt: skip
            specs.append(
                ServerSpec(
                    index=i,
                    backend=self.name,
                    argv=argv,
                    env={"CUDA_VISIBLE_DEVICES": ",".join(gpus), **hub_env},
                    host=s.host,
                    port=port,
                    health_path=self.health_path,
                    log_path=ctx.log_path(self.name, port),
                    nccl_port=nccl_port,
                    gpus=gpus,
                    visible_gpu=i * tp,
                )
            )
        return specs


BACKEND = SGLangBackend()

__all__ = ["BACKEND", "NCCL_PORT_BLOCK", "NCCL_PORT_STRIDE", "OFFLINE_ENV", "SGLangBackend", "default_sglang_command",
           "nccl_ports"]
