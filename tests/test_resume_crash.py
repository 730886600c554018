"""Crash safety for real: kill -9 of the main process at random moments, then resume; exactly-once output and
no surviving child or server process (issue: resumable runs)."""

from __future__ import annotations

import json
import os
import random
import time

import pytest

from tests.fixtures.llm import free_port_block, requires_llama
from tests.runtools import (
    committed_parts,
    read_ids,
    run_args,
    start_run,
    store_args,
    wait_no_survivors,
    write_config,
    write_records,
)

pytestmark = [requires_llama, pytest.mark.slow]


def test_kill9_at_random_moments_then_resume_exactly_once(tmp_path, example_store):
    seed = int(os.environ.get("RAG_PIPELINE_TEST_SEED", time.time()))
    rng = random.Random(seed)
    records = write_records(tmp_path, 12)
    want = sorted(json.loads(ln)["id"] for ln in records.read_text().splitlines())
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"retrieval": {"query_batch_size": 2}, "run": {"queue_size": 2},
                                  "llm": {"max_concurrency": 1}})
    args = run_args(records, out, cfg, *store_args(example_store))
    history = []
    for attempt in range(5):
        # a managed llama.cpp server each time: it must die with the main process too
        proc, marker = start_run([*args, "--base-port", str(free_port_block(1))])
        delay_s = rng.uniform(1.0, 14.0)
        time.sleep(delay_s)
        proc.kill()
        proc.wait(timeout=30)
        left = wait_no_survivors(marker, timeout_s=20)
        assert left == [], f"seed {seed} attempt {attempt}: survivors {[p.cmdline()[:3] for p in left]}"
        ids = read_ids(out)  # every committed part is a whole, readable Parquet file
        assert len(ids) == len(set(ids)), f"seed {seed}: duplicate ids after kill {attempt}"
        assert set(ids) <= set(want)
        history.append((round(delay_s, 1), len(ids)))
    proc, marker = start_run([*args, "--base-port", str(free_port_block(1))])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"seed {seed} history {history}: {err[-3000:]}"
    ids = read_ids(out)
    assert sorted(ids) == want, f"seed {seed} history {history}"
    assert not list(out.glob("*.tmp"))
    assert len(committed_parts(out)) >= 1
    assert wait_no_survivors(marker) == []
    manifest = json.loads((out / ".rag-pipeline/manifest.json").read_text())
    assert manifest["complete"] is True and manifest["rows"] == 12


def test_changed_input_is_refused_and_overwrite_starts_afresh(tmp_path, example_store, llama_endpoints):
    records = write_records(tmp_path, 2)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"rag": {"mode": "retrieve"}})
    args = run_args(records, out, cfg, "--endpoints", ",".join(llama_endpoints), *store_args(example_store))
    proc, _ = start_run(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert len(read_ids(out)) == 2
    with records.open("a") as fh:
        fh.write(json.dumps({"id": "new", "query": "Is aspirin an anti-inflammatory drug?"}) + "\n")
    proc, _ = start_run(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "changed since the first run" in err and "Traceback" not in err
    proc, _ = start_run([*args, "--overwrite"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert sorted(read_ids(out)) == sorted([*(json.loads(x)["id"] for x in records.read_text().splitlines())])
