"""`run --deterministic` on the CPU default: a re-run of the same records, with records in flight together, gives
the same rows; and the managed llama.cpp server it starts computes every prompt whole (no prompt-cache reuse).

Real components throughout: the managed xllamacpp server serving SmolLM2-135M-Instruct, the real pipeline
(retrieval from the session's example store, RAG answer, generation processes), Parquet rows.
"""

from __future__ import annotations

import dataclasses

import pytest
import requests

from pipeline.servers.pool import ServerPool
from tests.fixtures.llm import free_port_block, llama_config, requires_llama
from tests.runtools import (
    read_rows,
    run_args,
    start_run,
    store_args,
    wait_no_survivors,
    write_config,
    write_records,
)

pytestmark = [requires_llama, pytest.mark.slow]

#: the fields a re-run must reproduce (timings, endpoints and attempts may differ)
SAME = ("id", "contexts", "rag_status", "rag_answer", "gen_status", "generation", "generation_json")


def _ask_twice(url: str) -> list[tuple[int, int]]:
    """The same prompt twice: ``(prompt tokens computed by the server, prompt tokens)`` per request (llama.cpp
    reports the tokens it actually computed in ``timings.prompt_n``; a reused cached prefix is not computed)."""
    out = []
    for _ in range(2):
        body = {"messages": [{"role": "user", "content": "Name three colours of the rainbow."}], "max_tokens": 4,
                "temperature": 0}
        data = requests.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        out.append((data["timings"]["prompt_n"], data["usage"]["prompt_tokens"]))
    return out


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_server_has_one_slot_and_computes_each_prompt_whole(deterministic, tmp_path):
    cfg = llama_config(free_port_block(1), 1, n_parallel=4)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, deterministic=deterministic))
    with ServerPool(cfg, tmp_path / "logs") as pool:
        url = pool.endpoints[0]
        slots = requests.get(url + "/props", timeout=10).json()["total_slots"]
        (first, n), (second, n2) = _ask_twice(url)
    assert first == n == n2 and n > 5
    if deterministic:
        assert slots == 1 and second == n  # the repeated prompt is computed again, not taken from the cache
    else:
        assert slots == 4 and second < n  # the default server reuses the cached prompt


def test_two_concurrent_deterministic_runs_give_identical_rows(tmp_path, example_store):
    """6 records, 2 requests in flight on the one-slot server (the default: 1.25 x slots), 2 generation processes, sampling at
    temperature 0.7 (the per-request seed makes the sampled tokens repeat too): the second run's rows equal the
    first's, field by field."""
    records = write_records(tmp_path, 6)
    rows = []
    for i in range(2):
        cfg = write_config(tmp_path, {
            "servers": {"base_port": free_port_block(1), "n_threads": 1},
            "rag": {"max_tokens": 24}, "generation": {"max_tokens": 24, "num_processes": 2},
            "llm": {"temperature": 0.7}, "run": {"part_rows": 3},
        })
        out = tmp_path / f"out{i}"
        proc, marker = start_run(run_args(records, out, cfg, "--deterministic", *store_args(example_store)))
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert wait_no_survivors(marker) == []
        got = sorted(({k: r[k] for k in SAME} for r in read_rows(out)), key=lambda r: r["id"])
        assert len(got) == 6 and all(r["rag_status"] == "ok" and r["gen_status"] == "ok" for r in got), got
        rows.append(got)
    assert rows[0] == rows[1]
    assert len({r["generation"] for r in rows[0]}) > 1  # real, record-dependent text


def test_deterministic_with_endpoints_warns_that_the_servers_decide(tmp_path, example_store, llama_endpoints):
    records = write_records(tmp_path, 1)
    cfg = write_config(tmp_path, {"generation": {"num_processes": 1}})
    proc, marker = start_run(run_args(records, tmp_path / "out", cfg, "--deterministic", "--endpoints",
                                      llama_endpoints[0], *store_args(example_store)))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "deterministic: the endpoints given were not started by this run" in err
    assert wait_no_survivors(marker) == []
