"""The generation pool process: CPU only. It never imports torch, chromadb or sentence_transformers.

Each process takes items (the record + its RAG result), builds the prompt from the templates in configs/prompts
(context and RAG answer after rag_status "ok"; the original query alone after "soft_fail"), calls a generation
endpoint through the LLM client (retries, failover, circuit breaker) and returns one result per item:
    id: str; generation: str | None; generation_json: str | None (the parsed reply as compact JSON when
    generation.response_format is set and the reply validates); gen_status: "ok" | "failed" |
    "invalid_output" (the reply never matched generation.response_format, see workers.structured);
    gen_error: str | None; generate_ms: float; attempts: int; endpoint: str | None; model: str | None.
"""

from __future__ import annotations

import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.config import Config
from workers.protocol import get_work, ignore_sigint


def generate_one(client: Any, cfg: Config, templates: dict[str, str], item: dict, structured: Any = None) -> dict:
    """Generate for one record; never raises for a per-record failure (it is recorded).

    ``structured``: a :class:`workers.structured.StructuredOutput` (``generation.response_format``) or None.
    """
    from workers.llm_client import NoEndpointAvailable, RequestFailed
    from workers.prompts import format_context, render
    from workers.structured import REASK, dumps

    rag = item["rag"]
    if rag["rag_status"] == "ok":
        prompt = render(
            templates["context"],
            query=item["query"],
            context=format_context(rag["contexts"], cfg.rag.context_chars),
            rag_answer=rag.get("rag_answer") or "",
            extra=item.get("extra"),
        )
    else:
        prompt = render(templates["no_context"], query=item["query"], extra=item.get("extra"))
    t0 = time.perf_counter()
    out: dict[str, Any] = {"id": item["id"], "generation": None, "generation_json": None, "gen_status": "ok",
                           "gen_error": None, "generate_ms": None, "attempts": 0, "endpoint": None, "model": None}
    extra = structured.request_fields() if structured is not None else None
    tries = max(1, cfg.generation.response_format_attempts) if structured is not None else 1
    attempts = 0
    ask = prompt
    try:
        for i in range(tries):
            comp = client.chat(ask, cfg.generation.max_tokens, extra=extra)
            attempts += len(comp.attempts)
            out.update(generation=comp.text, attempts=attempts, endpoint=comp.endpoint, model=comp.model)
            if structured is None:
                break
            value, error = structured.parse(comp.text)
            if error is None:
                out.update(generation_json=dumps(value), gen_status="ok", gen_error=None)
                break
            out.update(gen_status="invalid_output",
                       gen_error=f"reply does not match generation.response_format after {i + 1} request(s): {error}")
            ask = prompt + REASK.format(error=error[:200])
    except (RequestFailed, NoEndpointAvailable) as exc:
        out.update(generation=None, generation_json=None, gen_status="failed", gen_error=f"{type(exc).__name__}: {exc}",
                   attempts=attempts + len(getattr(exc, "attempts", []) or []),
                   unavailable=isinstance(exc, NoEndpointAvailable))
    except Exception as exc:  # noqa: BLE001 - one bad record never fails the run
        out.update(generation=None, generation_json=None, gen_status="failed",
                   gen_error=f"internal error: {type(exc).__name__}: {exc}")
    out["generate_ms"] = (time.perf_counter() - t0) * 1000
    return out


def generation_worker_main(
    name: str, cfg: Config, endpoints: list[str], inbox: Any, outbox: Any, parent_pid: int
) -> None:
    """Process entry point (spawned). Fatal errors are sent as ("ERROR", name, traceback text).

    Args:
        name: "gen-0", ...
        endpoints: generation endpoints (the pool's, or generation.endpoints).
        inbox: queue of work lists ({id, query, extra, rag}) or None (sentinel).
        outbox: queue receiving ("GEN", name, [result]).
        parent_pid: the main process; the worker exits if it disappears.
    """
    ignore_sigint()
    try:
        from workers.llm_client import LLMClient
        from workers.prompts import load_template

        key_env = cfg.generation.api_key_env or cfg.servers.api_key_env
        api_key = os.environ.get(key_env) if key_env else None
        threads = max(1, cfg.generation.concurrency)
        client = LLMClient(endpoints, cfg.llm, api_key=api_key, max_concurrency=threads)
        templates = {
            "context": load_template(cfg.generation.prompt_file),
            "no_context": load_template(cfg.generation.fallback_prompt_file),
        }
        structured = None
        if cfg.generation.response_format:
            from workers.structured import StructuredOutput

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
