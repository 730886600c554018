"""The benchmark server (bench/bench_server.py, a bench tool) really enforces its service time and capacity,
speaks the OpenAI API our LLM client uses, and holds many concurrent connections."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bench.bench_server import launch, serve
from pipeline.config import LLMConfig
from pipeline.llm.client import LLMClient


@pytest.fixture()
def server():
    (srv,) = serve(1, service_s=0.2, capacity=4)
    yield srv
    srv.shutdown()
    srv.server_close()


def test_openai_routes_and_llm_client(server):
    models = requests.get(server.url + "/v1/models", timeout=5).json()
    assert models["data"][0]["id"] == "bench-model"
    with LLMClient([server.url], LLMConfig(), max_concurrency=2) as client:
        chat = client.chat("Is the sky blue?", 5)
        comp = client.complete("Is the sky blue?", 64)
    assert chat.text and len(chat.text.split()) <= 5 and chat.model == "bench-model"
    assert comp.text and comp.completion_tokens == len(comp.text.split()) and comp.prompt_tokens == 4
    assert chat.latency_ms >= 200
    bad = requests.post(server.url + "/v1/chat/completions", data=b"{not json", timeout=5)
    assert bad.status_code == 400


def test_capacity_and_service_time_under_many_connections():
    """200 concurrent connections, capacity 20, 200 ms each: ~2 s in all, never more than 20 in service."""
    (srv,) = serve(1, service_s=0.2, capacity=20)
    n_requests = 200

    def one(i: int) -> float:
        t0 = time.perf_counter()
        with requests.Session() as s:
            r = s.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                       timeout=30)
        r.raise_for_status()
        return time.perf_counter() - t0

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n_requests) as ex:
            list(ex.map(one, range(n_requests)))
        wall = time.perf_counter() - t0
        stats = requests.get(srv.url + "/stats?services=1", timeout=5).json()
    finally:
        srv.shutdown()
        srv.server_close()
    ideal = n_requests * 0.2 / 20
    # capacity is enforced (never faster than the ideal, 20 in service at most); the upper bounds only catch a
    # server that serialises requests, with room for a loaded 2-core machine (sleep overshoot, thread start-up)
    assert ideal <= wall < ideal * 3, wall
    assert stats["served"] == n_requests and stats["peak_in_service"] == 20 and stats["peak_waiting"] > 0
    assert all(0.19 <= s1 - s0 < 0.6 for _, s0, s1, _ in stats["services"])


def test_launch_subprocess_servers():
    with launch(2, service_ms=50, capacity=2) as servers:
        assert len(servers.urls) == 2 and servers.urls[0] != servers.urls[1]
        for u in servers.urls:
            assert requests.get(u + "/health", timeout=5).text == "ok"
        t0 = time.time()
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda i: requests.post(servers.urls[i % 2] + "/v1/completions", json={"prompt": "p"},
                                                timeout=10).raise_for_status(), range(8)))
        window = servers.window(t0, time.time())
        assert window["per_s"] and 0 < window["util"] <= 1.0
        pid = servers.proc.pid
    assert servers.proc.poll() is not None, f"bench server {pid} still running"
