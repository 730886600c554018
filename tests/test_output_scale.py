"""Small, fast versions of bench/scale.py's checks (no timing): one ledger load per run and no committed part
re-read by a commit, and manifest / status / merge in bounded memory (they never read contexts or generations;
merge holds one part at a time). Memory is Arrow's own allocation peak in a fresh process, compared with the size
of the data, so the checks do not depend on the machine's load."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from bench.scale import in_child, synthetic_run, to_shards, write_input
from pipeline.output import ledger as ledger_mod
from pipeline.output import read_rows

PARTS, ROWS = 50, 40


def test_commits_load_the_ledger_once_and_never_reread_parts(tmp_path: Path, monkeypatch) -> None:
    inp = write_input(tmp_path / "in.jsonl", PARTS * ROWS)
    loads: list[str] = []
    reads: list[str] = []
    real_load = ledger_mod.Ledger._load

    def counting_load(self):
        loads.append(str(self.path))
        return real_load(self)

    monkeypatch.setattr(ledger_mod.Ledger, "_load", counting_load)
    after_first: list[bool] = []

    def spy(name, fn):
        def wrapped(*a, **k):
            if after_first:
                reads.append(name)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(pq, "read_table", spy("read_table", pq.read_table))
    monkeypatch.setattr(pq, "ParquetFile", spy("ParquetFile", pq.ParquetFile))
    monkeypatch.setattr(ds, "dataset", spy("dataset", ds.dataset))
    commit_s = synthetic_run(inp, tmp_path / "out", PARTS, ROWS, contexts=1, context_chars=50,
                             on_commit=lambda k: after_first.append(True))
    assert len(commit_s) == PARTS
    assert loads == [str(tmp_path / "out")]  # one ledger for the whole run
    assert reads == []  # no commit read any committed part
    ids = read_rows(tmp_path / "out", ["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == PARTS * ROWS


@pytest.fixture(scope="module")
def big_contexts(tmp_path_factory) -> tuple[Path, Path, int]:
    """50 parts x 40 rows with 5 contexts of 2,000 characters: ~20 MB of contexts, ~0.4 MB per part."""
    work = tmp_path_factory.mktemp("scale")
    inp = write_input(work / "in.jsonl", PARTS * ROWS)
    synthetic_run(inp, work / "run", PARTS, ROWS, contexts=5, context_chars=2000)
    return work, inp, sum(p.stat().st_size for p in (work / "run").glob("part-*.parquet"))


def test_manifest_and_status_never_read_contexts(big_contexts) -> None:
    work, _, data_bytes = big_contexts
    assert data_bytes > 15e6
    m = in_child("manifest", str(work / "run"), str(PARTS * ROWS))
    assert m["result"]["rows"] == PARTS * ROWS and m["result"]["complete"] is True
    assert m["result"]["counts"]["rag_status"] == {"ok": PARTS * ROWS * 9 // 10, "soft_fail": PARTS * ROWS // 10}
    st = in_child("cli", "status", str(work / "run"), "--json")
    assert json.loads(st["stdout"])["done"] == PARTS * ROWS
    for step in (m, st):
        assert step["arrow_peak_mb"] * 2**20 < data_bytes / 20, step  # the projected columns only


def test_merge_of_50_shards_holds_one_part_at_a_time(big_contexts) -> None:
    work, inp, data_bytes = big_contexts
    to_shards(inp, work / "run", work / "sharded", PARTS, ROWS)
    st = in_child("cli", "status", str(work / "sharded"), "--json")
    assert json.loads(st["stdout"])["n_shards"] == PARTS and st["arrow_peak_mb"] * 2**20 < data_bytes / 20
    mg = in_child("cli", "merge", str(work / "sharded"))
    manifest = json.loads((work / "sharded.merged" / ".rag-pipeline/manifest.json").read_text())  # beside the root
    assert manifest["complete"] is True and manifest["rows"] == PARTS * ROWS and manifest["n_shards"] == PARTS
    assert mg["arrow_peak_mb"] * 2**20 < data_bytes / 5, mg  # a few parts' worth, never the whole output
