"""No silent defaults, and trial runs that grow, through the real CLI.

* A run (or an ingest) that was not told its input, output, store or collection stops with one line and exit 2
  (input/output) or 4 (store/collection), from an empty directory, before any server starts (the probes pass an
  endpoint where nothing listens: reaching the server stage would give exit 3) and without creating anything.
* `--limit 3` then `--limit 5` gives 5 rows, the first 3 untouched; a smaller limit is refused in one line.
  Real: the example Chroma store, the packaged embedding model, spawned RAG workers and generation processes; the
  benchmark server (bench/bench_server.py) answers the generations quickly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bench.bench_server import launch
from tests.fixtures.llm import dead_endpoint
from tests.runtools import REPO, read_rows, run_args, start_run, store_args, write_config, write_records


def _cli(cwd: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`python -m pipeline.cli ARGS` from ``cwd``, the project importable as in the test environment."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def test_missing_pieces_are_one_line_before_anything_starts(tmp_path: Path, example_store) -> None:
    records = write_records(tmp_path, 2)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    out = str(tmp_path / "out")
    dead = ["--endpoints", dead_endpoint(), "--no-progress"]
    store = str(example_store.store_cfg.path)
    probes = [
        ("nothing", ["run", *dead], 2, "no input: pass --input FILE"),
        ("no output", ["run", "--input", str(records), *dead], 2, "no output directory: pass --output DIR"),
        ("no store", ["run", "--input", str(records), "--output", out, *dead], 4,
         "no vector store named: pass --store DIR"),
        ("no collection", ["run", "--input", str(records), "--output", out, "--store", store, *dead], 4,
         "no collection named: pass --collection NAME"),
        ("store not there", ["run", "--input", str(records), "--output", out, "--store", str(tmp_path / "none"),
                             "--collection", "example", *dead], 4, "vector store not found"),
        ("ingest source not there", ["run", "--input", str(records), "--output", out, "--store", store,
                                     "--collection", "example", "--ingest", "nope.jsonl", *dead], 2,
         "nope.jsonl: ingest source not found"),
        ("ingest without a store", ["ingest", str(REPO / "data/example/corpus.jsonl"), "--collection", "x",
                                    "--no-progress"], 4, "no vector store named"),
        ("eval-retrieval without a collection", ["eval-retrieval", "--store", store, "--queries",
                                                 str(REPO / "data/example/queries.jsonl"), "--qrels",
                                                 str(REPO / "data/example/qrels.tsv")], 4, "no collection named"),
    ]
    failures = []
    for name, args, code, text in probes:
        res = _cli(empty, *args)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        if not (res.returncode == code and len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0]
                and "Traceback" not in res.stderr):
            failures.append(f"{name}: exit {res.returncode} (want {code}): {res.stderr[-800:]!r}")
    assert not failures, "\n".join(failures)
    assert list(empty.iterdir()) == []  # no ./data/store, no ./output: nothing made where the user stands
    assert not (tmp_path / "out").exists()


def _run(args: list[str]) -> str:
    proc, _ = start_run(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return err


def _rows_by_id(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_rows(out)}


@pytest.mark.slow
def test_a_run_grows_with_its_limit_and_keeps_what_it_committed(tmp_path: Path, example_store) -> None:
    records = write_records(tmp_path, 6)
    ids = [json.loads(ln)["id"] for ln in records.read_text().splitlines()]
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"rag": {"mode": "retrieve"}, "run": {"part_rows": 2}})
    with launch(1, service_ms=20, capacity=8) as bench:
        base = run_args(records, out, cfg, "--endpoints", bench.urls[0], *store_args(example_store))
        _run([*base, "--limit", "3"])
        first = _rows_by_id(out)
        assert sorted(first) == sorted(ids[:3])
        parts = {p.name: pq.read_table(p) for p in out.glob("part-*.parquet")}

        err = _run([*base, "--limit", "5"])
        assert "extending the run from 3 to 5 records" in err
        rows = _rows_by_id(out)
        assert sorted(rows) == sorted(ids[:5])
        for rid, row in first.items():  # the first 3 rows were not made again: every value the same
            assert rows[rid] == row, rid
        for name, table in parts.items():  # their parts are the very same files' content
            assert pq.read_table(out / name).equals(table), name
        manifest = json.loads((out / ".rag-pipeline/manifest.json").read_text())
        assert (manifest["total_records"], manifest["rows"], manifest["complete"]) == (5, 5, True)
        assert manifest["this_invocation"]["processed"] == 2
        info = json.loads((out / ".rag-pipeline/run.json").read_text())
        assert info["total_records"] == 5 and info["identity"]["run.limit"] == 5
        assert [(c["key"], c["old"], c["new"]) for c in info["config_changes"]] == [("run.limit", 3, 5)]

        proc, _ = start_run([*base, "--limit", "4"])  # fewer records than committed: refused, nothing changes
        _, err = proc.communicate(timeout=120)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, err
        assert "was started with run.limit=5 (5 records), now 4 (4 records)" in lines[0]
        assert "use --limit 5 or more (0 = all)" in lines[0]
        assert sorted(_rows_by_id(out)) == sorted(ids[:5])

        _run(base)  # no limit: the whole input
        rows = _rows_by_id(out)
        assert sorted(rows) == sorted(ids) and all(rows[i] == first[i] for i in first)
        manifest = json.loads((out / ".rag-pipeline/manifest.json").read_text())
        assert (manifest["total_records"], manifest["complete"]) == (6, True)
