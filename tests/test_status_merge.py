"""`rag-pipeline status` and `rag-pipeline merge` over real output directories (pipeline.output)."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import Config, RunConfig
from pipeline.dataset.records import iter_records, scan_input
from pipeline.errors import InputError, RunError
from pipeline.output import (
    OutputDir,
    default_merge_dir,
    in_shard,
    input_fingerprint,
    merge_shards,
    read_rows,
    run_status,
    shard_dir,
)

N_RECORDS = 12


@pytest.fixture
def records(tmp_path: Path) -> Path:
    """12 valid records (ids r0..r11, some integer-like) and one bad line (line 5: no query)."""
    lines = [json.dumps({"id": f"r{i}", "query": f"question {i}", "topic": i % 3}) for i in range(N_RECORDS)]
    lines.insert(4, json.dumps({"id": "bad", "query": ""}))
    p = tmp_path / "records.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def _config(limit: int = 0) -> dict:
    cfg = Config()
    return dataclasses.replace(cfg, run=dataclasses.replace(RunConfig(), limit=limit)).to_dict()


def _status_of(rid: str) -> tuple[str, str]:
    k = int(rid[1:])
    return ("ok" if k % 4 else "soft_fail", "ok" if k != 7 else "error")


def make_shard(
    root: Path,
    inp: Path,
    i: int,
    n: int,
    *,
    limit: int = 0,
    skip: set[str] = frozenset(),
    extra: tuple[str, ...] = (),
    complete: bool = True,
    with_index: bool = True,
) -> OutputDir:
    """Write shard i of n the way `run --shard i/n` does: one row per record of the partition, in 2 parts
    (``with_index``: with the ``input_index`` column, as this version writes; an id not in the input gets 999)."""
    scan = scan_input(inp, on_bad_record="skip")
    recs = [r for r in iter_records(scan) if (not limit or r.index < limit) and in_shard(r.index, i, n)]
    od = OutputDir(shard_dir(root, i, n))
    od.prepare(
        input_path=inp,
        fingerprint=input_fingerprint(inp),
        shard=f"{i}/{n}",
        total_records=len(recs),
        config=_config(limit),
        overwrite=False,
    )
    od.write_rejected(scan.rejected)
    ids = [r.id for r in recs if r.id not in skip] + list(extra)
    index_of = {r.id: r.index for r in iter_records(scan)}
    for chunk in (ids[: len(ids) // 2], ids[len(ids) // 2 :]):
        if chunk:
            statuses = [_status_of(x) for x in chunk]
            cols = {
                "id": chunk,
                "query": [f"question {x[1:]}" for x in chunk],
                "topic": pa.array([int(x[1:]) % 3 for x in chunk], pa.int64()),
                "rag_status": [s[0] for s in statuses],
                "gen_status": [s[1] for s in statuses],
            }
            if with_index:
                cols["input_index"] = pa.array([index_of.get(x, 999) for x in chunk], pa.int64())
            od.commit_part(pa.table(cols))
    od.write_manifest({"complete": complete and not skip, "rows": len(ids)})
    return od


def expected_counts(ids: list[str]) -> tuple[dict, dict]:
    rag = collections.Counter(_status_of(x)[0] for x in ids)
    gen = collections.Counter(_status_of(x)[1] for x in ids)
    return dict(sorted(rag.items())), dict(sorted(gen.items()))


ALL_IDS = [f"r{i}" for i in range(N_RECORDS)]


def test_status_of_a_complete_sharded_run(tmp_path: Path, records: Path) -> None:
    root = tmp_path / "out"
    for i in range(3):
        make_shard(root, records, i, 3)
    st = run_status(root)
    rag, gen = expected_counts(ALL_IDS)
    assert st["sharded"] and st["n_shards"] == 3
    assert (st["done"], st["total"], st["rejected"]) == (12, 12, 1)
    assert st["complete"] is True
    assert st["rag_status"] == rag and st["gen_status"] == gen
    assert [(s["index"], s["done"], s["total"], s["complete"]) for s in st["shards"]] == [
        (0, 4, 4, True),
        (1, 4, 4, True),
        (2, 4, 4, True),
    ]
    assert st["missing_shards"] == [] and st["merged"] is None

    res = CliRunner().invoke(main, ["status", str(root)])
    assert res.exit_code == 0, res.output
    assert f"{root}: 12/12 records done (100.0%), 1 rejected, complete" in res.output
    assert "shard 2/3: 4/4 done, complete" in res.output
    assert "merged: not yet" in res.output
    res = CliRunner().invoke(main, ["status", str(root), "--json"])
    assert json.loads(res.output)["complete"] is True


def test_status_of_an_incomplete_run(tmp_path: Path, records: Path) -> None:
    root = tmp_path / "out"
    make_shard(root, records, 0, 3, skip={"r3"})  # stopped before r3, manifest says incomplete
    make_shard(root, records, 1, 3, complete=False)  # all rows, but the manifest does not say complete
    st = run_status(root)
    assert st["complete"] is False
    assert st["missing_shards"] == [2]
    assert [(s["done"], s["total"], s["complete"]) for s in st["shards"]] == [(3, 4, False), (4, 4, False)]
    assert (st["done"], st["total"]) == (7, 8)
    res = CliRunner().invoke(main, ["status", str(root)])
    assert "incomplete" in res.output and "shard 2/3: not started" in res.output

    single = run_status(shard_dir(root, 0, 3))  # a run directory itself
    assert single["sharded"] is False and single["shard"] == "0/3" and single["done"] == 3


def test_status_of_not_an_output_dir_is_a_one_line_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert res.exit_code == InputError.exit_code
    assert res.output.strip() == f"Error: {tmp_path}: not a rag-pipeline output (no .rag-pipeline/run.json and no shard-I-of-N directories)"
    res = CliRunner().invoke(main, ["status", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "output directory not found" in res.output


def test_merge_combines_shards_exactly_once(tmp_path: Path, records: Path) -> None:
    root = tmp_path / "out"
    for i in range(2):
        make_shard(root, records, i, 2)
    res = CliRunner().invoke(main, ["merge", str(root)])
    assert res.exit_code == 0, res.output
    assert f"merged 12 rows of 12 records from 2 shard(s) into {default_merge_dir(root)} (1 rejected input lines)" in res.output
    rag, gen = expected_counts(ALL_IDS)
    assert "rag_status  " + "  ".join(f"{k}={v}" for k, v in rag.items()) in res.output

    merged = read_rows(default_merge_dir(root))
    assert sorted(merged.column("id").to_pylist()) == sorted(ALL_IDS)
    assert merged.column("topic").type == pa.int64()
    man = json.loads((default_merge_dir(root) / ".rag-pipeline/manifest.json").read_text())
    assert man["complete"] is True and man["rows"] == 12 and man["total_records"] == 12
    assert man["counts"] == {"rag_status": rag, "gen_status": gen}
    assert man["rejected"] == 1 and man["misplaced"] == 0
    rejected = [json.loads(x) for x in (default_merge_dir(root) / ".rag-pipeline/rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [5]
    assert run_status(default_merge_dir(root))["complete"] is True
    assert run_status(root)["merged"]["done"] == 12

    # merging again replaces the merged output (idempotent), with another part size
    man2 = merge_shards(root, part_rows=5)
    assert man2["rows"] == 12
    assert len(OutputDir(default_merge_dir(root)).parts()) == 3
    assert sorted(read_rows(default_merge_dir(root)).column("id").to_pylist()) == sorted(ALL_IDS)


def test_merge_honours_limit_and_id_field_from_the_run(tmp_path: Path, records: Path) -> None:
    root = tmp_path / "out"
    for i in range(2):
        make_shard(root, records, i, 2, limit=5)
    man = merge_shards(root)
    assert man["total_records"] == 5 and man["rows"] == 5
    assert sorted(read_rows(default_merge_dir(root)).column("id").to_pylist()) == ["r0", "r1", "r2", "r3", "r4"]


def test_merge_reports_duplicates(tmp_path: Path, records: Path) -> None:
    root = tmp_path / "out"
    make_shard(root, records, 0, 2)
    make_shard(root, records, 1, 2, extra=("r0", "r2"))
    res = CliRunner().invoke(main, ["merge", str(root)])
    assert res.exit_code == RunError.exit_code
    assert "2 duplicate ids: 'r0' (shard-0-of-2 and shard-1-of-2), 'r2' (shard-0-of-2 and shard-1-of-2)" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (default_merge_dir(root)).exists()


def test_merge_reports_missing_records_and_missing_shards(tmp_path: Path, records: Path) -> None:
    root = tmp_path / "out"
    make_shard(root, records, 0, 3, skip={"r3", "r6"})
    make_shard(root, records, 1, 3)
    with pytest.raises(RunError) as exc:
        merge_shards(root)
    msg = str(exc.value)
    assert "6 input records have no row [no output dir for shard-2-of-3]" in msg
    # r3 is on line 4, r6 on line 8 (the bad line 5 shifts it); record index 3 and 6 -> shard 0
    assert "'r3' (line 4, shard 0/3)" in msg and "'r6' (line 8, shard 0/3)" in msg
    assert "..." in msg  # only a few are listed


def test_merge_reports_ids_not_in_the_input(tmp_path: Path, records: Path) -> None:
    root = tmp_path / "out"
    make_shard(root, records, 0, 1, extra=("r99",))
    with pytest.raises(RunError, match="1 ids are not in the input: 'r99'"):
        merge_shards(root)


def test_merge_refuses_a_changed_input_and_mixed_shard_counts(tmp_path: Path, records: Path) -> None:
    root = tmp_path / "out"
    make_shard(root, records, 0, 2)
    make_shard(root, records, 1, 2)
    make_shard(root, records, 0, 3)
    with pytest.raises(InputError, match="different counts N \\(2, 3\\)"):
        merge_shards(root)
    with pytest.raises(InputError, match="different counts N"):
        run_status(root)
    import shutil

    shutil.rmtree(shard_dir(root, 0, 3))
    records.write_text(records.read_text() + json.dumps({"id": "new", "query": "q"}) + "\n")
    res = CliRunner().invoke(main, ["merge", str(root)])
    assert res.exit_code == 2
    assert "changed since the shards were run" in res.output


def test_merge_refuses_to_overwrite_a_run_output(tmp_path: Path, records: Path) -> None:
    root = tmp_path / "out"
    make_shard(root, records, 0, 1)
    other = tmp_path / "other"
    make_shard(other, records, 0, 1)
    with pytest.raises(InputError, match="holds a run output, not a merge output"):
        merge_shards(root, shard_dir(other, 0, 1))
    assert len(OutputDir(shard_dir(other, 0, 1)).parts()) == 2


def test_merge_of_shards_with_and_without_token_columns(tmp_path: Path, records: Path) -> None:
    """Shards of an earlier version (no token / finish-reason columns) merge with shards that have them: the
    merged rows have the columns, null for the older rows."""
    import pyarrow.parquet as pq

    from pipeline.output.schema import COLUMN_TYPES, USAGE_COLUMNS

    root = tmp_path / "out"
    make_shard(root, records, 0, 2)  # written without the columns
    newer = make_shard(root, records, 1, 2)
    for part in newer.parts():
        table = pq.read_table(part)
        for name in USAGE_COLUMNS:
            value = "length" if name.endswith("finish_reason") else 7
            table = table.append_column(pa.field(name, COLUMN_TYPES[name]),
                                        pa.array([value] * table.num_rows, COLUMN_TYPES[name]))
        pq.write_table(table, part)
    assert run_status(root)["done"] == 12
    man = merge_shards(root)
    assert man["rows"] == 12 and man["complete"] is True
    merged = {r["id"]: r for r in read_rows(default_merge_dir(root)).to_pylist()}
    older = {r.id for r in iter_records(scan_input(records, on_bad_record="skip")) if in_shard(r.index, 0, 2)}
    for rid, row in merged.items():
        if rid in older:
            assert all(row[c] is None for c in USAGE_COLUMNS), row
        else:
            assert row["gen_completion_tokens"] == 7 and row["rag_finish_reason"] == "length", row
