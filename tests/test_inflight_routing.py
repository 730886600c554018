"""Issue 8 items 1-2: prompts that share the server's prefix cache, generation routed to the RAG answer's endpoint
(failover when it fails), adaptive concurrency on 429/503 (no failure row, no retry storm).

Servers: the benchmark server (bench/bench_server.py) stands in for GPU servers (SGLang cannot run here): it records
every prompt it served, answers 429 above its capacity when asked, and injects 500s for matching prompts (a fault
that cannot be produced on demand by a real server). Retrieval and the pipeline are the real ones.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bench.bench_server import serve
from pipeline.config import LLMConfig, load_config
from pipeline.llm.client import LLMClient, inflight_per_endpoint, probe_batch
from pipeline.llm.prompts import generation_prompt, load_templates, rag_answer_prompt, shared_prefix
from pipeline.messages import RagResult
from tests.runtools import (
    EXAMPLE,
    read_rows,
    run_args,
    start_run,
    store_args,
    wait_no_survivors,
    write_config,
    write_records,
)


def _contexts(n: int = 3) -> list[dict]:
    docs = [json.loads(ln) for ln in (EXAMPLE / "corpus.jsonl").read_text().splitlines()[:n]]
    return [{"doc_id": d["_id"], "chunk_id": f"{d['_id']}#0", "text": d["text"], "score": 0.5} for d in docs]


def test_both_llm_calls_of_a_record_start_with_the_same_bytes():
    cfg = load_config()
    tpl = load_templates(cfg)
    query = "Vitamin D deficiency increases the risk of fractures."
    contexts = _contexts()
    rag_p = rag_answer_prompt(tpl, query=query, contexts=contexts)
    gen_p = generation_prompt(tpl, query=query, contexts_used=len(contexts),
                              rag=RagResult("r1", contexts=contexts, rag_answer="Yes, it does."))
    prefix = shared_prefix(tpl, query=query, contexts=contexts)
    assert rag_p.startswith(prefix) and gen_p.startswith(prefix)
    # the shared part holds the instructions, then the context, then the query; the prompts differ only after it
    assert prefix.index(contexts[0]["text"][:200]) < prefix.index(query)
    assert len(prefix) > 0.9 * min(len(rag_p), len(gen_p)) - 300
    assert rag_p[len(prefix):] != gen_p[len(prefix):] and "Yes, it does." in gen_p[len(prefix):]
    # after a soft failure the generation has no context
    soft = generation_prompt(tpl, query=query, contexts_used=len(contexts),
                             rag=RagResult("r1", rag_status="soft_fail", contexts=contexts))
    assert contexts[0]["text"][:100] not in soft and query in soft
    # a generation that carries fewer passages (sized on another endpoint) carries the first ones, whole
    two = generation_prompt(tpl, query=query, contexts_used=2, rag=RagResult("r1", contexts=contexts, rag_answer="x"))
    assert contexts[1]["text"].strip() in two and contexts[2]["text"][:100] not in two
    assert generation_prompt(tpl, query=query, contexts_used=0, rag=RagResult("r1", contexts=contexts)) == \
        generation_prompt(tpl, query=query, contexts_used=3, rag=RagResult("r1", rag_status="soft_fail"))


def test_in_flight_sizing_from_the_backend():
    assert inflight_per_endpoint(LLMConfig(), None) == 320  # unknown server: 1.25 x 256
    assert inflight_per_endpoint(LLMConfig(), 4) == 5  # llama.cpp with 4 slots
    assert inflight_per_endpoint(LLMConfig(max_concurrency=7), 1000) == 7  # --max-concurrency wins
    (srv,) = serve(1, service_s=0.01, capacity=4)
    try:
        assert probe_batch(srv.url, timeout_s=2) is None  # no /get_server_info nor /props: unknown
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture()
def two_servers():
    # slow enough that rank0 (started first, alone until the barrier) does not finish every record by itself
    servers = serve(2, service_s=0.5, capacity=2, record_prompts=True)
    yield servers
    for s in servers:
        s.shutdown()
        s.server_close()


def _served(srv) -> list[str]:
    return requests.get(srv.url + "/stats?prompts=1", timeout=10).json()["prompts"]


RAG_MARKER = load_templates(load_config())["rag"][:30]  # the start of the RAG answer's own part


def _split(prompts: list[str], gen_marker: str) -> tuple[set[str], set[str]]:
    """(shared prefixes of RAG-answer prompts, shared prefixes of generation prompts) among served prompts."""
    rag, gen = set(), set()
    for p in prompts:
        if gen_marker in p:
            gen.add(p[: p.rindex(gen_marker)])
        else:
            rag.add(p[: p.rindex(RAG_MARKER)])
    return rag, gen


@pytest.mark.slow
def test_generation_goes_to_the_rag_answer_endpoint_and_fails_over(tmp_path, example_store, two_servers):
    a, b = two_servers
    gen_marker = "Draft answer:"
    assert gen_marker in load_templates(load_config())["generate"]
    records = write_records(tmp_path, 40)
    cfg = write_config(tmp_path, {"retrieval": {"min_score": -1.0, "query_batch_size": 2},
                                  "llm": {"max_concurrency": 2}})
    urls = f"{a.url},{b.url}"
    proc, marker = start_run(run_args(records, tmp_path / "out", cfg, "--endpoints", urls, *store_args(example_store)))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 40 and all(r["gen_status"] == "ok" and r["rag_status"] == "ok" for r in rows)
    rag_a, gen_a = _split(_served(a), gen_marker)
    rag_b, gen_b = _split(_served(b), gen_marker)
    assert len(rag_a | rag_b) == 40 and rag_a and rag_b  # both endpoints answered RAG prompts
    # every generation went to the endpoint that produced its RAG answer, whose prompt it starts with
    assert gen_a == rag_a and gen_b == rag_b
    assert all("Passages:\n[1] " in p for p in rag_a)
    assert wait_no_survivors(marker) == []

    # endpoint a fails every generation (500): those records' generations go to b, no record fails
    requests.post(a.url + "/stats/reset", timeout=5)
    requests.post(b.url + "/stats/reset", timeout=5)
    requests.post(a.url + "/fault", json={"status": 500, "for_s": 600, "match": gen_marker}, timeout=5)
    proc, marker = start_run(run_args(records, tmp_path / "out2", cfg, "--endpoints", urls,
                                      *store_args(example_store)))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    rows = read_rows(tmp_path / "out2")
    assert len(rows) == 40 and all(r["gen_status"] == "ok" for r in rows), [r["gen_error"] for r in rows][:3]
    rag_a, gen_a = _split(_served(a), gen_marker)
    rag_b, gen_b = _split(_served(b), gen_marker)
    assert rag_a and not gen_a  # a produced RAG answers but no generation succeeded there
    assert rag_a <= gen_b and {r["endpoint"] for r in rows} == {b.url}
    assert wait_no_survivors(marker) == []


def test_client_backs_off_an_endpoint_answering_429_and_no_request_fails():
    """32 callers, a server of capacity 4 that answers 429 above it: every request succeeds, the client's limit
    for the endpoint drops to about the capacity, and rejections stay a small multiple of the requests."""
    (srv,) = serve(1, service_s=0.1, capacity=4, reject_status=429)
    cfg = dataclasses.replace(LLMConfig(), max_attempts=1, backoff_initial_s=0.1, backoff_max_s=1.0)
    try:
        with LLMClient([srv.url], cfg, max_concurrency=32) as client, ThreadPoolExecutor(32) as pool:
            comps = list(pool.map(lambda i: client.chat(f"q{i}", 4), range(96)))
            st = client.stats()[srv.url]
        server = requests.get(srv.url + "/stats", timeout=5).json()
    finally:
        srv.shutdown()
        srv.server_close()
    assert len(comps) == 96 and all(c.text for c in comps)
    assert server["served"] == 96 and server["peak_in_service"] <= 4
    assert st["limit"] <= 12 and st["overloads"] == server["rejected"]
    # without the adaptive limit every one of the 28 callers above capacity would be rejected every backoff
    assert server["rejected"] <= 3 * server["served"], server


def test_retry_after_holds_the_endpoint_then_succeeds():
    (srv,) = serve(1, service_s=0.05, capacity=2)
    requests.post(srv.url + "/fault", json={"status": 503, "for_s": 1.0, "retry_after_s": 1}, timeout=5)
    cfg = dataclasses.replace(LLMConfig(), max_attempts=1, breaker_failures=1)
    try:
        with LLMClient([srv.url], cfg, max_concurrency=8) as client, ThreadPoolExecutor(8) as pool:
            t0 = time.monotonic()
            comps = list(pool.map(lambda i: client.chat(f"q{i}", 4), range(8)))
            took = time.monotonic() - t0
            st = client.stats()[srv.url]
    finally:
        srv.shutdown()
        srv.server_close()
    assert all(c.text for c in comps) and took >= 1.0
    assert not st["breaker_open"] and st["overloads"] <= 16  # at most ~2 tries per request while held
