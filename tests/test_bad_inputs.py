"""Every bad input is one clear line and exit 2 (4 for the store), before any server starts.

Each probe runs the real CLI (`python -m pipeline.cli run`) in a subprocess. The probes that must fail before
any server starts are given an endpoint where nothing listens: reaching the server stage would fail with exit 3
instead. Read-only and full filesystems are real tmpfs mounts (skipped where mounting is not permitted)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.output.lock import DirLock
from tests.fixtures.llm import dead_endpoint, requires_llama
from tests.runtools import (
    REPO,
    read_ids,
    run_args,
    start_run,
    store_args,
    unreached_store_args,
    wait_for_parts,
    write_config,
    write_records,
)


def _cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--no-progress", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}): needs root / CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def probe_env(tmp_path: Path, example_store) -> dict:
    records = write_records(tmp_path, 3)
    cfg = write_config(tmp_path)
    return {"records": records, "cfg": cfg, "store": store_args(example_store), "dead": dead_endpoint()}


def _probes(tmp_path: Path, env: dict) -> list[tuple[str, list[str], int, str]]:
    """(name, extra args, expected exit code, text the message must contain)."""
    rec, cfg, store = env["records"], env["cfg"], env["store"]

    def args(*extra: str, inp: Path = rec, out: Path | None = None) -> list[str]:
        return [*run_args(inp, out or tmp_path / "out", cfg, *store, "--endpoints", env["dead"]), *extra]

    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"id": "a", "query": "ok"}\n{"id": "b", "query": "bad \\ud800 text"}\n')
    bad_bytes = tmp_path / "bytes.jsonl"
    bad_bytes.write_bytes(b'{"id": "a", "query": "caf\xe9"}\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text("[run]\npart_rows = 0\n")
    missing_prompt = tmp_path / "prompt.toml"
    missing_prompt.write_text('[generation]\nprompt_file = "no/such/prompt.txt"\n')
    return [
        ("num_processes 0", args("--num_processes", "0"), 2, "num_processes: must be >= 1"),
        ("negative top-k", args("--top-k", "-1"), 2, "top_k: must be >= 1"),
        ("min-score out of range", args("--min-score", "1.5"), 2, "min_score: must be <= 1.0"),
        ("negative limit", args("--limit", "-5"), 2, "limit: must be >= 0"),
        ("zero part_rows in a file", [*args(), "--config", str(bad_cfg)], 2, "part_rows: must be >= 1"),
        ("lone surrogate", args(inp=surrogate), 2, f"{surrogate}:2: field 'query': not valid Unicode"),
        ("invalid UTF-8 bytes", args(inp=bad_bytes), 2, f"{bad_bytes}:1: not valid UTF-8"),
        ("missing input", args(inp=tmp_path / "nope.jsonl"), 2, "input file not found"),
        ("output is a file", args(out=a_file), 2, "is a file"),
        ("output under a file", args(out=a_file / "sub"), 2, "is a file"),
        ("missing prompt template", [*args(), "--config", str(missing_prompt)], 2, "prompt template"),
        ("missing store", [*args(), "--store", str(tmp_path / "no-store")], 4, "vector store not found"),
        ("missing collection", [*args(), "--collection", "no_such_collection"], 4,
         "collection 'no_such_collection' not found"),
        ("bad shard", args("--shard", "3/2"), 2, "shard"),
    ]


def test_a_dozen_bad_probes_are_one_line_errors_before_any_server(tmp_path: Path, probe_env: dict) -> None:
    failures = []
    for name, args, code, text in _probes(tmp_path, probe_env):
        t0 = time.monotonic()
        res = _cli(*args)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        ok = (res.returncode == code and len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0]
              and "Traceback" not in res.stderr)
        if not ok:
            failures.append(f"{name}: exit {res.returncode} (want {code}), {time.monotonic() - t0:.1f} s, "
                            f"stderr: {res.stderr[-800:]!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "out").exists()  # no probe left an output directory behind


def test_output_on_a_read_only_filesystem_is_a_one_line_error(tmp_path: Path, probe_env: dict) -> None:
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        res = _cli(*run_args(probe_env["records"], ro / "out", probe_env["cfg"], *probe_env["store"],
                             "--endpoints", probe_env["dead"]))
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "Read-only file system" in res.stderr, res.stderr


def test_second_run_into_a_locked_output_is_refused_at_once(tmp_path: Path, probe_env: dict) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with DirLock(out):
        t0 = time.monotonic()
        res = _cli(*run_args(probe_env["records"], out, probe_env["cfg"], *probe_env["store"],
                             "--endpoints", probe_env["dead"]))
        assert time.monotonic() - t0 < 30
    assert res.returncode == 2 and f"pid {os.getpid()}" in res.stderr and "in use by another run" in res.stderr
    assert "Traceback" not in res.stderr


def test_bom_and_big_integers_are_accepted(tmp_path: Path) -> None:
    from pipeline.dataset.records import iter_records, scan_input

    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "query": "q", "n": 2**70}).encode() + b"\n"
                  + json.dumps({"id": "b", "query": "q2", "n": 5}).encode() + b"\n")
    scan = scan_input(p)
    assert scan.n_valid == 2 and scan.extra_types == {"n": "json"}  # stored as JSON text: nothing lost
    assert [r.id for r in iter_records(scan)] == ["a", "b"]


def test_parquet_cells_that_are_not_utf8_are_rejected_with_row_and_field(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.dataset.records import iter_records, scan_input
    from pipeline.errors import InputError

    raw = pa.array([b"fine", b"caf\xe9"], pa.binary())
    note = pa.Array.from_buffers(pa.string(), 2, raw.buffers())  # a writer that did not check UTF-8
    p = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "query": ["q1", "q2"], "note": note}), p)
    with pytest.raises(InputError, match=r"in\.parquet:row 2: field 'note': not valid UTF-8"):
        scan_input(p)
    scan = scan_input(p, on_bad_record="skip")
    assert [r["line"] for r in scan.rejected] == [2] and "caf" in scan.rejected[0]["text"]
    assert [r.id for r in iter_records(scan)] == ["a"]


@requires_llama
@pytest.mark.slow
def test_disk_full_mid_run_is_one_line_keeps_committed_rows_and_resumes(tmp_path, example_store, llama_endpoints):
    """A real full filesystem (tmpfs filled by the test after the first commit): exit 2 with one line, committed
    parts intact; after freeing space the same command resumes to exactly one row per record."""
    records = write_records(tmp_path, 8)
    want = sorted(json.loads(ln)["id"] for ln in records.read_text().splitlines())
    cfg = write_config(tmp_path, {"rag": {"mode": "retrieve"}})
    with tmpfs(tmp_path / "small", "4m") as small:
        out = small / "out"
        args = run_args(records, out, cfg, *store_args(example_store), "--endpoints", ",".join(llama_endpoints))
        proc, _ = start_run(args)
        wait_for_parts(out, 1, proc)
        filler = small / "filler"
        with filler.open("wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
        _, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("20")]  # minus log lines
        assert proc.returncode == 2, err[-3000:]
        assert "Traceback" not in err and lines[-1].startswith("Error: ") and "No space left" in lines[-1], err
        kept = read_ids(out)
        assert kept and len(kept) == len(set(kept))
        filler.unlink()
        proc, _ = start_run(args)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert sorted(read_ids(out)) == want


@pytest.mark.parametrize("flag, value, key", [("--id-field", "doc_id", "run.id_field"), ("--limit", "1", "run.limit")])
def test_resume_with_a_changed_identity_flag_is_refused_naming_the_key(tmp_path: Path, flag, value, key) -> None:
    """The issue's cases: a changed --id-field used to exit 0 with the old ids, a lower --limit ended in "bug"."""
    from pipeline.config import load_config
    from pipeline.output import OutputDir, input_fingerprint
    from pipeline.run.identity import result_settings, run_identity

    records = tmp_path / "in.jsonl"
    records.write_text("".join(json.dumps({"id": str(i), "doc_id": f"d{i}", "query": f"q{i}"}) + "\n"
                               for i in range(3)))
    cfg_file = write_config(tmp_path)
    out = tmp_path / "out"
    cfg = load_config(cfg_file, {"run.input": str(records), "run.output": str(out)})
    OutputDir(out).prepare(input_path=records, fingerprint=input_fingerprint(records), shard=None, total_records=3,
                           config=cfg.to_dict(), overwrite=False, identity=run_identity(cfg),
                           settings=result_settings(cfg))
    res = _cli(*run_args(records, out, cfg_file, "--endpoints", dead_endpoint(), *unreached_store_args(tmp_path),
                         flag, value))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert f"was started with {key}=" in res.stderr and "Traceback" not in res.stderr
