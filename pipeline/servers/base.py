"""What a launch plan is made of, and the interface every server backend implements.

A plan is a list of :class:`ServerSpec` (exact argv, environment, ports, health path, log file), one per
server, built by a :class:`Backend` from a :class:`PlanContext` (the configuration and the servers' nominal
HTTP ports). :mod:`pipeline.servers.plan` picks the backend and the ports; :mod:`pipeline.servers.pool` runs
the specs. Building a plan starts nothing and checks no port.
"""

from __future__ import annotations

import abc
import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config


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


@dataclass(frozen=True)
class PlanContext:
    """What a backend needs beyond the configuration to plan its servers.

    Attributes:
        cfg: the configuration (``servers`` section).
        ports: nominal HTTP port of each server, in order; ``len(ports)`` is the number of servers.
        slot: the job's port slot (:func:`pipeline.servers.plan.job_port_slot`): shifts other port ranges a
            backend uses (SGLang's NCCL ports) the way it shifted ``ports``.
        log_dir: directory of the servers' log files (``<log_dir>/<backend>-<port>.log``).
    """

    cfg: Config
    ports: tuple[int, ...]
    slot: int
    log_dir: Path

    def log_path(self, backend: str, port: int) -> Path:
        """The log file of ``backend``'s server on ``port``."""
        return self.log_dir / f"{backend}-{port}.log"


class Backend(abc.ABC):
    """A kind of OpenAI-compatible server the pool can start: how many, and with which commands.

    Attributes:
        name: the ``servers.backend`` value selecting it (``"sglang"``, ``"llamacpp"``).
        health_path: path answering 200 (or 401/403 with an API key) once a server is ready.
    """

    name: str
    health_path: str = "/health"

    @abc.abstractmethod
    def server_count(self, cfg: Config) -> int:
        """Number of servers to run for ``cfg`` (>= 1).

        Raises:
            ConfigError: the configuration does not allow any server (no GPU, a bad count).
        """

    @abc.abstractmethod
    def check_settings(self, cfg: Config) -> None:
        """The settings this backend needs whatever the machine (the model named or installed): the part of
        :meth:`plan` that can be checked where no server will run, e.g. on a login node before ``submit``.

        Raises:
            ConfigError: a setting this backend cannot run with.
            ServerError: a required file is missing (e.g. the default model).
        """

    @abc.abstractmethod
    def plan(self, ctx: PlanContext) -> list[ServerSpec]:
        """The launch plan: one :class:`ServerSpec` per port of ``ctx.ports``, in order, on those ports.

        Raises:
            ConfigError: the configuration cannot be run by this backend (missing model, ports out of range).
            ServerError: a required file is missing (e.g. the default model).
        """


__all__ = ["Backend", "PlanContext", "ServerSpec"]
