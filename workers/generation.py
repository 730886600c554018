"""The generation pool process: CPU only. It never imports torch, chromadb or sentence_transformers.

Each process takes :class:`pipeline.messages.WorkItem` lists (the record, its RAG result and ``target``, the
endpoint main routed it to: the one that produced the record's RAG answer while it is healthy), builds the
prompt (:mod:`pipeline.llm.prompts`: the shared prefix of instructions + the passages that fit the model's
context window + query, then the generation part, after rag_status "ok"; the query alone after "soft_fail"),
calls the target endpoint first through the LLM client (failover, retries, circuit breaker, adaptive concurrency
on 429/503) and sends one :class:`pipeline.messages.GenResult` per item.

Concurrency: main decides how many generations are in flight per endpoint (a total per endpoint shared by the
whole pool) and sends each process at most ``threads`` items; the process runs one thread per item in flight
(blocking HTTP: the threads wait on sockets, measured CPU per record in bench/saturation.py).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.config import Config
from pipeline.llm.outcome import NoEndpointAvailable, Overloaded, RequestFailed, bad_endpoints, retry_cause
from pipeline.llm.usage import FINISH_LENGTH
from pipeline.logs import LogSetup, setup_worker
from pipeline.messages import Fatal, GenResult, GenResults, Ready, WorkItem
from workers.protocol import ResultChannel, get_work, ignore_sigint, start_heartbeat

log = logging.getLogger(__name__)


def contexts_for_generation(client: Any, item: WorkItem, sizer: Any) -> int | None:
    """How many of the record's first passages its generation carries; None when it carries none by the failure
    rules (the RAG stage did not end "ok": the query goes alone).

    The RAG answer's count when the generation goes to the endpoint that answered it (its passages were sized for
    both calls: the same prompt prefix, reused from the server's cache); otherwise sized on the generation's own
    endpoint by ``sizer`` (a :class:`pipeline.llm.context.ContextSizer`), never more than the RAG answer had.
    Without a sizer: the RAG answer's count, else every passage.
    """
    from pipeline.llm.server_tokens import endpoint_key

    rag = item.rag
    if rag is None or rag.rag_status != "ok" or not rag.contexts:
        return None
    limit = rag.contexts_used
    if sizer is None:
        return limit if limit is not None else len(rag.contexts)
    target = item.target or client.endpoints[0]
    if limit is not None and rag.endpoint and endpoint_key(rag.endpoint) == endpoint_key(target):
        return limit
    contexts = rag.contexts if limit is None else rag.contexts[:limit]
    return sizer.for_generation(target, query=item.query, contexts=contexts, rag_answer=rag.rag_answer or "",
                                extra=item.extra)


def generate_one(client: Any, cfg: Config, templates: dict[str, str], item: WorkItem,
                 structured: Any = None, sizer: Any = None) -> GenResult:
    """Generate for one record; never raises for a per-record failure (it is recorded in the result).

    ``structured``: a :class:`pipeline.llm.structured.StructuredOutput` (``generation.response_format``) or None;
    ``sizer``: the process's :class:`pipeline.llm.context.ContextSizer` (:func:`contexts_for_generation`).
    """
    from pipeline.llm.prompts import generation_prompt
    from pipeline.llm.structured import REASK, dumps

    used = contexts_for_generation(client, item, sizer)
    prompt = generation_prompt(templates, query=item.query, rag=item.rag, contexts_used=used or 0, extra=item.extra)
    t0 = time.perf_counter()
    out = GenResult(item.id)
    extra = structured.request_fields() if structured is not None else None
    tries = max(1, cfg.generation.response_format_attempts) if structured is not None else 1
    n_attempts = 0
    seen: list[Any] = []
    usage = _Usage()
    ask = prompt
    try:
        for i in range(tries):
            usage.requests += 1
            comp = client.chat(ask, cfg.generation.max_tokens, prefer=item.target, extra=extra)
            n_attempts += len(comp.attempts)
            seen += list(comp.attempts)
            usage.add(comp)
            out.generation, out.attempts, out.endpoint, out.model = comp.text, n_attempts, comp.endpoint, comp.model
            out.bad_endpoints = bad_endpoints(seen)
            if structured is None:
                break
            value, error = structured.parse(comp.text)
            if error is None:
                out.generation_json, out.gen_status, out.gen_error = dumps(value), "ok", None
                break
            out.gen_status = "invalid_output"
            out.gen_error = f"reply does not match generation.response_format after {i + 1} request(s): {error}"
            if comp.finish_reason == FINISH_LENGTH:
                out.gen_error += (f" (the reply was cut off at generation.max_tokens = {cfg.generation.max_tokens}: "
                                  "finish_reason length; raise it)")
            ask = prompt + REASK.format(error=error[:200])
    except (RequestFailed, NoEndpointAvailable, Overloaded) as exc:
        failed = list(getattr(exc, "attempts", []) or [])
        out = GenResult(item.id, gen_status="failed", gen_error=f"{type(exc).__name__}: {exc}",
                        attempts=n_attempts + len(failed), endpoint=out.endpoint, model=out.model,
                        unavailable=isinstance(exc, NoEndpointAvailable), overloaded=isinstance(exc, Overloaded),
                        bad_endpoints=bad_endpoints(seen + failed), retry_cause=retry_cause(exc))
    except Exception as exc:  # noqa: BLE001 - one bad record never fails the run
        out = GenResult(item.id, gen_status="failed", gen_error=f"internal error: {type(exc).__name__}: {exc}",
                        attempts=out.attempts, endpoint=out.endpoint, model=out.model,
                        bad_endpoints=out.bad_endpoints)
    out.generate_ms = (time.perf_counter() - t0) * 1000
    out.contexts_used = used
    out.requests, out.prompt_tokens, out.completion_tokens = usage.requests, usage.prompt, usage.completion
    out.finish_reason = usage.finish_reason
    return out


class _Usage:
    """Token usage of one record's generation, summed over its replies (re-asks included); the finish reason is
    the last reply's. A count stays None until a reply reports it."""

    def __init__(self) -> None:
        self.requests = 0
        self.prompt: int | None = None
        self.completion: int | None = None
        self.finish_reason: str | None = None

    def add(self, comp: Any) -> None:
        """Add a :class:`pipeline.llm.client.Completion`'s usage."""
        if comp.prompt_tokens is not None:
            self.prompt = (self.prompt or 0) + comp.prompt_tokens
        if comp.completion_tokens is not None:
            self.completion = (self.completion or 0) + comp.completion_tokens
        self.finish_reason = comp.finish_reason


def generation_worker_main(
    name: str, cfg: Config, endpoints: list[str], threads: int, inbox: Any, outbox: Any, parent_pid: int,
    log_setup: Any = None,
) -> None:
    """Process entry point (spawned). A fatal error is sent as :class:`pipeline.messages.Fatal`.

    Args:
        name: "gen-0", ...
        endpoints: generation endpoints (the pool's, or generation.endpoints).
        threads: most items main sends this process at once (= its threads and its client's per-endpoint limit).
        inbox: queue of ``list[WorkItem]`` or None (sentinel).
        outbox: the write end of this worker's own result pipe, receiving ``GenResults``.
        parent_pid: the main process; the worker exits if it disappears.
        log_setup: the :class:`pipeline.logs.LogSetup` of this process (role, verbosity, its log file); None =
            role ``name``, default verbosity, no file.
    """
    ignore_sigint()
    outbox = ResultChannel(outbox)
    setup_worker(log_setup or LogSetup(name), outbox.put)
    log.debug("%s started (pid %d, %d threads)", name, os.getpid(), threads)
    start_heartbeat(outbox, name, cfg.run.heartbeat_interval_s, parent_pid)
    try:
        from pipeline.llm.client import LLMClient, request_seed
        from pipeline.llm.context import ContextSizer
        from pipeline.llm.prompts import load_templates
        from pipeline.llm.server_tokens import ServerTokens

        key_env = cfg.generation.api_key_env or cfg.servers.api_key_env
        api_key = os.environ.get(key_env) if key_env else None
        threads = max(1, threads)
        client = LLMClient(endpoints, cfg.llm, api_key=api_key, max_concurrency=threads, seed=request_seed(cfg))
        templates = load_templates(cfg)
        sizer = ContextSizer(cfg, templates, ServerTokens(cfg.rag.context_window_tokens, api_key=api_key))
        structured = None
        if cfg.generation.response_format:
            from pipeline.llm.structured import StructuredOutput

            structured = StructuredOutput.from_file(cfg.generation.response_format)
    except BaseException:  # noqa: BLE001 - reported to main
        outbox.put(Fatal(name, traceback.format_exc()))
        return
    outbox.put(Ready(name))

    def work(item: WorkItem) -> None:
        outbox.put(GenResults(name, [generate_one(client, cfg, templates, item, structured, sizer)]))

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    try:
        while True:
            items = get_work(inbox, parent_pid, client)
            if items is None:
                break
            for item in items:
                pool.submit(work, item)
    except BaseException:  # noqa: BLE001 - reported to main, which requeues or stops
        outbox.put(Fatal(name, traceback.format_exc()))
    finally:
        pool.shutdown(wait=True)
