"""One writer and one identity per output directory: the heartbeat lock, takeover of a dead
holder's lock, the tombstoned --overwrite, and the identity / settings pinned in .rag-pipeline/run.json."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.output import OutputDir, input_fingerprint
from pipeline.output.layout import LOCK_FILE, meta_path
from pipeline.output.lock import DirLock, LockHeld
from pipeline.run.identity import result_settings, run_identity
from tests.runtools import REPO

HOLDER = textwrap.dedent("""
    import sys, time
    from pipeline.output.lock import DirLock
    lock = DirLock(sys.argv[1], refresh_s=0.2, stale_s=2.0)
    lock.acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def _holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_naming_host_and_pid_and_release_frees_it(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockHeld) as exc:
            DirLock(tmp_path).acquire()
        assert time.monotonic() - t0 < 2.0  # refused at once
        assert f"pid {proc.pid}" in str(exc.value) and socket.gethostname() in str(exc.value)
        # the holder's heartbeat moves the mtime forward
        m1 = meta_path(tmp_path, LOCK_FILE).stat().st_mtime
        time.sleep(0.6)
        assert meta_path(tmp_path, LOCK_FILE).stat().st_mtime > m1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    with DirLock(tmp_path) as lock:  # a terminated holder's lock is taken over at once (its pid is gone)
        assert json.loads(meta_path(tmp_path, LOCK_FILE).read_text())["token"] == lock.token
    assert not meta_path(tmp_path, LOCK_FILE).exists()


def test_lock_of_a_killed_process_is_taken_over_at_once(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert meta_path(tmp_path, LOCK_FILE).exists()  # kill -9 left it behind
    lock = DirLock(tmp_path)
    lock.acquire()
    try:
        assert json.loads(meta_path(tmp_path, LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def _remote_lock(directory: Path, age_s: float) -> None:
    """A lock written by a process on another node of a shared filesystem (pid not checkable here)."""
    info = {"host": "other-node", "pid": 12345, "boot_id": "x", "pid_ns": "y", "token": "remote", "started": "t"}
    path = meta_path(directory, LOCK_FILE)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(info))
    now = time.time()
    os.utime(path, (now - age_s, now - age_s))


def test_remote_lock_is_honoured_while_its_heartbeat_is_fresh_and_taken_over_when_stale(tmp_path: Path) -> None:
    _remote_lock(tmp_path, age_s=1.0)
    with pytest.raises(LockHeld, match="host other-node, pid 12345"):
        DirLock(tmp_path, stale_s=30.0).acquire()
    _remote_lock(tmp_path, age_s=120.0)
    with DirLock(tmp_path, stale_s=30.0) as lock:
        assert json.loads(meta_path(tmp_path, LOCK_FILE).read_text())["token"] == lock.token


def test_remote_lock_that_missed_heartbeats_is_watched_until_stale(tmp_path: Path) -> None:
    """A job requeued on another node right after its node died: it waits for the lock instead of failing."""
    _remote_lock(tmp_path, age_s=2.0)
    t0 = time.monotonic()
    with DirLock(tmp_path, refresh_s=0.5, stale_s=4.0) as lock:
        waited_s = time.monotonic() - t0
        assert json.loads(meta_path(tmp_path, LOCK_FILE).read_text())["token"] == lock.token
    assert 1.0 < waited_s < 10.0


CONTENDER = textwrap.dedent("""
    import sys, time
    from pipeline.output.lock import DirLock, LockHeld
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    try:
        DirLock(sys.argv[1], stale_s=30.0).acquire()
        print("won", flush=True)
        time.sleep(3)
    except LockHeld:
        print("refused", flush=True)
""")


def test_many_contenders_for_a_stale_lock_exactly_one_wins(tmp_path: Path) -> None:
    _remote_lock(tmp_path, age_s=120.0)
    start_at = time.time() + 8.0
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path), str(start_at)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["refused"] * 5 + ["won"], outs


# ------------------------------------------------------------------ identity, settings, --overwrite ordering


@pytest.fixture
def inp(tmp_path: Path) -> Path:
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"id": str(i), "query": f"q{i}"}) + "\n" for i in range(4)))
    return p


def _prepare(out: Path, inp: Path, overrides: dict | None = None, *, overwrite: bool = False,
             allow: bool = False) -> OutputDir:
    cfg = load_config(None, overrides or {})
    od = OutputDir(out)
    total = min(4, cfg.run.limit) if cfg.run.limit else 4  # the records of the 4-line input the run would hold
    od.prepare(input_path=inp, fingerprint=input_fingerprint(inp), shard=None, total_records=total,
               config=cfg.to_dict(), overwrite=overwrite, identity=run_identity(cfg),
               settings=result_settings(cfg), allow_config_change=allow)
    return od


def _commit(od: OutputDir, ids: list[str]) -> None:
    import pyarrow as pa

    from pipeline.output import row_schema

    rows = [{"id": i, "query": "q", "rag_status": "ok", "gen_status": "ok"} for i in ids]
    od.commit_part(pa.Table.from_pylist(rows, schema=row_schema({})))


@pytest.mark.parametrize("key, value", [("run.id_field", "doc_id"), ("run.limit", 2), ("run.query_field", "text"),
                                        ("run.on_bad_record", "skip"), ("run.max_query_chars", 100)])
def test_resume_with_another_identity_is_refused_naming_the_key(tmp_path: Path, inp: Path, key: str, value) -> None:
    out = tmp_path / "out"
    _commit(_prepare(out, inp), ["0", "1"])
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        _prepare(out, inp, {key: value})
    assert OutputDir(out).committed_ids() == {"0", "1"}  # nothing touched
    _prepare(out, inp, {key: value}, overwrite=True)
    assert OutputDir(out).committed_ids() == set()


def test_changed_prompt_or_model_needs_allow_config_change(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "out"
    prompt = tmp_path / "gen.txt"
    prompt.write_text("Answer: {query}\n{context}\n")
    _commit(_prepare(out, inp, {"generation.prompt_file": str(prompt)}), ["0"])
    _prepare(out, inp, {"generation.prompt_file": str(prompt), "generation.num_processes": 1})  # operational
    prompt.write_text("Answer briefly: {query}\n{context}\n")
    with pytest.raises(InputError, match=r"generation\.prompt_file changed.*--allow-config-change"):
        _prepare(out, inp, {"generation.prompt_file": str(prompt)})
    with pytest.raises(InputError, match=r"llm\.model changed"):
        _prepare(out, inp, {"llm.model": "other"})
    _prepare(out, inp, {"generation.prompt_file": str(prompt), "rag.max_tokens": 9}, allow=True)
    info = json.loads((out / ".rag-pipeline/run.json").read_text())
    assert {c["key"] for c in info["config_changes"]} == {"generation.prompt_file", "rag.max_tokens"}
    assert OutputDir(out).committed_ids() == {"0"}


def test_interrupted_overwrite_never_leaves_adoptable_parts(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "out"
    od = _prepare(out, inp)
    _commit(od, ["0"])
    _commit(od, ["1"])
    # the first step of --overwrite, then "kill -9": the identity is a tombstone, the old parts are still there
    from pipeline.output.files import atomic_write_json

    atomic_write_json(out / ".rag-pipeline/run.json", {"state": "overwriting", "since": "now"})
    with pytest.raises(InputError, match="--overwrite was interrupted"):
        _prepare(out, inp)
    # parts without any run.json (e.g. deleted by hand) are not adopted either
    (out / ".rag-pipeline/run.json").unlink()
    with pytest.raises(InputError, match="no run.json"):
        _prepare(out, inp)
    _prepare(out, inp, overwrite=True)
    assert OutputDir(out).parts() == []
    assert "identity" in json.loads((out / ".rag-pipeline/run.json").read_text())


OVERWRITER = textwrap.dedent("""
    import sys
    from pipeline.config import load_config
    from pipeline.run.identity import result_settings, run_identity
    from pipeline.output import OutputDir, input_fingerprint
    out, inp = sys.argv[1], sys.argv[2]
    cfg = load_config(None, {})
    print("go", flush=True)
    OutputDir(out).prepare(input_path=inp, fingerprint=input_fingerprint(inp), shard=None, total_records=4,
                           config=cfg.to_dict(), overwrite=True, identity=run_identity(cfg),
                           settings=result_settings(cfg))
""")


def test_kill9_during_overwrite_at_random_moments_never_adopts_old_parts(tmp_path: Path, inp: Path) -> None:
    import random

    seed = int(os.environ.get("RAG_PIPELINE_TEST_SEED", time.time()))
    rng = random.Random(seed)
    for attempt in range(4):
        out = tmp_path / f"out{attempt}"
        od = _prepare(out, inp, {"run.limit": 3})  # another identity than the overwriting run's
        for i in range(60):
            _commit(od, [f"{i}"])
        proc = subprocess.Popen([sys.executable, "-c", OVERWRITER, str(out), str(inp)], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "go"
        time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()
        proc.wait(timeout=10)
        info = json.loads((out / ".rag-pipeline/run.json").read_text())
        try:  # a plain resume either keeps the old run whole, or is refused; it never adopts a subset
            _prepare(out, inp, {"run.limit": 3})
            assert len(OutputDir(out).parts()) == 60, f"seed {seed}"
        except InputError as exc:
            assert "overwrite was interrupted" in str(exc) or "run.limit" in str(exc), f"seed {seed}: {exc}"
            if "run.limit" in str(exc):  # the overwrite finished: its identity, and no old part left
                assert info.get("identity", {}).get("run.limit") == 0 and OutputDir(out).parts() == []
