"""`run --retry-failed`: failed rows are re-processed and replaced exactly once, also across
kill -9 (of the retry run, and of the step that applies the replacement rows to the parts)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import RunError
from pipeline.output import OutputDir, input_fingerprint, read_rows, row_schema
from pipeline.output.migrate import migrate
from tests.fixtures.llm import requires_llama
from tests.readers import READERS, assert_each_once
from tests.runtools import (
    REPO,
    run_args,
    start_run,
    store_args,
    wait_no_survivors,
    write_config,
    write_records,
)


def _rows(ids: list[str], gen_status: str, text: str = "") -> pa.Table:
    rows = [{"id": i, "query": f"q{i}", "rag_status": "ok", "gen_status": gen_status, "generation": text or None,
             "contexts": [{"doc_id": "d", "chunk_id": "c", "text": "x" * 200, "score": 0.5}]} for i in ids]
    return pa.Table.from_pylist(rows, schema=row_schema({}))


@pytest.fixture
def od(tmp_path: Path) -> OutputDir:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i), "query": f"q{i}"}) + "\n" for i in range(40)))
    d = OutputDir(tmp_path / "out")
    d.prepare(input_path=inp, fingerprint=input_fingerprint(inp), shard=None, total_records=40, config={},
              overwrite=False)
    return d


def test_failed_ids_and_apply_replaces_each_row_once_in_place(od: OutputDir) -> None:
    for k in range(4):  # parts of 10 rows; every third row failed
        ids = [str(i) for i in range(10 * k, 10 * k + 10)]
        od.commit_part(pa.concat_tables([_rows([i], "failed" if int(i) % 3 == 0 else "ok") for i in ids]))
    failed = od.failed_ids()
    assert failed == {str(i) for i in range(40) if i % 3 == 0}
    before = [pq.read_table(p, columns=["id"]).column("id").to_pylist() for p in od.parts()]
    od.commit_retry_part(_rows(sorted(failed)[:7], "ok", "new"))
    od.commit_retry_part(_rows(sorted(failed)[7:], "ok", "new"))
    with pytest.raises(RunError, match="already retried"):
        od.commit_retry_part(_rows([sorted(failed)[0]], "ok"))
    with pytest.raises(RunError, match="without a committed row"):
        od.commit_retry_part(_rows(["nope"], "ok"))
    assert od.apply_retries() == len(failed)
    assert od.retry_parts() == []
    after = [pq.read_table(p, columns=["id"]).column("id").to_pylist() for p in od.parts()]
    assert after == before  # same parts, same row order
    rows = read_rows(od.path).to_pylist()
    assert len(rows) == 40 and len({r["id"] for r in rows}) == 40
    assert {r["id"] for r in rows if r["generation"] == "new"} == failed
    assert od.failed_ids() == set()
    assert od.apply_retries() == 0


def test_retry_parts_are_hidden_and_those_of_an_earlier_version_still_applied(od: OutputDir) -> None:
    """Retry parts are ``.rag-pipeline/retry-NNNNN.pending`` (no reader of the directory takes them for rows);
    one left as ``retry-NNNNN.parquet`` or ``_retry-NNNNN.pending`` at the top by an earlier version's interrupted
    retry is moved there by the next run and applied too, in index order."""
    od.commit_part(pa.concat_tables([_rows([str(i)], "failed") for i in range(4)]))
    pq.write_table(_rows(["0"], "ok", "old-name"), od.path / "retry-00000.parquet")  # earlier versions' names
    pq.write_table(_rows(["1"], "ok", "old-name"), od.path / "_retry-00001.pending")
    assert sorted(p.name for p in migrate(od.path)) == ["retry-00000.pending", "retry-00001.pending"]
    assert od.commit_retry_part(_rows(["2"], "ok", "new")).name == "retry-00002.pending"
    assert [p.name for p in od.retry_parts()] == ["retry-00000.pending", "retry-00001.pending", "retry-00002.pending"]
    assert {p.parent.name for p in od.retry_parts()} == {".rag-pipeline"}
    assert od.apply_retries() == 3
    rows = {r["id"]: r["generation"] for r in read_rows(od.path).to_pylist()}
    assert rows == {"0": "old-name", "1": "old-name", "2": "new", "3": None}
    assert od.retry_parts() == []


APPLIER = textwrap.dedent("""
    import sys
    from pipeline.output import OutputDir
    od = OutputDir(sys.argv[1])
    print("go", flush=True)
    od.apply_retries()
    print("done", flush=True)
""")


def test_kill9_while_applying_retries_loses_and_duplicates_nothing(od: OutputDir) -> None:
    seed = int(os.environ.get("RAG_PIPELINE_TEST_SEED", time.time()))
    rng = random.Random(seed)
    n_parts = 150
    for k in range(n_parts):
        od.commit_part(_rows([f"{k}-a", f"{k}-b"], "failed"))
    for k in range(0, n_parts, 3):
        od.commit_retry_part(_rows([f"{j}-a" for j in range(k, min(k + 3, n_parts))], "ok", "new"))
    want = sorted(f"{k}-{x}" for k in range(n_parts) for x in "ab")
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", APPLIER, str(od.path)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "go"
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait(timeout=10)
        kills += 1
        ids = read_rows(od.path, columns=["id"]).column("id").to_pylist()  # every part whole and readable
        assert sorted(ids) == want, f"seed {seed}: lost or duplicated ids after a kill"
    OutputDir(od.path).apply_retries()
    rows = read_rows(od.path).to_pylist()
    assert sorted(r["id"] for r in rows) == want
    assert {r["id"] for r in rows if r["generation"] == "new"} == {f"{k}-a" for k in range(n_parts)}, f"seed {seed}"
    assert not list(od.path.glob("**/*retry-*")) and not list(od.path.glob("**/*.tmp"))


# ---------------------------------------------------------------------------------------------- end to end


def _fault(url: str, status: int, for_s: float = 600.0) -> None:
    body = json.dumps({"status": status, "for_s": for_s}).encode()
    req = urllib.request.Request(url + "/fault", data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


@requires_llama
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_retry_failed_end_to_end_with_kill9_at_random_moments(tmp_path, example_store, llama_endpoints):
    """First run: the generation endpoint (a benchmark server standing in for a GPU server) answers HTTP 400 to
    every request (injected fault): every row is gen_status=failed. Then `run --retry-failed` against the real
    llama.cpp servers, killed -9 at random moments and resumed: the failed rows are replaced exactly once."""
    from bench.bench_server import launch

    seed = int(os.environ.get("RAG_PIPELINE_TEST_SEED", time.time()))
    rng = random.Random(seed)
    records = write_records(tmp_path, 8)
    want = sorted(json.loads(ln)["id"] for ln in records.read_text().splitlines())
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"rag": {"mode": "retrieve"}})
    base = run_args(records, out, cfg, *store_args(example_store))
    with launch(1, service_ms=20, capacity=8) as bench:
        _fault(bench.urls[0], 400)
        proc, _ = start_run([*base, "--endpoints", bench.urls[0]])
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    rows = read_rows(out).to_pylist()
    assert len(rows) == 8 and all(r["gen_status"] == "failed" for r in rows), rows[0]
    retry = [*base, "--endpoints", ",".join(llama_endpoints), "--retry-failed"]
    history = []
    for attempt in range(2):
        proc, marker = start_run(retry)
        delay_s = rng.uniform(2.0, 12.0)
        time.sleep(delay_s)
        proc.kill()
        proc.wait(timeout=30)
        # orphans after kill -9 of main are test_resume_crash's subject; here they are only cleaned up (by pid):
        # a worker still importing torch under heavy load can outlive its parent for a while, and workers never
        # write to the output directory, so they cannot affect exactly-once
        for p in wait_no_survivors(marker, timeout_s=30):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        ids = read_rows(out, columns=["id"]).column("id").to_pylist()
        history.append((round(delay_s, 1), len(list(out.glob(".rag-pipeline/retry-*.pending")))))
        assert sorted(ids) == want, f"seed {seed} attempt {attempt}: {collections.Counter(ids).most_common(2)}"
        # a plain reader of the directory too, whatever the kill left (pending retry rows, a half-written part)
        plain = pq.read_table(out, columns=["id"]).column("id").to_pylist()
        assert sorted(plain) == want, f"seed {seed} attempt {attempt}: {collections.Counter(plain).most_common(2)}"
    for _ in range(3):  # each --retry-failed re-processes what is still failed
        proc, marker = start_run(retry)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"seed {seed} history {history}: {err[-3000:]}"
        if all(r["gen_status"] == "ok" for r in read_rows(out).to_pylist()):
            break
    rows = read_rows(out).to_pylist()
    assert sorted(r["id"] for r in rows) == want, f"seed {seed} history {history}"
    assert all(r["gen_status"] == "ok" and r["generation"] for r in rows), f"seed {seed}"
    assert not list(out.glob("**/*retry-*")) and not list(out.glob("**/*.tmp"))
    manifest = json.loads((out / ".rag-pipeline/manifest.json").read_text())
    assert manifest["complete"] is True and manifest["counts"]["gen_status"] == {"ok": 8}
    for reader in READERS.values():  # after --retry-failed, every reader installed here
        with contextlib.suppress(pytest.skip.Exception):
            assert_each_once(reader, out, want, tmp_path)



VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["supported", "refuted", "unknown"]}, "reason": {"type": "string", "maxLength": 60}},
    "required": ["label", "reason"],
    "additionalProperties": False,
}


@requires_llama
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_retry_failed_takes_invalid_output_and_failed_rows_and_says_how_many(tmp_path, example_store, llama_endpoints):
    """First run: generations from a benchmark server, whose fixed English sentence never matches the
    --response-format schema (invalid_output), one record's generation refused with HTTP 400 (failed). Then
    `--retry-failed` against the real llama.cpp servers (JSON constrained by the schema) redoes all four and
    says so per status; a further retry finds nothing to do and says that too."""
    from bench.bench_server import launch

    records = write_records(tmp_path, 4)
    first = json.loads(records.read_text().splitlines()[0])
    out = tmp_path / "out"
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(VERDICT_SCHEMA))
    cfg = write_config(tmp_path, {"rag": {"mode": "retrieve"}, "generation": {"max_tokens": 96}})
    base = run_args(records, out, cfg, *store_args(example_store), "--response-format", str(schema))
    with launch(1, service_ms=20, capacity=8) as bench:
        body = json.dumps({"status": 400, "for_s": 600, "match": first["query"]}).encode()
        req = urllib.request.Request(bench.urls[0] + "/fault", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
        proc, _ = start_run([*base, "--endpoints", bench.urls[0]])
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    before = {r["id"]: r for r in read_rows(out).to_pylist()}
    assert collections.Counter(r["gen_status"] for r in before.values()) == {"invalid_output": 3, "failed": 1}, before
    assert before[str(first["id"])]["gen_status"] == "failed"

    proc, _ = start_run([*base, "--endpoints", ",".join(llama_endpoints), "--retry-failed"])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "retrying 1 failed, 3 invalid_output rows (--retry-failed)" in err  # the log line
    assert "retried: 0 hard_fail, 1 failed, 3 invalid_output" in err  # the summary
    rows = read_rows(out).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(before)
    for r in rows:  # every row made again, by the llama.cpp servers this time
        assert r["endpoint"] in llama_endpoints and r["gen_status"] == "ok", r
        assert json.loads(r["generation_json"])["label"] in ("supported", "refuted", "unknown")
    manifest = json.loads((out / ".rag-pipeline/manifest.json").read_text())
    assert manifest["this_invocation"]["retried"] == {"hard_fail": 0, "failed": 1, "invalid_output": 3}
    assert manifest["this_invocation"]["processed"] == 4 and manifest["counts"]["gen_status"] == {"ok": 4}

    # nothing left: said in one log line, no server started; --retry-truncated reads gen_finish_reason
    proc, _ = start_run([*base, "--endpoints", ",".join(llama_endpoints), "--retry-failed", "--retry-truncated"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "nothing to retry: no committed row is hard_fail or failed or invalid_output or truncated" in err
    has_finish = "gen_finish_reason" in pq.read_schema(next(out.glob("part-*.parquet"))).names
    assert ("none can be found truncated" in err) != has_finish, err
