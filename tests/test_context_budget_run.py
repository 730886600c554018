"""The context budget with the real components: a real llama.cpp server (SmolLM2) reports its window per slot and
counts tokens as it does for a chat request; `rag-pipeline run` against a server with a small window cuts the
context (whole passages, best first), says how many passages each record sent (``contexts_used``), and the
manifest and the end summary count the records whose context was cut.

SGLang cannot run here (no GPU): its ``/v1/models`` and ``/tokenize`` answers are served by a small TEST DOUBLE
(:class:`_SGLangTokenize`, the fields of SGLang's TokenizeRequest/TokenizeResponse and ModelCard) to check that
they are read.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from pipeline.config import load_config
from pipeline.llm.context import ContextSizer
from pipeline.llm.prompts import load_templates, rag_answer_prompt
from pipeline.llm.server_tokens import LLAMACPP, SGLANG, UNREACHABLE, ServerTokens
from tests.fixtures.llm import dead_endpoint, requires_llama
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

pytestmark = [requires_llama, pytest.mark.slow]

SMALL_WINDOW = 1024


def _passages(n: int) -> list[dict]:
    docs = [json.loads(ln) for ln in (EXAMPLE / "corpus.jsonl").read_text().splitlines()[:n]]
    return [{"doc_id": d["_id"], "chunk_id": f"{d['_id']}#0", "text": d["text"], "score": 0.5} for d in docs]


def test_the_server_reports_its_window_and_counts_a_prompt_as_a_chat_request_does(llama_server_factory):
    (url,) = llama_server_factory(1, n_ctx=SMALL_WINDOW).endpoints
    tokens = ServerTokens(4096)
    info = tokens.endpoint(url)
    assert (info.window_tokens, info.window_source, info.counter) == (SMALL_WINDOW, "/props", LLAMACPP)
    tpl = load_templates(load_config())
    prompt = rag_answer_prompt(tpl, query="Does vitamin D prevent fractures?", contexts=_passages(2))
    pieces = [prompt[:100], prompt[100:700], prompt[700:]]
    counted = sum(tokens.count(url, pieces)) + info.template_tokens
    reply = requests.post(url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert counted == reply.json()["usage"]["prompt_tokens"]  # the server's own count of the same prompt
    assert tokens.count(url, []) == []

    # a server that cannot be reached: the configured window and the 4-characters estimate
    dead = dead_endpoint()
    info = ServerTokens(3000).endpoint(dead)
    assert (info.window_tokens, info.window_source, info.counter) == (3000, "rag.context_window_tokens", UNREACHABLE)
    assert ServerTokens(3000).count(dead, ["x" * 40, "y"]) == [10, 1]


class _SGLangTokenize(BaseHTTPRequestHandler):
    """TEST DOUBLE of SGLang's HTTP API (no GPU here): ``GET /v1/models`` with ``max_model_len``, ``POST
    /tokenize`` with a ``prompt`` list (one count per text) or ``messages`` (a chat template of 7 tokens); a toy
    tokenizer of one token per whitespace-separated word. llama.cpp's ``/props`` is absent (404)."""

    models_requests = 0

    def log_message(self, *_a) -> None:
        pass

    def _send(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.path == "/v1/models":
            type(self).models_requests += 1
            self._send(200, {"object": "list", "data": [{"id": "m", "max_model_len": 32768}]})
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/tokenize":
            self._send(404, {"detail": "Not Found"})
        elif "messages" in req:
            self._send(200, {"tokens": list(range(7)), "count": 7, "max_model_len": 32768})
        else:
            counts = [len(p.split()) for p in req["prompt"]]
            self._send(200, {"tokens": [list(range(n)) for n in counts], "count": counts, "max_model_len": 32768})


def test_sglang_style_tokenize_is_read():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _SGLangTokenize)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        tokens = ServerTokens(4096)
        threads = [threading.Thread(target=tokens.endpoint, args=(url,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _SGLangTokenize.models_requests == 1  # threads asking at once: one probe, the others wait for it
        info = tokens.endpoint(url + "/v1")
        assert (info.window_tokens, info.window_source, info.counter, info.template_tokens) == (
            32768, "/v1/models", SGLANG, 7)
        assert tokens.count(url, ["one two three", "four", ""]) == [3, 1, 0]
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_sizer_counts_only_when_the_prompt_may_not_fit(llama_server_factory):
    (url,) = llama_server_factory(1, n_ctx=SMALL_WINDOW).endpoints
    cfg = load_config()
    calls: list[int] = []

    class Counting(ServerTokens):
        def count(self, url: str, texts: list[str]) -> list[int]:
            calls.append(len(texts))
            return super().count(url, texts)

    sizer = ContextSizer(cfg, load_templates(cfg), Counting(4096))
    passages = _passages(6)
    used = sizer.for_rag_answer(url, query="Does vitamin D prevent fractures?", contexts=passages)
    assert 0 < used < 6 and calls == [3 + 6]  # one /tokenize request for the prompt parts and the 6 passages
    calls.clear()
    assert sizer.for_rag_answer(url, query="q", contexts=[{"text": "short passage"}]) == 1 and calls == []


def _run(tmp_path, name, url, example_store, overrides, *extra):
    records = write_records(tmp_path, 3, name=f"{name}.jsonl")
    out = tmp_path / name
    cfg = write_config(tmp_path, {"retrieval": {"top_k": 4}, "generation": {"num_processes": 1}, **overrides})
    proc, marker = start_run(run_args(records, out, cfg, "--endpoints", url, *store_args(example_store), *extra))
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert wait_no_survivors(marker) == []
    return read_rows(out), json.loads((out / ".rag-pipeline/manifest.json").read_text()), err


def test_a_small_window_cuts_the_context_to_whole_passages_and_the_run_says_so(
        tmp_path, example_store, llama_server_factory):
    (url,) = llama_server_factory(1, n_ctx=SMALL_WINDOW).endpoints
    rows, man, err = _run(tmp_path, "cut", url, example_store, {})
    cut = [r for r in rows if r["contexts_used"] < len(r["contexts"])]
    assert cut, [(r["contexts_used"], len(r["contexts"])) for r in rows]  # 4 whole abstracts never fit 1024
    for r in rows:
        assert r["rag_status"] == "ok" and r["gen_status"] == "ok", r
        assert 1 <= r["contexts_used"] <= len(r["contexts"]) == 4
        # both calls fit the window, and both carried the same passages (their prompts differ by the tails only)
        assert r["rag_prompt_tokens"] + 8 <= SMALL_WINDOW and r["gen_prompt_tokens"] + 8 <= SMALL_WINDOW, r
        assert abs(r["gen_prompt_tokens"] - r["rag_prompt_tokens"]) < 60, r
    c = man["contexts"]
    assert (c["cut"], c["rows_with_contexts_used"]) == (len(cut), 3)
    assert (c["passages_retrieved"], c["passages_used"]) == (12, sum(r["contexts_used"] for r in rows))
    assert f"{len(cut)} of 3 records had their context cut" in err and "servers.n_ctx" in err

    # a character cap no passage fits: the RAG answer is not asked (soft failure naming the cause), the
    # generation gets the query alone, and every record counts as cut
    rows, man, err = _run(tmp_path, "none", url, example_store, {"rag": {"max_tokens": 8, "context_chars": 100}})
    for r in rows:
        assert r["rag_status"] == "soft_fail" and r["contexts_used"] == 0 and r["rag_prompt_tokens"] is None, r
        assert "no retrieved passage fits" in r["rag_error"] and "rag.context_chars = 100" in r["rag_error"]
        assert r["gen_status"] == "ok" and r["gen_prompt_tokens"] < 100, r  # no passage in the prompt
    assert man["contexts"]["cut"] == 3 and "3 of 3 records had their context cut" in err


def test_retrieve_mode_sizes_the_context_in_the_generation(tmp_path, example_store, llama_server_factory):
    (url,) = llama_server_factory(1, n_ctx=SMALL_WINDOW).endpoints
    rows, man, _ = _run(tmp_path, "retrieve", url, example_store, {"rag": {"mode": "retrieve"}})
    assert any(r["contexts_used"] < len(r["contexts"]) for r in rows)
    for r in rows:
        assert r["rag_status"] == "ok" and r["gen_status"] == "ok" and r["rag_prompt_tokens"] is None, r
        assert 1 <= r["contexts_used"] <= 4 and r["gen_prompt_tokens"] + 8 <= SMALL_WINDOW, r
    assert man["contexts"]["cut"] == sum(r["contexts_used"] < len(r["contexts"]) for r in rows)
