"""Parquet input (`--input data.parquet` or a directory of parts): streamed in record batches, validated like
JSONL (file:row and field), id/query fields, passthrough columns with their Arrow types kept, sharding without
converting other shards' rows, the resume fingerprint; and one real run end to end."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset.records import PARQUET_BATCH_ROWS, iter_records, scan_input
from pipeline.errors import InputError
from pipeline.output import input_fingerprint, read_rows
from tests.fixtures.llm import requires_llama
from tests.runtools import EXAMPLE, run_args, start_run, store_args, write_config

META = pa.struct([("source", pa.string()), ("year", pa.int32())])


def _table(ids, queries, **extra) -> pa.Table:
    cols = {"id": ids, "query": queries}
    cols.update(extra)
    return pa.table(cols)


def test_directory_of_parts_is_one_input_in_path_order_with_types_kept(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    ts = pa.array([dt.datetime(2024, 1, i + 1) for i in range(4)], pa.timestamp("us"))
    t = _table(pa.array([10, 11, 12, 13], pa.int64()), ["q0", "q1", "q2", "q3"],
               meta=pa.array([{"source": "s", "year": 2000 + i} for i in range(4)], META),
               tags=pa.array([["a"], [], ["b", "c"], None], pa.list_(pa.string())), when=ts,
               gen_status=["x", "y", "z", "w"])
    pq.write_table(t.slice(2), d / "part-1.parquet")  # sorted path order: part-0 first
    pq.write_table(t.slice(0, 2), d / "part-0.parquet")
    scan = scan_input(d)
    assert scan.format == "parquet" and scan.n_valid == 4
    assert scan.extra_types == {"meta": META, "tags": pa.list_(pa.string()), "when": pa.timestamp("us"),
                                "input_gen_status": pa.string()}
    recs = list(iter_records(scan))
    assert [(r.index, r.line, r.id, r.query) for r in recs] == [(i, i + 1, str(10 + i), f"q{i}") for i in range(4)]
    assert recs[1].extra == {"meta": {"source": "s", "year": 2001}, "tags": [], "when": dt.datetime(2024, 1, 2),
                             "input_gen_status": "y"}
    # the row schema takes the Arrow types as they are
    from pipeline.output.schema import row_schema

    schema = row_schema(scan.extra_types)
    assert schema.field("meta").type == META and schema.field("when").type == pa.timestamp("us")


@pytest.mark.parametrize(
    "ids, queries, expect",
    [
        (["a", "b"], ["q", ""], "row 2: field 'query': missing or empty query"),
        (["a", "b"], ["q", None], "row 2: field 'query': missing or empty query"),
        (["a", None], ["q", "q"], "row 2: field 'id': missing"),
        (["a", " "], ["q", "q"], "row 2: field 'id': missing"),
        (["a", "a"], ["q", "q"], "row 2: field 'id': duplicate id 'a' (first at input row 1)"),
        (["a", "b"], ["q", "x" * 9000], "row 2: field 'query': query has 9000 characters"),
    ],
)
def test_each_bad_row_names_file_row_and_field(tmp_path, ids, queries, expect):
    p = tmp_path / "in.parquet"
    pq.write_table(_table(ids, queries), p)
    with pytest.raises(InputError) as exc:
        scan_input(p)
    assert str(exc.value) == f"{p}:{expect}" or str(exc.value).startswith(f"{p}:{expect}")


def test_missing_or_mistyped_columns_and_unreadable_files(tmp_path):
    p = tmp_path / "in.parquet"
    pq.write_table(pa.table({"key": ["a"], "query": ["q"]}), p)
    with pytest.raises(InputError, match=r"no column 'id' \(columns: key, query\)"):
        scan_input(p)
    scan = scan_input(p, id_field="key")
    assert [r.id for r in iter_records(scan, id_field="key")] == ["a"]
    pq.write_table(pa.table({"id": ["a"], "query": [1]}), p)
    with pytest.raises(InputError, match="column 'query': type int64, expected a string"):
        scan_input(p)
    p.write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        scan_input(p)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no \\*.parquet files"):
        scan_input(empty)


def test_skip_mode_limit_and_shards_over_batches(tmp_path):
    n = 2 * PARQUET_BATCH_ROWS + 7  # several record batches
    ids = [f"r{i}" for i in range(n)]
    queries = [("" if i % 1000 == 5 else f"q{i}") for i in range(n)]
    p = tmp_path / "in.parquet"
    pq.write_table(_table(ids, queries, k=pa.array(range(n), pa.int64())), p, row_group_size=1500)
    scan = scan_input(p, on_bad_record="skip")
    bad = [i for i in range(n) if i % 1000 == 5]
    assert [r["line"] for r in scan.rejected] == [i + 1 for i in bad]
    assert json.loads(scan.rejected[0]["text"]) == {"id": "r5", "query": "", "k": 5}
    good = [i for i in range(n) if i not in set(bad)]
    recs = list(iter_records(scan))
    assert [r.id for r in recs] == [f"r{i}" for i in good] and scan.n_valid == len(good)
    assert [r.index for r in recs] == list(range(len(good)))
    shards = [list(iter_records(scan, shard=(i, 3), limit=5000)) for i in range(3)]
    assert sorted(r.index for s in shards for r in s) == list(range(5000))
    assert all(r.index % 3 == i for i, s in enumerate(shards) for r in s)
    assert {r.id: r.extra["k"] for r in shards[1]} == {f"r{good[r.index]}": good[r.index] for r in shards[1]}


def test_fingerprint_of_a_directory_changes_with_any_part(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    pq.write_table(_table(["a"], ["q"]), d / "a.parquet")
    pq.write_table(_table(["b"], ["q"]), d / "b.parquet")
    fp = input_fingerprint(d)
    assert fp["files"] == 2 and fp == input_fingerprint(d)
    pq.write_table(_table(["b"], ["q2"]), d / "b.parquet")
    assert input_fingerprint(d) != fp
    fp2 = input_fingerprint(d)
    (d / "b.parquet").rename(d / "c.parquet")  # same bytes, other name: another input
    assert input_fingerprint(d) != fp2


@requires_llama
@pytest.mark.slow
def test_run_on_a_parquet_directory_keeps_types_and_resumes(tmp_path, example_store, llama_endpoints):
    lines = [json.loads(x) for x in (EXAMPLE / "records.jsonl").read_text().splitlines()[:6]]
    d = tmp_path / "ds"
    d.mkdir()
    meta = pa.array([{"source": "scifact", "year": 2020 + i} for i in range(6)], META)
    t = pa.table({"id": [str(r["id"]) for r in lines], "query": [r["query"] for r in lines], "meta": meta,
                  "tags": pa.array([["x"] * i for i in range(6)], pa.list_(pa.string()))})
    pq.write_table(t.slice(0, 3), d / "part-0.parquet")
    pq.write_table(t.slice(3), d / "part-1.parquet")
    out = tmp_path / "out"
    cfg = write_config(tmp_path)
    args = run_args(d, out, cfg, "--endpoints", ",".join(llama_endpoints), *store_args(example_store))
    proc, _ = start_run(args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    table = read_rows(out)
    assert table.schema.field("meta").type == META and table.schema.field("tags").type == pa.list_(pa.string())
    rows = sorted(table.to_pylist(), key=lambda r: r["id"])
    want = sorted(t.to_pylist(), key=lambda r: r["id"])
    assert [(r["id"], r["meta"], r["tags"]) for r in rows] == [(w["id"], w["meta"], w["tags"]) for w in want]
    assert all(r["gen_status"] == "ok" for r in rows)
    proc, _ = start_run(args)  # resume: same fingerprint, nothing to do
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads((out / ".rag-pipeline/manifest.json").read_text())["this_invocation"]["processed"] == 0


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_shards_share_one_scan_of_the_input(tmp_path, fmt, monkeypatch):
    from pipeline.dataset import records as records_mod
    from pipeline.dataset.records import scan_input_cached

    rows = [{"id": f"r{i}", "query": ("" if i == 3 else f"q{i}"), "k": i} for i in range(10)]
    if fmt == "jsonl":
        p = tmp_path / "in.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        p = tmp_path / "in.parquet"
        pq.write_table(pa.Table.from_pylist(rows), p)
    cache = tmp_path / "out" / ".rag-pipeline/input_scan.json"
    fp = input_fingerprint(p)
    first = scan_input_cached(p, cache, fp, on_bad_record="skip")
    calls = []
    monkeypatch.setattr(records_mod, "scan_input", lambda *a, **k: calls.append(a) or first)
    again = scan_input_cached(p, cache, fp, on_bad_record="skip")
    assert calls == []  # reused, not parsed again
    assert (again.n_valid, again.rejected_lines, again.extra_types) == (first.n_valid, first.rejected_lines,
                                                                        first.extra_types)
    assert [r.id for r in iter_records(again, shard=(1, 2))] == [r.id for r in iter_records(first, shard=(1, 2))]
    # another field set or a changed input is a different scan
    scan_input_cached(p, cache, {**fp, "sha256": "x"}, on_bad_record="skip")
    assert len(calls) == 1
