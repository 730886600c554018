"""The seed's "original design" (seed 001), rebuilt for the benchmarks only: not a part of the product.

A multiprocessing pool of P workers (spawn). Each worker loads the embedding model and opens the store once,
then takes ONE record at a time and does everything for it in sequence:

    retrieve (embed this one query, top-k from Chroma)  ->  RAG answer from the single RAG endpoint
    ->  generation  ->  next record

All RAG calls go to a single endpoint (``rag_endpoint``: server 0), as in the seed ("All RAG calls hit a
single GPU endpoint"). The seed does not say where generation went; to be generous to the baseline its
generation calls are spread over every endpoint (the LLM client's round-robin). The same components as the
pipeline: :class:`pipeline.retrieval.retriever.Retriever` and :class:`pipeline.llm.client.LLMClient` (one request at a time
per worker), the same prompt templates, the same failure rules in their simplest form (no hit above
min_score -> generate without context; a failed RAG call -> no generation).

There is no central queue with backpressure: all records are put in the task queue at once, as a
``Pool.imap_unordered`` would.
"""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BaselineConfig:
    store_path: str
    collection: str
    top_k: int = 5
    min_score: float = 0.0
    rag_max_tokens: int = 64
    gen_max_tokens: int = 64


def _worker(idx: int, bcfg: BaselineConfig, tasks: Any, results: Any) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    from pipeline.config import Config, LLMConfig, StoreConfig
    from pipeline.llm.client import LLMClient, LLMError
    from pipeline.llm.prompts import generation_prompt, load_templates, rag_answer_prompt
    from pipeline.messages import RagResult
    from pipeline.retrieval.embedding import load_embedder
    from pipeline.retrieval.retriever import Retriever

    retriever = Retriever(StoreConfig(path=bcfg.store_path, collection=bcfg.collection), load_embedder("cpu"))
    tpl = load_templates(Config())
    llm_cfg = LLMConfig()
    clients: dict[tuple[str, ...], LLMClient] = {}

    def client(eps: tuple[str, ...]) -> LLMClient:
        if eps not in clients:
            clients[eps] = LLMClient(list(eps), llm_cfg, max_concurrency=1)
        return clients[eps]

    results.put(("READY", idx, time.time()))
    while True:
        task = tasks.get()
        if task is None:
            return
        rid, query, rag_ep, gen_eps = task
        status = "ok"
        try:
            hits = [h for h in retriever.search([query], bcfg.top_k)[0].hits if h.score >= bcfg.min_score]
            ctx = [{"text": h.text} for h in hits]
            rag = RagResult(rid, rag_status="soft_fail")
            if hits:
                answer = client((rag_ep,)).chat(rag_answer_prompt(tpl, query=query, contexts=ctx),
                                                bcfg.rag_max_tokens).text
                rag = RagResult(rid, contexts=ctx, rag_answer=answer)
            else:
                status = "soft_fail"
            prompt = generation_prompt(tpl, query=query, rag=rag, contexts_used=len(rag.contexts))
            client(tuple(gen_eps)).chat(prompt, bcfg.gen_max_tokens)
        except LLMError as exc:
            status = f"failed: {exc}"
        results.put(("DONE", rid, time.time(), status))


class Seed001Pool:
    """P baseline workers; start once, then :meth:`run` record batches against any endpoints."""

    def __init__(self, processes: int, bcfg: BaselineConfig) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.tasks = ctx.Queue()
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(i, bcfg, self.tasks, self.results), daemon=True)
                      for i in range(processes)]
        for p in self.procs:
            p.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def wait_ready(self, timeout_s: float) -> float:
        """Block until every worker has loaded its model; return the time it took."""
        t0 = time.time()
        ready = 0
        while ready < len(self.procs):
            left = timeout_s - (time.time() - t0)
            if left <= 0 or not all(p.is_alive() for p in self.procs):
                raise RuntimeError(f"baseline pool: {ready}/{len(self.procs)} workers ready")
            try:
                msg = self.results.get(timeout=min(1.0, left))
            except queue.Empty:
                continue
            if msg[0] == "READY":
                ready += 1
        return time.time() - t0

    def run(self, records: list[tuple[str, str]], rag_endpoint: str, gen_endpoints: list[str],
            timeout_s: float) -> dict[str, Any]:
        """Process ``records`` [(id, query)]; return finish times (wall clock, sorted) and status counts."""
        t_start = time.time()
        for rid, q in records:
            self.tasks.put((rid, q, rag_endpoint, list(gen_endpoints)))
        done: list[float] = []
        statuses: dict[str, int] = {}
        while len(done) < len(records):
            if time.time() - t_start > timeout_s:
                raise RuntimeError(f"baseline: {len(done)}/{len(records)} records after {timeout_s:.0f} s")
            try:
                msg = self.results.get(timeout=1.0)
            except queue.Empty:
                if not all(p.is_alive() for p in self.procs):
                    raise RuntimeError("a baseline worker died") from None
                continue
            if msg[0] == "DONE":
                done.append(msg[2])
                key = msg[3] if msg[3] in ("ok", "soft_fail") else "failed"
                statuses[key] = statuses.get(key, 0) + 1
        return {"t_start": t_start, "finish_times": sorted(done), "statuses": statuses}

    def stop(self) -> None:
        for _ in self.procs:
            self.tasks.put(None)
        deadline = time.time() + 10
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.time()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
