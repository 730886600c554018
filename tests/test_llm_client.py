"""pipeline/llm/client.py against real llama.cpp servers (SmolLM2-135M-Instruct, CPU).

Failures are real: a server killed with SIGKILL, a port where nothing listens (a crashed server),
llama.cpp's own HTTP 400 (context length exceeded) and HTTP 500 (request validation error), real read
timeouts. max_tokens stays small (SmolLM2 does ~29 tokens/s on one thread).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from bench.bench_server import launch
from pipeline.config import LLMConfig
from pipeline.llm.client import Attempt, LLMClient, NoEndpointAvailable, RequestFailed
from tests.fixtures.llm import dead_endpoint, requires_llama

REPO = Path(__file__).resolve().parents[1]
FAST = LLMConfig(backoff_initial_s=0.05, backoff_max_s=0.2, read_timeout_s=60.0)

pytestmark = requires_llama


def test_chat_returns_text_with_usage_and_one_attempt(llama_endpoints):
    with LLMClient(llama_endpoints, FAST) as client:
        c = client.chat("Name one colour.", 8)
    assert c.text.strip()
    assert c.endpoint in llama_endpoints
    assert c.model == "SmolLM2-135M-Instruct.Q4_1"  # first id of /v1/models: the managed server's --alias
    assert [a.outcome for a in c.attempts] == ["ok"] and c.attempts[0].endpoint == c.endpoint
    assert 0 < c.completion_tokens <= 8 and c.prompt_tokens > 0
    assert c.finish_reason in ("stop", "length")
    assert c.latency_ms >= c.attempts[0].latency_ms > 0


def test_complete_and_prefer_route_to_the_chosen_endpoint(llama_endpoints):
    a, b = llama_endpoints
    with LLMClient(llama_endpoints, FAST) as client:
        c = client.complete("The capital of France is", 6, prefer=b + "/v1/")
        assert c.text.strip() and c.endpoint == b and len(c.attempts) == 1
        assert client.chat("Hi.", 4, prefer=a).endpoint == a
        assert client.chat("Hi.", 4, prefer=b).endpoint == b


def test_4xx_is_not_retried_nor_failed_over(llama_endpoints):
    # llama.cpp answers 400 "context_length_exceeded" for a prompt longer than n_ctx (2048 here).
    with LLMClient(llama_endpoints, dataclasses.replace(FAST, max_attempts=3)) as client:
        t0 = time.monotonic()
        with pytest.raises(RequestFailed, match="http_400") as err:
            client.chat("word " * 3000, 4)
        assert time.monotonic() - t0 < 10
        assert [a.outcome for a in err.value.attempts] == ["http_400"]
        assert "context" in err.value.attempts[0].detail
        assert not any(s["breaker_open"] or s["errors"] for s in client.stats().values())


def test_5xx_is_retried_on_every_endpoint_then_request_failed():
    # llama.cpp validates requests with 400s and does not answer 500 on demand, so the fault is injected into
    # two benchmark servers (bench/bench_server.py: a test double for a failing server, POST /fault).
    cfg = dataclasses.replace(FAST, max_attempts=2, breaker_failures=10)
    with launch(2, service_ms=10, capacity=4) as bench:
        for url in bench.urls:
            requests.post(url + "/fault", json={"status": 500, "for_s": 60}, timeout=5).raise_for_status()
        with LLMClient(bench.urls, cfg) as client:
            with pytest.raises(RequestFailed) as err:
                client.chat("Hi.", 4)
    attempts = err.value.attempts
    assert [a.outcome for a in attempts] == ["http_500"] * 4  # 2 passes x 2 endpoints (failover)
    assert {a.endpoint for a in attempts[:2]} == set(bench.urls)
    assert not isinstance(err.value, NoEndpointAvailable)  # servers answered: recoverable


def test_read_timeout_is_retried_and_recorded(llama_endpoints):
    cfg = dataclasses.replace(FAST, read_timeout_s=0.05, max_attempts=2, breaker_failures=10)
    with LLMClient(llama_endpoints[:1], cfg) as client:
        client._eps[llama_endpoints[0]].model = "m"  # skip the /v1/models lookup: time the generation only
        with pytest.raises(RequestFailed) as err:
            client.chat("Write a long story about a dragon.", 8)
    assert [a.outcome for a in err.value.attempts] == ["timeout", "timeout"]


def test_circuit_breaker_skips_a_dead_endpoint_then_probes_it(llama_endpoints):
    dead, live = dead_endpoint(), llama_endpoints[0]
    cfg = dataclasses.replace(FAST, breaker_failures=2, breaker_cooldown_s=1.0)
    with LLMClient([dead, live], cfg) as client:
        for _ in range(2):
            c = client.chat("Hi.", 4, prefer=dead)
            assert [(a.endpoint, a.outcome) for a in c.attempts] == [(dead, "connect_error"), (live, "ok")]
        assert client.stats()[dead]["breaker_open"]
        c = client.chat("Hi.", 4, prefer=dead)
        assert [a.endpoint for a in c.attempts] == [live]  # skipped while open
        time.sleep(1.1)
        c = client.chat("Hi.", 4, prefer=dead)
        assert [a.endpoint for a in c.attempts] == [dead, live]  # probed after the cool-down


def test_endpoints_up_ends_the_cooldown_of_an_open_breaker(llama_endpoints):
    """Main's probe saw the endpoint answer: the client's next request probes it, not after the cool-down."""
    dead, live = dead_endpoint(), llama_endpoints[0]
    cfg = dataclasses.replace(FAST, breaker_failures=1, breaker_cooldown_s=600.0)
    with LLMClient([dead, live], cfg) as client:
        client.chat("Hi.", 4, prefer=dead)
        assert client.stats()[dead]["breaker_open"]
        assert client.endpoints_up([live + "/v1"]) == []  # a closed breaker is left as it is
        assert [a.endpoint for a in client.chat("Hi.", 4, prefer=dead).attempts] == [live]
        assert client.endpoints_up([dead + "/v1/"]) == [dead]
        c = client.chat("Hi.", 4, prefer=dead)
        assert [(a.endpoint, a.outcome) for a in c.attempts] == [(dead, "connect_error"), (live, "ok")]
        assert client.stats()[dead]["breaker_open"]  # the probe failed: open again for the cool-down


def test_kill_9_during_request_fails_over_then_all_down_is_fatal_and_bounded(llama_server_factory):
    pool = llama_server_factory(2)
    a, b = pool.endpoints
    pid_a = pool.pids[0]
    cfg = LLMConfig(backoff_initial_s=0.5, backoff_max_s=2.0, max_attempts=3, breaker_failures=3)
    client = LLMClient(pool.endpoints, cfg)
    client.chat("Hi.", 2, prefer=a)  # warm: model name cached, connection open
    result: dict = {}
    busy_before = sum(psutil.Process(pid_a).cpu_times()[:2])
    t = threading.Thread(
        target=lambda: result.update(c=client.chat("Tell a long story about the sea.", 48, prefer=a))
    )
    t.start()
    # Wait until A is working on the request (an idle llama.cpp server uses no CPU), then SIGKILL it.
    deadline = time.monotonic() + 20
    while sum(psutil.Process(pid_a).cpu_times()[:2]) - busy_before < 0.15:
        assert time.monotonic() < deadline, "request never reached server A"
        time.sleep(0.02)
    os.killpg(pid_a, signal.SIGKILL)
    t.join(timeout=60)
    c = result["c"]
    assert c.endpoint == b and c.text.strip()
    assert [(x.endpoint, x.outcome) for x in c.attempts] == [(a, "connection_error"), (b, "ok")]

    # Now B dies too: a hard failure, typed as fatal, within a bounded time
    # (3 passes of refused connects + 2 backoffs of at most 0.5*2**n + 0.5 s each).
    os.killpg(pool.pids[1], signal.SIGKILL)
    time.sleep(0.2)
    t0 = time.monotonic()
    with pytest.raises(NoEndpointAvailable) as err:
        client.chat("Hi.", 4)
    assert time.monotonic() - t0 < 5.0
    assert {x.outcome for x in err.value.attempts} <= {"connect_error", "connection_error"}
    assert {x.endpoint for x in err.value.attempts} == {a, b}
    # Breakers are open now: the next request fails at once, without touching the network.
    t0 = time.monotonic()
    with pytest.raises(NoEndpointAvailable, match="open circuit breakers"):
        client.chat("Hi.", 4)
    assert time.monotonic() - t0 < 0.1
    client.close()


def test_per_endpoint_concurrency_limit_under_threads(llama_endpoints):
    from concurrent.futures import ThreadPoolExecutor

    ep = llama_endpoints[0]
    peaks = {}
    for limit in (1, 2):
        with LLMClient([ep], FAST, max_concurrency=limit) as client, ThreadPoolExecutor(4) as threads:
            results = list(threads.map(lambda _: client.chat("Hi.", 4), range(4)))
            assert len(results) == 4 and all(
                r.endpoint == ep and r.attempts[-1].outcome == "ok" for r in results
            )
            peaks[limit] = client.stats()[ep]["peak_in_flight"]
    assert peaks == {1: 1, 2: 2}


def test_client_concurrency_default_and_override():
    assert LLMClient(["http://x:1"], LLMConfig()).max_concurrency == 1
    assert LLMClient(["http://x:1"], LLMConfig(max_concurrency=3)).max_concurrency == 3
    assert LLMClient(["http://x:1"], LLMConfig(max_concurrency=3), max_concurrency=9).max_concurrency == 9


def test_errors_survive_pickling_with_their_attempts():
    attempts = [Attempt("http://a:1", "connect_error", 1.5, "refused")]
    for cls in (RequestFailed, NoEndpointAvailable):
        err = pickle.loads(pickle.dumps(cls("boom", attempts)))
        assert type(err) is cls and str(err) == "boom" and err.attempts == attempts
    assert NoEndpointAvailable("x").exit_code == 3


def test_client_module_imports_no_heavy_library():
    code = (
        "import sys, pipeline.llm.client\n"
        "print([m for m in ('torch', 'chromadb', 'sentence_transformers', 'pipeline.servers.pool') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
