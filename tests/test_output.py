"""The output directory's commit protocol (pipeline/output.py): atomic parts, exactly-once, fingerprints."""

from __future__ import annotations

import collections
import hashlib
import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError, RunError
from pipeline.output import (
    OutputDir,
    in_shard,
    input_fingerprint,
    parse_shard,
    part_paths,
    read_rows,
    shard_dir,
)

REPO = Path(__file__).resolve().parents[1]


def _rows(ids: list[str], status: str = "ok") -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "query": [f"q {i}" for i in ids],
            "rag_status": [status] * len(ids),
            "gen_status": [status] * len(ids),
        }
    )


@pytest.fixture
def run_input(tmp_path: Path) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"id": i, "query": f"q{i}"}) + "\n" for i in range(10)))
    return p


def _prepare(d: Path, inp: Path, *, overwrite: bool = False, shard: str | None = None) -> OutputDir:
    od = OutputDir(d)
    od.prepare(
        input_path=inp,
        fingerprint=input_fingerprint(inp),
        shard=shard,
        total_records=10,
        config={"run": {"id_field": "id"}},
        overwrite=overwrite,
    )
    return od


def test_fingerprint_is_size_and_sha256_of_content(run_input: Path) -> None:
    data = run_input.read_bytes()
    assert input_fingerprint(run_input) == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with pytest.raises(InputError, match="not found"):
        input_fingerprint(run_input.with_name("nope.jsonl"))


def test_prepare_writes_run_file(tmp_path: Path, run_input: Path) -> None:
    od = _prepare(tmp_path / "out", run_input, shard="1/4")
    info = json.loads((tmp_path / "out" / ".rag-pipeline/run.json").read_text())
    assert info["input"] == str(run_input.resolve())
    assert info["fingerprint"] == input_fingerprint(run_input)
    assert info["shard"] == "1/4" and info["total_records"] == 10
    assert info["config"] == {"run": {"id_field": "id"}}
    assert info["created"]
    assert od.committed_ids() == set()


def test_commit_parts_and_read_back(tmp_path: Path, run_input: Path) -> None:
    od = _prepare(tmp_path / "out", run_input)
    p0 = od.commit_part(_rows(["0", "1", "2"]))
    p1 = od.commit_part(_rows(["3"], status="soft"))
    assert [p0.name, p1.name] == ["part-00000.parquet", "part-00001.parquet"]
    assert not list((tmp_path / "out").glob("*.tmp"))
    assert od.committed_ids() == {"0", "1", "2", "3"}
    # a fresh object (a resumed process) sees the same committed ids and continues the numbering
    od2 = OutputDir(tmp_path / "out")
    assert od2.committed_ids() == {"0", "1", "2", "3"}
    assert od2.commit_part(_rows(["4"])).name == "part-00002.parquet"
    table = read_rows(tmp_path / "out")
    assert table.column("id").to_pylist() == ["0", "1", "2", "3", "4"]
    assert table.column("rag_status").to_pylist() == ["ok", "ok", "ok", "soft", "ok"]


def test_duplicate_ids_raise_and_commit_nothing(tmp_path: Path, run_input: Path) -> None:
    od = _prepare(tmp_path / "out", run_input)
    od.commit_part(_rows(["a", "b"]))
    with pytest.raises(RunError, match="already committed: 'b'"):
        od.commit_part(_rows(["c", "b"]))
    with pytest.raises(RunError, match="duplicated within the part: 'd'"):
        od.commit_part(_rows(["d", "e", "d"]))
    with pytest.raises(RunError, match="already committed: 'a'"):
        OutputDir(tmp_path / "out").commit_part(_rows(["a"]))  # also across processes (read from the parts)
    with pytest.raises(RunError, match="no 'id' column"):
        od.commit_part(pa.table({"x": [1]}))
    assert len(part_paths(tmp_path / "out")) == 1
    assert od.committed_ids() == {"a", "b"}


def test_tmp_file_is_never_read_as_committed_and_prepare_removes_it(tmp_path: Path, run_input: Path) -> None:
    out = tmp_path / "out"
    od = _prepare(out, run_input)
    od.commit_part(_rows(["0"]))
    # a complete parquet file left under the temporary name (crash between fsync and rename) ...
    pq.write_table(_rows(["1", "2"]), out / "part-00001.parquet.tmp")
    # ... and a half-written one
    (out / "part-00002.parquet.tmp").write_bytes(b"PAR1\x00\x01half")
    assert OutputDir(out).committed_ids() == {"0"}
    assert read_rows(out).column("id").to_pylist() == ["0"]
    od2 = _prepare(out, run_input)  # resume
    assert not list(out.glob("*.tmp"))
    assert od2.commit_part(_rows(["1", "2"])).name == "part-00001.parquet"
    assert sorted(read_rows(out).column("id").to_pylist()) == ["0", "1", "2"]


def test_corrupt_committed_part_is_a_clear_error(tmp_path: Path, run_input: Path) -> None:
    out = tmp_path / "out"
    _prepare(out, run_input)
    (out / "part-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(RunError, match="part-00000.parquet: cannot read committed part"):
        OutputDir(out).committed_ids()


def test_changed_or_other_input_is_refused_and_overwrite_starts_afresh(tmp_path: Path, run_input: Path) -> None:
    out = tmp_path / "out"
    od = _prepare(out, run_input)
    od.commit_part(_rows(["0", "1"]))
    od.write_manifest({"complete": False})
    created = json.loads((out / ".rag-pipeline/run.json").read_text())["created"]

    _prepare(out, run_input)  # same input: resume keeps parts and the creation time
    assert OutputDir(out).committed_ids() == {"0", "1"}
    assert json.loads((out / ".rag-pipeline/run.json").read_text())["created"] == created

    with pytest.raises(InputError, match="belongs to shard None"):
        _prepare(out, run_input, shard="0/2")

    run_input.write_text(run_input.read_text().replace('"q3"', '"q3 changed"'))
    with pytest.raises(InputError) as exc:
        _prepare(out, run_input)
    msg = str(exc.value)
    assert f"output dir {out} belongs to input {run_input.resolve()}" in msg
    assert "changed since the first run" in msg and "--overwrite" in msg

    other = tmp_path / "other.jsonl"
    other.write_text('{"id": 1, "query": "x"}\n')
    with pytest.raises(InputError, match=f"belongs to input {run_input.resolve()}"):
        _prepare(out, other)
    assert OutputDir(out).committed_ids() == {"0", "1"}  # refused: nothing touched

    _prepare(out, other, overwrite=True)
    # overwrite removed the previous parts and manifest
    assert part_paths(out) == []
    assert not (out / ".rag-pipeline/manifest.json").exists()
    assert json.loads((out / ".rag-pipeline/run.json").read_text())["input"] == str(other.resolve())


def test_manifest_and_rejected_written_atomically(tmp_path: Path, run_input: Path) -> None:
    od = _prepare(tmp_path / "out", run_input)
    od.write_manifest({"complete": True, "rows": 3})
    od.write_rejected([{"line": 4, "error": "bad"}, {"line": 9, "error": "worse"}])
    assert json.loads((tmp_path / "out" / ".rag-pipeline/manifest.json").read_text()) == {"complete": True, "rows": 3}
    assert od.manifest() == {"complete": True, "rows": 3}
    lines = (tmp_path / "out" / ".rag-pipeline/rejected.jsonl").read_text().splitlines()
    assert [json.loads(x)["line"] for x in lines] == [4, 9]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_read_rows_of_a_sharded_root(tmp_path: Path, run_input: Path) -> None:
    for i in range(2):
        od = _prepare(shard_dir(tmp_path / "root", i, 2), run_input, shard=f"{i}/2")
        od.commit_part(_rows([str(k) for k in range(10) if in_shard(k, i, 2)]))
    assert shard_dir(tmp_path / "root", 1, 2) == tmp_path / "root" / "shard-1-of-2"
    ids = read_rows(tmp_path / "root").column("id").to_pylist()
    assert sorted(ids, key=int) == [str(k) for k in range(10)]
    with pytest.raises(InputError, match="not a rag-pipeline output"):
        read_rows(tmp_path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected I/N"),
        ("1", "expected I/N"),
        ("a/b", "expected I/N"),
        ("1/2/3", "expected I/N"),
        ("2/2", "0 <= I < N"),
        ("5/2", "0 <= I < N"),
        ("-1/2", "0 <= I < N"),
        ("0/0", "N must be >= 1"),
    ],
)
def test_parse_shard_rejects_bad_forms(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_shard(spec)


def test_parse_shard_and_partition() -> None:
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard(" 3 / 4 ") == (3, 4)
    n = 3
    owners = [[i for i in range(n) if in_shard(k, i, n)] for k in range(20)]
    assert all(len(o) == 1 for o in owners)  # every index in exactly one shard
    assert [o[0] for o in owners[:6]] == [0, 1, 2, 0, 1, 2]


# --- crash safety: kill -9 a committing process at random moments ----------------------------------------

_COMMITTER = textwrap.dedent(
    """
    import os
    import sys

    import pyarrow as pa
    from pipeline.output import OutputDir, input_fingerprint

    out, inp, total, per_part = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    od = OutputDir(out)
    od.prepare(input_path=inp, fingerprint=input_fingerprint(inp), shard=None, total_records=total,
               config={}, overwrite=False)
    done = od.committed_ids()
    todo = [str(i) for i in range(total) if str(i) not in done]
    print("ready", len(done), flush=True)
    for start in range(0, len(todo), per_part):
        ids = todo[start:start + per_part]
        od.commit_part(pa.table({"id": ids, "text": [os.urandom(50).hex() for _ in ids], "rag_status": ["ok"] * len(ids)}))
    print("finished", flush=True)
    """
)


def test_kill_9_during_commits_leaves_only_whole_parts_and_each_id_once(tmp_path: Path, run_input: Path) -> None:
    out, total, per_part = tmp_path / "out", 200_000, 1000
    script = tmp_path / "committer.py"
    script.write_text(_COMMITTER)
    rng = random.Random(1234)
    kills = 0
    tmp_seen = 0
    for _ in range(12):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(out), str(run_input), str(total), str(per_part)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        assert first and first[0] == "ready", first
        time.sleep(rng.uniform(0.005, 0.1))  # a part commit takes ~3 ms here: most kills land mid-loop
        if proc.poll() is not None:
            break  # finished before we killed it
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        kills += 1
        tmp_seen += bool(list(out.glob("*.tmp")))
        # every committed part is whole and readable, no id twice
        ids = read_rows(out, columns=["id"]).column("id").to_pylist()
        counts = collections.Counter(ids)
        assert not [i for i, c in counts.items() if c > 1]
        assert OutputDir(out).committed_ids() == set(ids)
        if len(ids) == total:
            break
    assert kills >= 5, f"only {kills} kills landed before the run finished"
    # resume to the end without interruption
    done = subprocess.run(
        [sys.executable, str(script), str(out), str(run_input), str(total), str(per_part)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "finished" in done.stdout
    ids = read_rows(out, columns=["id"]).column("id").to_pylist()
    assert sorted(ids, key=int) == [str(i) for i in range(total)]
    assert not list(out.glob("*.tmp"))
    print(f"kills={kills} kills_with_tmp_left={tmp_seen}")
