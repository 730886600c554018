"""The RAG worker process: one per GPU (or per endpoint in attach/CPU mode).

It loads the embedding model once on its device and opens its own vector-store client (heavy resources are loaded
once per process role, never per record). Rank0 alone may write: it resets/ingests the collection before any other
worker starts (a local Chroma store is not multi-process safe), then reports READY.

Per micro-batch of records it embeds all queries in one call, searches top-k, and (``rag.mode =
"retrieve+answer"``) asks ITS OWN endpoint for a grounded answer with the passages that fit the model's context
window (:mod:`pipeline.llm.context`), keeping several requests in flight with a thread pool so a batching server
(SGLang) stays busy.

It sends one :class:`pipeline.messages.RagResult` per record (:class:`pipeline.messages.RagResults`): a
micro-batch's retrieval failures and soft failures at once, each grounded answer as it comes back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.config import Config
from pipeline.logs import LogSetup, setup_worker
from pipeline.messages import STORE_CAUSE, Fatal, RagResult, RagResults, Ready, WorkItem
from workers.protocol import ResultChannel, get_work, ignore_sigint, start_heartbeat

log = logging.getLogger(__name__)


def no_fit_error(cfg: Config, window_tokens: int) -> str:
    """``rag_error`` of a record none of whose retrieved passages fits the model's context window whole."""
    cap = f" or rag.context_chars = {cfg.rag.context_chars}" if cfg.rag.context_chars else ""
    return (f"no retrieved passage fits the model's context window ({window_tokens} tokens{cap}) beside the prompt "
            "and max_tokens: use smaller chunks (ingest.chunk_chars) or a larger window (servers.n_ctx on CPU)")


def _rag_llm_call(client: Any, cfg: Config, templates: dict[str, str], item: WorkItem, result: RagResult,
                  prefer: str | None, sizer: Any) -> RagResult:
    """Ask for a grounded answer with the passages that fit the model's window (``sizer``: the process's
    :class:`pipeline.llm.context.ContextSizer`); set the status by the failure rules (soft failure: no passage
    fits, answer too short; hard failure: the request failed after retries and failover)."""
    from pipeline.llm.outcome import (
        NoEndpointAvailable,
        Overloaded,
        RequestFailed,
        bad_endpoints,
        retry_cause,
    )
    from pipeline.llm.prompts import rag_answer_prompt

    endpoint = prefer or client.endpoints[0]
    used = sizer.for_rag_answer(endpoint, query=item.query, contexts=result.contexts, extra=item.extra)
    result.contexts_used = used
    if used == 0:
        result.rag_status = "soft_fail"
        result.rag_error = no_fit_error(cfg, sizer.tokens.endpoint(endpoint).window_tokens)
        return result
    prompt = rag_answer_prompt(templates, query=item.query, contexts=result.contexts[:used], extra=item.extra)
    t0 = time.perf_counter()
    result.requests = 1
    try:
        comp = client.chat(prompt, cfg.rag.max_tokens, prefer=prefer)
    except (RequestFailed, NoEndpointAvailable, Overloaded) as exc:
        attempts = getattr(exc, "attempts", []) or []
        result.rag_status = "hard_fail"
        result.rag_error = f"{type(exc).__name__}: {exc}"
        result.rag_llm_ms = (time.perf_counter() - t0) * 1000
        result.attempts = len(attempts)
        result.unavailable = isinstance(exc, NoEndpointAvailable)
        result.overloaded = isinstance(exc, Overloaded)
        result.bad_endpoints = bad_endpoints(attempts)
        result.retry_cause = retry_cause(exc)
        return result
    answer = (comp.text or "").strip()
    result.rag_answer, result.rag_llm_ms, result.attempts = answer, comp.latency_ms, len(comp.attempts)
    result.endpoint, result.model, result.bad_endpoints = comp.endpoint, comp.model, bad_endpoints(comp.attempts)
    result.prompt_tokens, result.completion_tokens = comp.prompt_tokens, comp.completion_tokens
    result.finish_reason = comp.finish_reason
    if len(answer) < cfg.rag.min_answer_chars:
        result.rag_status = "soft_fail"
        result.rag_error = f"RAG answer shorter than {cfg.rag.min_answer_chars} chars"
    return result


def _deliver(fut: Any, result: RagResult, send: Any) -> None:
    """Send a finished RAG-answer future; an unexpected exception becomes a hard failure of that record."""
    try:
        send(fut.result())
    except Exception as exc:  # noqa: BLE001 - one bad record never fails the run
        result.rag_status, result.rag_error = "hard_fail", f"internal error: {type(exc).__name__}: {exc}"
        send(result)


def rag_worker_main(
    name: str,
    rank0: bool,
    cfg: Config,
    endpoint: str | None,
    endpoints: list[str],
    device: str,
    cpu_threads: int,
    llm_concurrency: int,
    inbox: Any,
    outbox: Any,
    parent_pid: int,
    log_setup: Any = None,
) -> None:
    """Process entry point (spawned). Never raises: a fatal error is sent as :class:`pipeline.messages.Fatal`.

    Args:
        name: worker name used in messages ("rag-0", ...).
        rank0: this worker may reset/ingest the collection (single writer), before the others start.
        endpoint: this worker's own LLM endpoint (preferred for its RAG answers); None in retrieve mode.
        endpoints: every endpoint of the pool (failover targets).
        device: embedding device ("cpu", "cuda:0", ...).
        cpu_threads: torch threads of this process (on CPU and on GPU).
        llm_concurrency: most RAG-answer requests in flight (threads): the endpoint's in-flight total (main sends
            no more records than the endpoint has room for, generations of earlier records included).
        inbox: multiprocessing queue of ``list[WorkItem]`` or None (sentinel).
        outbox: the write end of this worker's own result pipe (see workers.protocol).
        parent_pid: the main process; the worker exits if it disappears.
        log_setup: the :class:`pipeline.logs.LogSetup` of this process (role, verbosity, its log file); None =
            role ``name``, default verbosity, no file.
    """
    ignore_sigint()
    outbox = ResultChannel(outbox)
    setup_worker(log_setup or LogSetup(name), outbox.put)
    start_heartbeat(outbox, name, cfg.run.heartbeat_interval_s, parent_pid)
    log.debug("%s started (pid %d, device %s, endpoint %s)", name, os.getpid(), device, endpoint)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    try:
        state = _startup(name, rank0, cfg, endpoint, endpoints, device, cpu_threads, llm_concurrency)
    except BaseException:  # noqa: BLE001 - every startup failure is reported to main as text
        outbox.put(Fatal(name, traceback.format_exc()))
        return
    outbox.put(Ready(name, state["detail"]))
    try:
        _loop(name, cfg, state, endpoint, inbox, outbox, parent_pid)
    except BaseException:  # noqa: BLE001 - reported to main, which decides (requeue/stop)
        outbox.put(Fatal(name, traceback.format_exc()))


def _rank0_prepare_store(name: str, cfg: Config, embedder: Any) -> dict[str, Any]:
    """Rank0 only: reset the collection if asked, ingest run.ingest (resolved by main: a user's file or a bundled
    example named by the user) into it. Returns what it did for the READY message."""
    from pipeline.corpus.ingest import ingest_source
    from pipeline.store.client import open_client, reset_collection

    done: dict[str, Any] = {}
    source = cfg.run.ingest
    if cfg.run.reset_collection:
        reset_collection(open_client(cfg.store), cfg.store.collection)
        log.warning("%s: collection %r reset", name, cfg.store.collection)
        done["reset"] = True
    from pipeline.retrieval.bm25 import BM25Settings, ensure_index

    bm25 = BM25Settings.from_config(cfg.retrieval)
    if source:
        log.info("%s: ingesting %s into collection %r", name, source, cfg.store.collection)
        summary = ingest_source(source, cfg.store, cfg.ingest, cfg.embedding, embedder=embedder, progress=False,
                                bm25=bm25)
        log.info("%s: %s", name, summary.line())
        done["ingest"] = summary.as_dict()
    elif cfg.retrieval.mode != "dense" and ensure_index(cfg.store, bm25):
        done["bm25_index"] = "built"  # a store without a current BM25 build: rank0 stores one for all workers
    return done


def _startup(
    name: str, rank0: bool, cfg: Config, endpoint: str | None, endpoints: list[str], device: str, cpu_threads: int,
    llm_concurrency: int,
) -> dict:
    from pipeline.errors import StoreError
    from pipeline.retrieval.embedding import load_embedder
    from pipeline.retrieval.retriever import Retriever, retriever_options

    embedder = load_embedder(device)
    detail: dict[str, Any] = {"device": device, "endpoint": endpoint}
    if rank0:
        # the single writer runs before any other worker starts (the barrier): it may use every core
        detail.update(_rank0_prepare_store(name, cfg, embedder))
    import torch

    # torch's default (all cores per process) oversubscribes the CPU when several workers, the generation
    # pool and the servers share it: measured 0.23 of the ideal throughput with 8 workers, vs 0.97 with 1.
    # On a GPU too: tokenisation and the CPU side of 8 workers would each start one thread per core.
    torch.set_num_threads(cpu_threads)
    detail["cpu_threads"] = cpu_threads
    retriever = Retriever(cfg.store, embedder, list(cfg.retrieval.collections) or None, **retriever_options(cfg))
    n = retriever.count()
    if n == 0:
        where = cfg.store.chroma_url or cfg.store.path
        raise StoreError(f"collection {cfg.store.collection!r} in {where} is empty: ingest a corpus first")
    detail["collection_count"] = n
    state: dict[str, Any] = {"retriever": retriever, "detail": detail, "client": None}
    if cfg.rag.mode == "retrieve+answer":
        from pipeline.llm.client import LLMClient, request_seed
        from pipeline.llm.prompts import load_templates

        order = ([endpoint] if endpoint else []) + [e for e in endpoints if e != endpoint]
        api_key = os.environ.get(cfg.servers.api_key_env) if cfg.servers.api_key_env else None
        from pipeline.llm.context import ContextSizer
        from pipeline.llm.server_tokens import ServerTokens

        client = LLMClient(order, cfg.llm, api_key=api_key, max_concurrency=llm_concurrency,
                           seed=request_seed(cfg))
        templates = load_templates(cfg)
        tokens = ServerTokens(cfg.rag.context_window_tokens, api_key=api_key)
        state.update(client=client, templates=templates, threads=llm_concurrency,
                     sizer=ContextSizer(cfg, templates, tokens))
    return state


def _loop(name: str, cfg: Config, state: dict, endpoint: str | None, inbox: Any, outbox: Any, parent_pid: int) -> None:
    from pipeline.errors import StoreError

    retriever = state["retriever"]
    client = state["client"]
    pool = ThreadPoolExecutor(max_workers=max(1, state.get("threads", 1)), thread_name_prefix=f"{name}-llm")
    lock = threading.Lock()

    def send(result: RagResult) -> None:
        with lock:
            outbox.put(RagResults(name, [result]))

    try:
        while True:
            items = get_work(inbox, parent_pid, client)
            if items is None:
                break
            t0 = time.perf_counter()
            error: str | None = None
            try:
                found = retriever.search([it.query for it in items], cfg.retrieval.top_k)
            except StoreError as exc:
                found, error = None, f"StoreError: {exc}"
            retrieve_ms = (time.perf_counter() - t0) * 1000
            ready: list[RagResult] = []
            for i, item in enumerate(items):
                result = RagResult(item.id, retrieve_ms=retrieve_ms)
                if found is None:
                    result.rag_status, result.rag_error, result.retry_cause = "hard_fail", error, STORE_CAUSE
                    ready.append(result)
                    continue
                qr = found[i]
                hits = [h for h in qr.hits if h.is_hit(cfg.retrieval.min_score, cfg.retrieval.min_bm25_score)]
                result.contexts = [
                    {"doc_id": h.doc_id, "chunk_id": h.chunk_id, "text": h.text, "score": float(h.score),
                     "dense_rank": h.dense_rank, "bm25_rank": h.bm25_rank} for h in hits
                ]
                if qr.source_errors:
                    errs = "; ".join(f"{k}: {v}" for k, v in sorted(qr.source_errors.items()))
                    result.rag_status, result.rag_error = "soft_fail", f"retrieval source error: {errs}"
                    result.retry_cause = STORE_CAUSE
                elif not hits:
                    result.rag_status = "soft_fail"
                    result.rag_error = f"no passage with score >= retrieval.min_score={cfg.retrieval.min_score}"
                if client is not None and result.rag_status == "ok":
                    fut = pool.submit(_rag_llm_call, client, cfg, state["templates"], item, result, endpoint,
                                      state["sizer"])
                    fut.add_done_callback(lambda f, r=result: _deliver(f, r, send))
                else:
                    ready.append(result)
            if ready:
                with lock:
                    outbox.put(RagResults(name, ready))
    finally:
        pool.shutdown(wait=True)
