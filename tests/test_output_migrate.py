"""Outputs written by an earlier version, which kept their bookkeeping at the top of the directory with a ``_``
prefix (``_run.json``, ``_manifest.json``, ``_logs/``, ``_slurm/``, ...): read-only commands read them as they are,
and a command that writes the directory first moves those names into ``.rag-pipeline/``, after which every reader
(Hugging Face ``datasets`` with ``data_dir`` included) takes each record once.

The directories are written by the real output code and then renamed to the earlier names, spelled out here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.output import default_merge_dir, run_status, shard_dir
from pipeline.output.lock import DirLock, LockHeld
from pipeline.output.migrate import migrate
from tests.readers import assert_each_once, reader_params
from tests.runtools import as_earlier_version
from tests.test_exactly_once import records  # noqa: F401  (fixture)
from tests.test_status_merge import ALL_IDS, make_shard

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

def _earlier_root(tmp_path: Path, records: Path) -> Path:  # noqa: F811
    """A 2-shard root as an earlier version left it: shards with logs and a report, the root's input scan and
    Slurm folder."""
    root = tmp_path / "root"
    for i in range(2):
        d = make_shard(root, records, i, 2).path
        (d / ".rag-pipeline" / "logs").mkdir()
        (d / ".rag-pipeline" / "logs" / "main.log").write_text("log\n")
        (d / ".rag-pipeline" / "report.html").write_text("<html></html>")
        as_earlier_version(d)
    (root / ".rag-pipeline" / "slurm" / "tasks").mkdir(parents=True)
    (root / ".rag-pipeline" / "slurm" / "tasks" / "0.json").write_text('{"state": "done", "exit_code": 0}')
    (root / ".rag-pipeline" / "input_scan.json").write_text("{}")
    as_earlier_version(root)
    return root


def test_status_and_merge_read_an_earlier_versions_root_as_it_is(tmp_path: Path, records: Path) -> None:  # noqa: F811
    root = _earlier_root(tmp_path, records)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    st = run_status(root)
    assert st["complete"] is True and st["done"] == 12 and st["rejected"] == 1
    res = CliRunner().invoke(main, ["status", str(root)])
    assert res.exit_code == 0 and "complete" in res.output, res.output
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before  # status moved nothing
    res = CliRunner().invoke(main, ["merge", str(root)])
    assert res.exit_code == 0, res.output
    merged = default_merge_dir(root)
    assert sorted(p.name for p in merged.iterdir() if not p.name.startswith("part-")) == [".rag-pipeline"]
    assert json.loads((merged / ".rag-pipeline" / "manifest.json").read_text())["complete"] is True


@pytest.mark.parametrize("reader", reader_params())
def test_after_the_move_every_reader_takes_each_record_once(reader, tmp_path: Path, records: Path) -> None:  # noqa: F811
    root = _earlier_root(tmp_path, records)
    for i in range(2):
        moved = migrate(shard_dir(root, i, 2))
        assert sorted(p.name for p in moved) == ["logs", "manifest.json", "rejected.jsonl", "report.html", "run.json"]
    migrate(root)
    tops = sorted(p.name for d in (root, shard_dir(root, 0, 2)) for p in d.iterdir())
    assert [n for n in tops if not n.startswith(("part-", "shard-"))] == [".rag-pipeline", ".rag-pipeline"]
    assert (root / ".rag-pipeline" / "slurm" / "tasks" / "0.json").is_file()
    assert (shard_dir(root, 1, 2) / ".rag-pipeline" / "logs" / "main.log").read_text() == "log\n"
    assert run_status(root)["complete"] is True
    assert_each_once(reader, root, ALL_IDS, tmp_path)


def test_a_live_earlier_run_is_left_alone_and_a_dead_ones_lock_is_moved(tmp_path: Path, records: Path) -> None:  # noqa: F811
    d = make_shard(tmp_path / "out", records, 0, 1).path
    as_earlier_version(d)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = DirLock(d)
        (d / "_lock.json").write_text(json.dumps({**lock._identity(), "pid": holder.pid, "pid_started": None}))
        with pytest.raises(LockHeld, match="earlier rag-pipeline version"):
            migrate(d)
        # `run` stops there, before anything is moved or any server starts (exit 2, one line)
        res = CliRunner().invoke(main, ["run", "--input", str(records), "--output", str(d), "--store",
                                        str(tmp_path / "no-store"), "--collection", "c", "--no-progress"])
        assert res.exit_code == 2, res.output
        assert "in use by a run of an earlier rag-pipeline version" in res.output
        assert (d / "_run.json").is_file() and not (d / ".rag-pipeline").exists()
    finally:
        holder.kill()
        holder.wait()
    moved = migrate(d)  # the holder is gone: its lock moves with the rest and is taken over as any stale lock
    assert d / ".rag-pipeline" / "lock.json" in moved and not (d / "_lock.json").exists()
    with DirLock(d) as lock:
        assert json.loads((d / ".rag-pipeline" / "lock.json").read_text())["token"] == lock.token


def test_a_name_in_both_places_keeps_the_new_one(tmp_path: Path, records: Path) -> None:  # noqa: F811
    d = make_shard(tmp_path / "out", records, 0, 1).path
    (d / "_manifest.json").write_text('{"complete": false, "from": "earlier"}')
    (d / "_report.html").write_text("earlier")
    new = json.loads((d / ".rag-pipeline" / "manifest.json").read_text())
    assert migrate(d) == [d / ".rag-pipeline" / "report.html"]  # the manifest is in both places: not moved
    assert not (d / "_manifest.json").exists()
    assert json.loads((d / ".rag-pipeline" / "manifest.json").read_text()) == new
    assert (d / ".rag-pipeline" / "report.html").read_text() == "earlier"  # absent before: moved, not dropped

