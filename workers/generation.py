"""The generation pool process: CPU only. It never imports torch, chromadb or sentence_transformers.

Each process takes items (the record + its RAG result), builds the prompt from the templates in configs/prompts
(context and RAG answer after rag_status "ok"; the original query alone after "soft_fail"), calls a generation
endpoint through the LLM client (retries, failover, circuit breaker) and returns one result per item:
    id: str; generation: str | None; gen_status: "ok" | "failed"; gen_error: str | None;
    generate_ms: float; attempts: int; endpoint: str | None; model: str | None.
"""

from __future__ import annotations

import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.config import Config
from workers.protocol import ResultChannel, get_work, ignore_sigint, retry_cause, start_heartbeat


def generate_one(client: Any, cfg: Config, templates: dict[str, str], item: dict) -> dict:
    """Generate for one record; never raises for a per-record failure (it is recorded)."""
    from workers.llm_client import NoEndpointAvailable, RequestFailed
    from workers.prompts import format_context, render

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
    out: dict[str, Any] = {"id": item["id"], "generation": None, "gen_status": "ok", "gen_error": None,
                           "generate_ms": None, "attempts": 0, "endpoint": None, "model": None}
    try:
        comp = client.chat(prompt, cfg.generation.max_tokens)
    except (RequestFailed, NoEndpointAvailable) as exc:
        out.update(gen_status="failed", gen_error=f"{type(exc).__name__}: {exc}",
                   attempts=len(getattr(exc, "attempts", []) or []), unavailable=isinstance(exc, NoEndpointAvailable),
                   retry_cause=retry_cause(exc))
    except Exception as exc:  # noqa: BLE001 - one bad record never fails the run
        out.update(gen_status="failed", gen_error=f"internal error: {type(exc).__name__}: {exc}")
    else:
        out.update(generation=comp.text, attempts=len(comp.attempts), endpoint=comp.endpoint, model=comp.model)
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
        outbox: the write end of this worker's own result pipe, receiving ("GEN", name, [result]).
        parent_pid: the main process; the worker exits if it disappears.
    """
    ignore_sigint()
    outbox = ResultChannel(outbox)
    start_heartbeat(outbox, name, cfg.run.heartbeat_interval_s, parent_pid)
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
    except BaseException:  # noqa: BLE001 - reported to main
        outbox.put(("ERROR", name, traceback.format_exc()))
        return
    outbox.put(("READY", name, {}))

    def work(item: dict) -> None:
        outbox.put(("GEN", name, [generate_one(client, cfg, templates, item)]))

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
