"""The CPU LLM server: llama.cpp's own HTTP server, embedded by ``xllamacpp``, as a command.

``xllamacpp`` (PyPI, MIT, Xorbits; the llama.cpp backend of Xinference) ships a prebuilt AVX2 wheel with
llama.cpp's HTTP server inside (``/health``, ``/v1/models``, ``/props``, ``/v1/chat/completions``,
``/v1/completions`` with ``usage``, ``response_format`` json_schema) and continuous batching over
``n_parallel`` slots. It has no command-line entry point: ``xllamacpp.Server(CommonParams)`` starts the
server on background threads inside the calling process. This module is that entry point, so the server
pool and ``launch_servers.sh`` start it as a subprocess in its own process group like any other server::

    python -m pipeline.servers.cpu_server --model GGUF --host 127.0.0.1 --port 11434 \
        --n_ctx 2048 --n_parallel 4 --n_threads 1 --alias NAME --metrics

``--alias`` is the model name ``/v1/models`` reports (llama.cpp reports the file path without one);
``--metrics`` turns on llama.cpp's Prometheus endpoint ``GET /metrics`` (``CommonParams.endpoint_metrics``).
``--deterministic`` makes every completion a function of its request alone (see :func:`build_params`): no prompt
cache reuse between requests (``cache_prompt`` off, no host-memory prompt cache, idle slots not cached) and a
fixed default sampling seed (:data:`pipeline.config.DETERMINISTIC_SEED`); with ``--n_parallel 1`` no two requests share a batch.

Sizes:
    ``--n_ctx`` is the context of **one slot**, tokens; the server allocates ``n_ctx * n_parallel``
    tokens of KV cache in all (llama.cpp splits its total context across slots unless ``kv_unified``).
    ``--n_parallel`` is the number of requests decoded together (continuous batching); clients should
    keep that many in flight (``/props`` reports it as ``total_slots``).

Stops on SIGTERM or SIGINT (exit 0). Measured on 2 cores: ready in ~0.5-1.2 s, 250-375 MB RSS for
SmolLM2-135M-Instruct Q4_1, 2.0x completion tokens/s at 4 concurrent requests vs 1 with one thread each,
deterministic at temperature 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

XLLAMACPP_VERSION = "2026.10.11549"
"""The pinned xllamacpp release (pyproject.toml and scripts/setup.sh install exactly this one)."""



def default_threads(n_servers: int = 1) -> int:
    """Threads per CPU server when ``servers.n_threads`` is 0: half the cores shared by the servers, >= 1.

    The other half is left to the RAG workers' embedding model and the pipeline itself (on 2 cores:
    1 thread, which was also the fastest per server on 2 shared cores).

    Args:
        n_servers: CPU servers started on this machine.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (2 * max(1, n_servers)))


def build_params(args: argparse.Namespace):  # noqa: ANN201 - xllamacpp.CommonParams, imported lazily
    """``xllamacpp.CommonParams`` from the parsed command line (see :func:`parse_args`)."""
    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = args.model
    p.hostnames = [args.host]
    p.port = args.port
    p.n_parallel = args.n_parallel
    p.n_ctx = args.n_ctx * args.n_parallel  # llama.cpp splits n_ctx across the slots
    p.cont_batching = True
    p.cpuparams.n_threads = args.n_threads
    p.cpuparams_batch.n_threads = args.n_threads
    if args.alias:
        p.model_alias = {args.alias}  # a set of names in xllamacpp (a str would become a set of its letters)
    p.endpoint_metrics = args.metrics  # Prometheus text on GET /metrics
    if args.api_key:
        p.api_keys = [args.api_key]
    if args.deterministic:
        # A request whose prompt shares a prefix with an earlier one would reuse that prefix's KV cache and
        # compute only the rest, in batches of another shape: different float rounding, sometimes another
        # greedy token. Off, every prompt is computed whole, the same way each time.
        p.cache_prompt = False  # the default of the per-request "cache_prompt" field
        p.cache_ram_mib = 0  # no prompt cache in host memory
        p.cache_idle_slots = False
        p.n_cache_reuse = 0
        from pipeline.config import DETERMINISTIC_SEED

        # for a request that names no seed (llama.cpp's own default, 0xFFFFFFFF, draws one per request)
        p.sampling.seed = DETERMINISTIC_SEED
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (flag names follow llama-cpp-python's server: ``--n_ctx`` etc.)."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.servers.cpu_server", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="GGUF file.")
    ap.add_argument("--host", default="127.0.0.1", help="Interface to bind (default 127.0.0.1).")
    ap.add_argument("--port", type=int, required=True, help="HTTP port.")
    ap.add_argument("--n_ctx", type=int, default=2048, help="Context per slot, tokens.")
    ap.add_argument("--n_parallel", type=int, default=4, help="Slots decoded together (continuous batching).")
    ap.add_argument("--n_threads", type=int, default=1, help="CPU threads for decoding and prompt processing.")
    ap.add_argument("--api_key", default="", help="Require this bearer token on API requests (/health stays open).")
    ap.add_argument("--alias", default="", help="Model name reported by /v1/models (default: the file path).")
    ap.add_argument("--metrics", action="store_true", help="Serve llama.cpp's Prometheus metrics on GET /metrics.")
    ap.add_argument("--deterministic", action="store_true",
                    help="No prompt-cache reuse between requests and a fixed default seed (reproducible replies).")
    args = ap.parse_args(argv)
    for name in ("port", "n_ctx", "n_parallel", "n_threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not os.path.isfile(args.model):
        ap.error(f"--model {args.model}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    """Start the server and block until SIGTERM/SIGINT. Returns the exit status."""
    args = parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    import xllamacpp

    server = xllamacpp.Server(build_params(args))  # serves on its own threads from here on
    sys.stderr.write(f"cpu_server: listening on {server.listening_address}\n")
    sys.stderr.flush()
    while not stop.wait(1.0):
        pass
    # The embedded server has no stop call; exiting the process ends its threads.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
