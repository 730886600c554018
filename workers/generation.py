"""The generation pool process: CPU only. It never imports torch, chromadb or sentence_transformers.

Each process takes items (the record + its RAG result + ``target``, the endpoint main routed it to: the one that
produced the record's RAG answer while it is healthy), builds the prompt (pipeline.llm.prompts: the shared prefix of
instructions + context + query, then the generation part, after rag_status "ok"; the query alone after
"soft_fail"), calls the target endpoint first through the LLM client (failover, retries, circuit breaker,
adaptive concurrency on 429/503) and returns one result per item:
    id: str; generation: str | None; generation_json: str | None (the parsed reply as compact JSON when
    generation.response_format is set and the reply validates); gen_status: "ok" | "failed" | "invalid_output"
    (the reply never matched generation.response_format, see pipeline.llm.structured); gen_error: str | None;
    generate_ms: float; attempts: int; endpoint: str | None; model: str | None;
    bad_endpoints: list[str] (endpoints with an attempt that says they are unhealthy: connection error, timeout,
    5xx other than 503, see pipeline.llm.outcome; main routes around them for a while); retry_cause (on failure:
    pipeline.llm.outcome.retry_cause); unavailable / overloaded: bool (no endpoint reachable / overload
    outlasted llm.overload_timeout_s: main requeues the record instead of writing a failure).

Concurrency: main decides how many generations are in flight per endpoint (a total per endpoint shared by the
whole pool) and sends each process at most ``threads`` items; the process runs one thread per item in flight
(blocking HTTP: the threads wait on sockets, measured CPU per record in bench/saturation.py).
"""

from __future__ import annotations

import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.config import Config
from pipeline.llm.outcome import NoEndpointAvailable, Overloaded, RequestFailed, bad_endpoints, retry_cause
from workers.protocol import ResultChannel, get_work, ignore_sigint, start_heartbeat


def generate_one(client: Any, cfg: Config, templates: dict[str, str], item: dict, structured: Any = None) -> dict:
    """Generate for one record; never raises for a per-record failure (it is recorded).

    ``structured``: a :class:`pipeline.llm.structured.StructuredOutput` (``generation.response_format``) or None.
    """
    from pipeline.llm.prompts import generation_prompt
    from pipeline.llm.structured import REASK, dumps

    prompt = generation_prompt(templates, query=item["query"], rag=item["rag"], context_chars=cfg.rag.context_chars,
                               extra=item.get("extra"))
    t0 = time.perf_counter()
    out: dict[str, Any] = {"id": item["id"], "generation": None, "generation_json": None, "gen_status": "ok",
                           "gen_error": None, "generate_ms": None, "attempts": 0, "endpoint": None, "model": None,
                           "bad_endpoints": []}
    extra = structured.request_fields() if structured is not None else None
    tries = max(1, cfg.generation.response_format_attempts) if structured is not None else 1
    n_attempts = 0
    seen: list[Any] = []
    ask = prompt
    try:
        for i in range(tries):
            comp = client.chat(ask, cfg.generation.max_tokens, prefer=item.get("target"), extra=extra)
            n_attempts += len(comp.attempts)
            seen += list(comp.attempts)
            out.update(generation=comp.text, attempts=n_attempts, endpoint=comp.endpoint, model=comp.model,
                       bad_endpoints=bad_endpoints(seen))
            if structured is None:
                break
            value, error = structured.parse(comp.text)
            if error is None:
                out.update(generation_json=dumps(value), gen_status="ok", gen_error=None)
                break
            out.update(gen_status="invalid_output",
                       gen_error=f"reply does not match generation.response_format after {i + 1} request(s): {error}")
            ask = prompt + REASK.format(error=error[:200])
    except (RequestFailed, NoEndpointAvailable, Overloaded) as exc:
        failed = list(getattr(exc, "attempts", []) or [])
        out.update(generation=None, generation_json=None, gen_status="failed", gen_error=f"{type(exc).__name__}: {exc}",
                   attempts=n_attempts + len(failed), unavailable=isinstance(exc, NoEndpointAvailable),
                   overloaded=isinstance(exc, Overloaded), bad_endpoints=bad_endpoints(seen + failed),
                   retry_cause=retry_cause(exc))
    except Exception as exc:  # noqa: BLE001 - one bad record never fails the run
        out.update(generation=None, generation_json=None, gen_status="failed",
                   gen_error=f"internal error: {type(exc).__name__}: {exc}")
    out["generate_ms"] = (time.perf_counter() - t0) * 1000
    return out


def generation_worker_main(
    name: str, cfg: Config, endpoints: list[str], threads: int, inbox: Any, outbox: Any, parent_pid: int
) -> None:
    """Process entry point (spawned). Fatal errors are sent as ("ERROR", name, traceback text).

    Args:
        name: "gen-0", ...
        endpoints: generation endpoints (the pool's, or generation.endpoints).
        threads: most items main sends this process at once (= its threads and its client's per-endpoint limit).
        inbox: queue of work lists ({id, query, extra, rag, target}) or None (sentinel).
        outbox: the write end of this worker's own result pipe, receiving ("GEN", name, [result]).
        parent_pid: the main process; the worker exits if it disappears.
    """
    ignore_sigint()
    outbox = ResultChannel(outbox)
    start_heartbeat(outbox, name, cfg.run.heartbeat_interval_s, parent_pid)
    try:
        from pipeline.llm.client import LLMClient
        from pipeline.llm.prompts import load_templates

        key_env = cfg.generation.api_key_env or cfg.servers.api_key_env
        api_key = os.environ.get(key_env) if key_env else None
        threads = max(1, threads)
        client = LLMClient(endpoints, cfg.llm, api_key=api_key, max_concurrency=threads)
        templates = load_templates(cfg)
        structured = None
        if cfg.generation.response_format:
            from pipeline.llm.structured import StructuredOutput

            structured = StructuredOutput.from_file(cfg.generation.response_format)
    except BaseException:  # noqa: BLE001 - reported to main
        outbox.put(("ERROR", name, traceback.format_exc()))
        return
    outbox.put(("READY", name, {}))

    def work(item: dict) -> None:
        outbox.put(("GEN", name, [generate_one(client, cfg, templates, item, structured)]))

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    try:
        while True:
            items = get_work(inbox, parent_pid)
            if items is None:
                break
            for item in items:
                pool.submit(work, item)
    except BaseException:  # noqa: BLE001 - reported to main, which requeues or stops
        outbox.put(("ERROR", name, traceback.format_exc()))
    finally:
        pool.shutdown(wait=True)
