"""`rag-pipeline run` end to end with real components: the example Chroma store, the packaged embedding model,
real llama.cpp servers (SmolLM2), real processes and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.fixtures.llm import requires_llama
from tests.runtools import (
    REPO,
    as_earlier_version,
    processes_with_marker,
    read_ids,
    read_rows,
    run_args,
    start_run,
    store_args,
    wait_for_parts,
    wait_no_survivors,
    write_config,
    write_records,
)

pytestmark = [requires_llama, pytest.mark.slow]


def test_twenty_records_twenty_rows_with_generations(tmp_path, example_store, llama_endpoints):
    records = write_records(tmp_path, 20)
    out = tmp_path / "out"
    cfg = write_config(tmp_path)
    proc, marker = start_run(
        run_args(records, out, cfg, "--endpoints", ",".join(llama_endpoints), *store_args(example_store))
    )
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    rows = read_rows(out)
    want = [json.loads(ln)["id"] for ln in records.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(want)
    for r in rows:
        assert r["rag_status"] == "ok", r
        assert r["gen_status"] == "ok", r
        assert r["generation"] and r["generation"].strip()
        assert r["contexts"] and all(c["dense_rank"] or c["bm25_rank"] for c in r["contexts"])  # hybrid default
        assert r["endpoint"] in llama_endpoints
        assert isinstance(r["claim_id"], int)  # passthrough field keeps its type
        assert r["retrieve_ms"] > 0 and r["generate_ms"] > 0 and r["attempts"] >= 2
    # the relevant SciFact abstract is retrieved for most claims (real retrieval, not a stub)
    qrels = {}
    for ln in (REPO / "data/example/qrels.tsv").read_text().splitlines()[1:]:
        q, d, _ = ln.split("\t")
        qrels.setdefault(q, set()).add(d)
    hits = sum(1 for r in rows if {c["doc_id"] for c in r["contexts"]} & qrels.get(str(r["claim_id"]), set()))
    assert hits >= 12, f"relevant abstract retrieved for only {hits}/20 claims"
    manifest = json.loads((out / ".rag-pipeline/manifest.json").read_text())
    assert manifest["complete"] is True and manifest["rows"] == 20
    assert manifest["counts"]["gen_status"] == {"ok": 20}
    assert manifest["latency_ms"]["generate"]["p95"] >= manifest["latency_ms"]["generate"]["p50"] > 0
    assert "p50" in err and "records/s" in err  # summary table on stderr
    assert wait_no_survivors(marker) == []

    # running again resumes: nothing left to do, nothing duplicated
    proc, _ = start_run(
        run_args(records, out, cfg, "--endpoints", ",".join(llama_endpoints), *store_args(example_store))
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert sorted(read_ids(out)) == sorted(want)
    assert json.loads((out / ".rag-pipeline/manifest.json").read_text())["this_invocation"]["processed"] == 0


def test_managed_server_and_soft_failure_path(tmp_path, example_store):
    """Default server handling (a llama.cpp server started and stopped by the run); a score threshold no passage
    reaches makes every record a soft failure that is still generated, without context."""
    records = write_records(tmp_path, 3)
    out = tmp_path / "out"
    cfg = write_config(tmp_path)
    from tests.fixtures.llm import free_port_block

    proc, marker = start_run(
        run_args(records, out, cfg, "--min-score", "0.99", "--base-port", str(free_port_block(1)), *store_args(example_store))
    )
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    rows = read_rows(out)
    assert len(rows) == 3
    for r in rows:
        assert r["rag_status"] == "soft_fail"
        assert "min_score" in r["rag_error"]
        assert r["contexts"] == [] and r["rag_answer"] is None
        assert r["gen_status"] == "ok" and r["generation"].strip()
    assert (out / ".rag-pipeline/logs").is_dir() and list((out / ".rag-pipeline/logs").iterdir())
    assert wait_no_survivors(marker) == []  # the managed server is gone too


def test_endpoint_killed_during_run_pauses_then_stops_resumable_without_failure_rows(
        tmp_path, example_store, llama_endpoints, llama_server_factory):
    """The RAG workers' only endpoint is killed mid-run (generation uses the session servers): records finished
    before keep their rows; the rest are NOT burnt into hard failures: RAG dispatch pauses, and after
    run.max_outage_s the run stops with exit 75; resuming with a live endpoint completes every record."""
    pool = llama_server_factory(1)
    records = write_records(tmp_path, 10)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"servers": {"endpoints": pool.endpoints, "health_interval_s": 0.5},
                                  "llm": {"max_concurrency": 1}, "run": {"max_outage_s": 8.0},
                                  "generation": {"endpoints": llama_endpoints}})
    proc, marker = start_run(run_args(records, out, cfg, *store_args(example_store)))
    wait_for_parts(out, 1, proc)
    for pid in pool.pids:
        os.killpg(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "rag dispatch paused" in err and "run.max_outage_s" in err and "Traceback" not in err
    rows = read_rows(out)
    assert rows, "rows finished before the kill must be kept"
    assert all(r["rag_status"] == "ok" and r["gen_status"] == "ok" for r in rows)
    assert wait_no_survivors(marker) == []
    proc, marker = start_run(run_args(records, out, cfg, "--endpoints", ",".join(llama_endpoints),
                                      *store_args(example_store)))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(json.loads(x)["id"] for x in records.read_text().splitlines())
    assert all(r["rag_status"] == "ok" and r["gen_status"] == "ok" for r in rows)
    assert wait_no_survivors(marker) == []


def test_rank0_failure_stops_fast_with_its_message(tmp_path, llama_endpoints):
    bad_store = tmp_path / "corrupt-store"
    bad_store.mkdir()
    (bad_store / "chroma.sqlite3").write_bytes(b"this is not a sqlite database" * 100)
    records = write_records(tmp_path, 3)
    t0 = time.monotonic()
    proc, marker = start_run(
        [
            "--input",
            str(records),
            "--output",
            str(tmp_path / "out"),
            "--endpoints",
            ",".join(llama_endpoints),
            "--store",
            str(bad_store),
            "--collection",
            "x",
        ]
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 5, err
    assert "RAG worker 0 (rank0) failed during startup" in err
    assert "StoreError" in err or "store" in err.lower()
    assert "Traceback" not in err  # one clear message; the traceback is kept in a file
    assert "Traceback" in (tmp_path / "out" / ".rag-pipeline/logs" / "rank0-error.txt").read_text()
    assert time.monotonic() - t0 < 120
    assert wait_no_survivors(marker) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_commits_and_resumes_exactly_once(tmp_path, example_store, llama_endpoints, sig):
    records = write_records(tmp_path, 16)
    out = tmp_path / "out"
    # small micro-batches and backlog so that most records are still unread when the signal arrives
    cfg = write_config(tmp_path, {"retrieval": {"query_batch_size": 2}, "run": {"queue_size": 2},
                                  "llm": {"max_concurrency": 1}})
    args = run_args(records, out, cfg, "--endpoints", ",".join(llama_endpoints), *store_args(example_store))
    proc, marker = start_run(args)
    wait_for_parts(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert wait_no_survivors(marker) == []
    first = read_ids(out)
    assert 2 <= len(first) < 16 and len(set(first)) == len(first)
    manifest = json.loads((out / ".rag-pipeline/manifest.json").read_text())
    assert manifest["complete"] is False and manifest["interrupted_by"]
    assert not list(out.glob("*.tmp"))
    if sig == signal.SIGTERM:  # resumed as after an upgrade: the directory in an earlier version's layout
        as_earlier_version(out)

    proc, marker = start_run(args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    ids = read_ids(out)
    assert len(ids) == 16 and len(set(ids)) == 16
    assert set(first) <= set(ids)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("part-")) == [".rag-pipeline"]
    assert json.loads((out / ".rag-pipeline/manifest.json").read_text())["complete"] is True


def test_generation_pool_never_imports_heavy_libraries(llama_endpoints):
    """The CPU generation code path, run for real against a server, loads no torch/chromadb/sentence-transformers."""
    code = f"""
import sys, json
from pipeline.config import load_config
from workers.generation import generate_one
from pipeline.llm.client import LLMClient
from pipeline.llm.prompts import load_templates
cfg = load_config()
client = LLMClient({llama_endpoints!r}, cfg.llm)
tpl = load_templates(cfg)
from pipeline.messages import RagResult, WorkItem
item = WorkItem("1", "What is aspirin?", rag=RagResult("1", rag_answer="a drug",
        contexts=[{{"doc_id": "d", "chunk_id": "d#0", "text": "Aspirin is a drug.", "score": 0.9}}]))
import dataclasses
cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, max_tokens=4))
from pipeline.llm.context import ContextSizer
from pipeline.llm.server_tokens import ServerTokens
sizer = ContextSizer(cfg, tpl, ServerTokens(cfg.rag.context_window_tokens))
out = generate_one(client, cfg, tpl, item, sizer=sizer)
assert out.contexts_used == 1, out
print(json.dumps({{"status": out.gen_status, "heavy": [m for m in ("torch", "chromadb", "sentence_transformers") if m in sys.modules]}}))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"status": "ok", "heavy": []}


def test_no_orphans_helper_sees_a_live_tree(tmp_path):
    """Guard for the orphan checks above: the marker search finds a live child process."""
    env = {**os.environ, "RAG_PIPELINE_TEST_MARKER": "guard-" + tmp_path.name}
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        assert [x.pid for x in processes_with_marker("guard-" + tmp_path.name)] == [p.pid]
    finally:
        p.kill()
        p.wait()


def test_managed_server_killed_mid_run_is_restarted(tmp_path, example_store):
    """A managed llama.cpp server killed with SIGKILL mid-run is restarted by the run; every record still gets
    exactly one row and records after the restart are generated again."""
    import psutil

    from tests.fixtures.llm import free_port_block

    records = write_records(tmp_path, 10)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"llm": {"max_concurrency": 1, "breaker_cooldown_s": 1.0},
                                  "retrieval": {"query_batch_size": 2}, "run": {"queue_size": 2}})
    proc, marker = start_run(run_args(records, out, cfg, "--base-port", str(free_port_block(1)), *store_args(example_store)))
    wait_for_parts(out, 1, proc)
    before = len(read_ids(out))
    servers = [p for p in processes_with_marker(marker) if "pipeline.servers.cpu_server" in " ".join(p.cmdline())]
    assert len(servers) == 1
    servers[0].kill()
    psutil.wait_procs(servers, timeout=10)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "restarting" in err
    # the restarted server is the same server: not one joining the run (that would start a second RAG worker)
    assert "joined the run" not in err and " died " not in err, err[-3000:]
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(json.loads(x)["id"] for x in records.read_text().splitlines())
    ok = [r for r in rows if r["gen_status"] == "ok"]
    assert len(ok) > before, "records after the restart must be generated"
    assert wait_no_survivors(marker) == []


def test_on_bad_record_skip_writes_rejected_lines_and_runs_the_rest(tmp_path, example_store, llama_endpoints):
    records = tmp_path / "in.jsonl"
    records.write_text(
        json.dumps({"id": "a", "query": "Aspirin reduces the risk of colorectal cancer."}) + "\n"
        + '{"id": "b", "query": \n'
        + json.dumps({"id": "c", "query": ""}) + "\n"
        + json.dumps({"id": "d", "query": "Vitamin D deficiency is associated with depression."}) + "\n"
    )
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"rag": {"mode": "retrieve"}})
    proc, _ = start_run(run_args(records, out, cfg, "--on-bad-record", "skip", "--endpoints", ",".join(llama_endpoints), *store_args(example_store)))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == ["a", "d"]
    assert all(r["rag_answer"] is None and r["contexts"] and r["generation"] for r in rows)  # retrieve mode
    rejected = [json.loads(x) for x in (out / ".rag-pipeline/rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], "malformed JSON" in r["error"]) for r in rejected][0] == (2, True)
    assert rejected[1]["line"] == 3 and "field 'query'" in rejected[1]["error"]


@pytest.mark.parametrize("role", ["rag", "gen"])
def test_worker_killed_mid_run_is_replaced_and_its_records_requeued(tmp_path, example_store, llama_endpoints, role):
    """SIGKILL a RAG worker (the process holding torch: the largest) or a generation process mid-run: main notices
    through the process sentinel, requeues its in-flight records, starts a replacement; every record ends with
    exactly one row."""
    import psutil

    records = write_records(tmp_path, 10)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"retrieval": {"query_batch_size": 2}, "run": {"queue_size": 2},
                                  "llm": {"max_concurrency": 1}})
    proc, marker = start_run(run_args(records, out, cfg, "--endpoints", ",".join(llama_endpoints), *store_args(example_store)))
    wait_for_parts(out, 1, proc)
    workers = [p for p in processes_with_marker(marker)
               if "spawn_main" in " ".join(p.cmdline()) and p.pid != proc.pid]
    workers.sort(key=lambda p: p.memory_info().rss, reverse=True)
    victim = workers[0] if role == "rag" else workers[-1]
    victim.kill()
    psutil.wait_procs([victim], timeout=10)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"{role}-" in err and "died" in err and "requeueing" in err
    ids = read_ids(out)
    assert sorted(ids) == sorted(json.loads(x)["id"] for x in records.read_text().splitlines())
    assert all(r["gen_status"] == "ok" for r in read_rows(out))
    assert wait_no_survivors(marker) == []
