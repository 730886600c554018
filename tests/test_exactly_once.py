"""Every output directory reads exactly once with the usual readers (pyarrow, pandas, DuckDB, datasets), and
``merge --ordered`` writes the rows in input order.

The directories are written by the real output code (pipeline.output: commits, retry parts, merge) the way `run`
leaves them: one run, a 2-shard root with its merge output beside it, a run whose ``--retry-failed`` was
interrupted before its replacement rows were applied, and the same after they were applied. Files a run leaves
beside the parts (the input scan, Slurm logs and task records, an HTML report, a stale temporary part) are there
too, as on a real root.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.output import OutputDir, default_merge_dir, merge_shards, read_rows, shard_dir
from tests.readers import assert_each_once, reader_params
from tests.test_status_merge import ALL_IDS, make_shard

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def records(tmp_path: Path) -> Path:
    """12 valid records r0..r11 and one bad line (line 5), as in tests/test_status_merge.py."""
    lines = [json.dumps({"id": f"r{i}", "query": f"question {i}", "topic": i % 3}) for i in range(12)]
    lines.insert(4, json.dumps({"id": "bad", "query": ""}))
    p = tmp_path / "records.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def _litter(d: Path) -> None:
    """What else a real run leaves in a directory besides its parts."""
    (d / ".part-00099.parquet.tmp").write_bytes(b"PAR1 half a part")  # a crash in the middle of a commit
    for name in ("report.html", "state.json", "lock.json", "manifest.json"):
        (d / ".rag-pipeline" / name).write_text("{}")
    (d / ".rag-pipeline/rejected.jsonl").write_text('{"line": 3}\n')
    (d / ".rag-pipeline/logs").mkdir(exist_ok=True)
    (d / ".rag-pipeline/logs" / "main.log").write_text("log\n")


def _retry_rows(od: OutputDir, ids: list[str]) -> pa.Table:
    table = pq.read_table(od.parts()[0])
    keep = table.filter(pa.compute.is_in(table.column("id"), value_set=pa.array(ids)))
    return keep.set_column(keep.schema.get_field_index("gen_status"), "gen_status",
                           pa.array(["ok"] * keep.num_rows))


@pytest.mark.parametrize("reader", reader_params())
def test_every_output_directory_reads_each_record_once(reader, tmp_path: Path, records: Path) -> None:
    # one run, with a --retry-failed interrupted before its rows were applied (the pending part is beside)
    one = tmp_path / "one"
    od = make_shard(one, records, 0, 1)
    run_dir = shard_dir(one, 0, 1)
    _litter(run_dir)
    od.commit_retry_part(_retry_rows(od, ["r0", "r1"]))
    assert [p.name for p in od.retry_parts()] == ["retry-00000.pending"]
    assert_each_once(reader, run_dir, ALL_IDS, tmp_path)
    # after the retry was applied
    assert od.apply_retries() == 2
    assert_each_once(reader, run_dir, ALL_IDS, tmp_path)

    # a 2-shard root, before and after merge; the merge output lies beside the root
    root = tmp_path / "root"
    for i in range(2):
        _litter(make_shard(root, records, i, 2).path)
    (root / ".rag-pipeline/slurm" / "tasks").mkdir(parents=True)
    (root / ".rag-pipeline/input_scan.json").write_text("{}")
    (root / ".rag-pipeline/slurm" / "tasks" / "0.json").write_text("{}")
    assert_each_once(reader, root, ALL_IDS, tmp_path)
    merge_shards(root)
    merged = default_merge_dir(root)
    assert merged == tmp_path / "root.merged"
    assert_each_once(reader, root, ALL_IDS, tmp_path)
    assert_each_once(reader, merged, ALL_IDS, tmp_path)
    merge_shards(root, ordered=True, part_rows=5)
    assert_each_once(reader, merged, ALL_IDS, tmp_path)


def test_merge_writes_outside_the_root_and_refuses_an_output_inside_it(tmp_path: Path, records: Path) -> None:
    root = tmp_path / "out"
    for i in range(2):
        make_shard(root, records, i, 2)
    res = CliRunner().invoke(main, ["merge", str(root), "-o", str(root / "merged")])
    assert res.exit_code == InputError.exit_code
    assert res.output.strip().splitlines() == [
        f"Error: --output {root / 'merged'}: must be outside {root} (its rows would be read twice with the root's); "
        f"e.g. the default {tmp_path / 'out.merged'}"]
    assert not (root / "merged").exists()
    res = CliRunner().invoke(main, ["merge", str(root) + "/"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out.merged" / ".rag-pipeline/manifest.json").is_file()


def test_merge_ordered_writes_input_order_in_parts_of_bounded_rows(tmp_path: Path, records: Path) -> None:
    root = tmp_path / "out"
    for i in range(3):
        make_shard(root, records, i, 3)
    res = CliRunner().invoke(main, ["merge", str(root), "--ordered", "--memory-limit-mb", "64"])
    assert res.exit_code == 0, res.output
    assert "in input order" in res.output
    merged = default_merge_dir(root)
    table = read_rows(merged)
    assert table.column("id").to_pylist() == ALL_IDS  # shard order would be r0 r3 r6 r9 r1 ...
    assert table.column("input_index").to_pylist() == list(range(12))
    assert table.column("input_index").type == pa.int64()
    assert json.loads((merged / ".rag-pipeline/manifest.json").read_text())["ordered"] is True
    assert not [p for p in merged.iterdir() if p.name.endswith(".tmp")]  # the sort's files are gone
    # bounded rows per part, order kept across parts
    merge_shards(root, ordered=True, part_rows=5)
    parts = OutputDir(merged).parts()
    assert [pq.read_metadata(p).num_rows for p in parts] == [5, 5, 2]
    assert read_rows(merged).column("id").to_pylist() == ALL_IDS


def test_outputs_of_an_earlier_version_without_input_index(tmp_path: Path, records: Path) -> None:
    """Shards written before input_index existed: merge works (the column is null for their rows), --ordered is
    refused with one line naming the part."""
    root = tmp_path / "out"
    make_shard(root, records, 0, 2, with_index=False)
    make_shard(root, records, 1, 2)
    res = CliRunner().invoke(main, ["merge", str(root), "--ordered"])
    assert res.exit_code == InputError.exit_code
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "--ordered:" in lines[0] and "shard-0-of-2/part-00000.parquet has no input_index" \
        in lines[0] and "merge without --ordered" in lines[0], lines
    assert not default_merge_dir(root).exists()  # refused before anything was written
    man = merge_shards(root)
    assert man["rows"] == 12
    rows = {r["id"]: r["input_index"] for r in read_rows(default_merge_dir(root)).to_pylist()}
    assert sum(v is None for v in rows.values()) == 6 and rows["r1"] == 1
    # that merge output holds the column with nulls for the older rows: --ordered over it is refused as well
    with pytest.raises(InputError, match="has 6 rows without input_index"):
        merge_shards(default_merge_dir(root), tmp_path / "again", ordered=True)
    assert not (tmp_path / "again").exists()
