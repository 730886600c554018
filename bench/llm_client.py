"""Benchmark: generation tokens/s through pipeline.llm.client.LLMClient vs a minimal direct requests loop.

Against one real llama.cpp server (SmolLM2-135M-Instruct, started here unless --endpoint is given), the
same chat requests are sent (a) by a bare ``requests.Session.post`` loop and (b) through ``LLMClient`` at
the chosen concurrency (default: the llama.cpp default, 1 in flight, as the server answers one request at
a time), in alternating rounds so that machine load and the server's prompt cache affect both alike.
Prints tokens/s of both and the ratio client/direct (goal >= 0.95: the server is the limit, not the client).

    .venv/bin/python bench/llm_client.py [--requests 1] [--max-tokens 32] [--concurrency 1] [--rounds 24]
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config, with_overrides  # noqa: E402
from pipeline.llm.client import LLMClient  # noqa: E402
from pipeline.servers.pool import ServerPool  # noqa: E402

TOPICS = [
    "the ocean",
    "a mountain village",
    "bread baking",
    "volcanoes",
    "a lighthouse",
    "the night sky",
    "an old library",
    "a rainy city",
    "a desert road",
    "a small robot",
    "winter birds",
    "a river boat",
]


def prompts(n: int) -> list[str]:
    return [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}. ({i})" for i in range(n)]


def direct(endpoint: str, model: str, batch: list[str], max_tokens: int) -> tuple[int, float]:
    """Sequential bare requests; returns (completion tokens, seconds)."""
    with requests.Session() as s:
        t0 = time.perf_counter()
        tokens = 0
        for p in batch:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": p}],
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "stream": False,
            }
            r = s.post(endpoint + "/v1/chat/completions", json=body, timeout=(5, 300))
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]
        return tokens, time.perf_counter() - t0


def via_client(client: LLMClient, batch: list[str], max_tokens: int, threads: int) -> tuple[int, float]:
    """The same requests through LLMClient from ``threads`` threads; returns (completion tokens, seconds)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        done = list(ex.map(lambda p: client.chat(p, max_tokens), batch))
    return sum(c.completion_tokens or 0 for c in done), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1, help="requests per method per round")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=0, help="in-flight requests (0: llamacpp default)")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--endpoint", default="", help="use this running server instead of starting one")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cfg = load_config()
    conc = args.concurrency or cfg.servers.n_parallel  # one request per llama.cpp slot
    pool = None
    endpoint = args.endpoint.rstrip("/")
    if not endpoint:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = with_overrides(
            cfg, {"servers.backend": "llamacpp", "servers.cpu_servers": 1, "servers.base_port": port}
        )
        pool = ServerPool(cfg, tempfile.mkdtemp(prefix="bench-llm-"))
        (endpoint,) = pool.start()
    try:
        model = requests.get(endpoint + "/v1/models", timeout=10).json()["data"][0]["id"]
        client = LLMClient([endpoint], cfg.llm, max_concurrency=conc)
        batch = prompts(args.requests)
        direct(endpoint, model, batch[:2], args.max_tokens)  # warm-up (model loaded, caches primed)
        totals = {"direct": [0, 0.0], "client": [0, 0.0]}
        ratios = []
        for r in range(args.rounds):
            rate = {}
            order = ["direct", "client"] if r % 2 == 0 else ["client", "direct"]
            for name in order:
                if name == "direct":
                    tok, sec = direct(endpoint, model, batch, args.max_tokens)
                else:
                    tok, sec = via_client(client, batch, args.max_tokens, conc)
                totals[name][0] += tok
                totals[name][1] += sec
                rate[name] = tok / sec
                print(f"round {r} {name:<6}: {tok} tokens in {sec:.2f} s = {tok / sec:.1f} tokens/s")
            ratios.append(rate["client"] / rate["direct"])
        d = totals["direct"][0] / totals["direct"][1]
        c = totals["client"][0] / totals["client"][1]
        print(f"direct loop : {d:.2f} tokens/s ({totals['direct'][0]} tokens, {totals['direct'][1]:.1f} s)")
        print(
            f"LLMClient   : {c:.2f} tokens/s ({totals['client'][0]} tokens, {totals['client'][1]:.1f} s), "
            f"concurrency {conc}"
        )
        print(
            f"ratio client/direct: {c / d:.3f} overall, {statistics.median(ratios):.3f} median of rounds "
            f"{', '.join(f'{x:.2f}' for x in ratios)} (goal >= 0.95)"
        )
        client.close()
    finally:
        if pool is not None:
            pool.stop()


if __name__ == "__main__":
    main()
