"""Staging a real Chroma store on the node (pipeline/store/staging.py): two processes share one copy, a copy is
checked and reused, an ingest makes a new version, stale versions go, a damaged copy is made again, a running
ingest and a full disk are refused with one line, and `run --ingest` / `submit --ingest` are refused.

The stores are real Chroma stores (random float32 [n, 384] embeddings written by chromadb in a child process);
the full disk is a real 2 MiB tmpfs (skipped where mounting is not allowed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.errors import StoreError
from pipeline.store import chroma_files
from pipeline.store.client import writer_lock
from pipeline.store.staging import stage_store, store_key

REPO = Path(__file__).resolve().parents[1]

_WRITE = textwrap.dedent("""
    import sys, numpy as np, chromadb
    from chromadb.config import Settings
    path, name, start, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    c = chromadb.PersistentClient(path, settings=Settings(anonymized_telemetry=False))
    col = c.get_or_create_collection(name, configuration={"hnsw": {"space": "cosine"}}, embedding_function=None)
    rng = np.random.default_rng(start)
    col.add(ids=[f"d{i}#0" for i in range(start, start + n)], embeddings=rng.random((n, 384), dtype=np.float32),
            documents=[f"text {i}" for i in range(start, start + n)])
""")


_READ = textwrap.dedent("""
    import sys, numpy as np, chromadb
    from chromadb.config import Settings
    c = chromadb.PersistentClient(sys.argv[1], settings=Settings(anonymized_telemetry=False))
    col = c.get_collection("docs", embedding_function=None)
    col.query(query_embeddings=np.random.default_rng(0).random((2, 384), dtype=np.float32), n_results=5)
""")


def write_chunks(store: Path, n: int, start: int = 0, name: str = "docs") -> None:
    """Add ``n`` chunks to collection ``name`` of the local store ``store`` (chromadb, in a child process)."""
    subprocess.run([sys.executable, "-c", _WRITE, str(store), name, str(start), str(n)], check=True, timeout=300)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A real Chroma store with 300 chunks in ``docs`` and a BM25 folder, as an ingest leaves them."""
    path = tmp_path / "shared" / "store"
    write_chunks(path, 300)
    (path / "bm25" / "docs").mkdir(parents=True)
    (path / "bm25" / "docs" / "index.bin").write_bytes(os.urandom(4096))
    (path / "ingest").mkdir()
    (path / "ingest" / "docs.sqlite").write_bytes(b"ledger")  # the ingest ledger is not copied
    return path


def _cfg(store: Path, **fields):
    import dataclasses

    return dataclasses.replace(Config().store, path=str(store), collection="docs", **fields)


_STAGE = textwrap.dedent("""
    import json, sys, time, dataclasses
    from pipeline.config import Config
    from pipeline.store.staging import stage_store
    cfg = dataclasses.replace(Config().store, path=sys.argv[1], collection="docs")
    t0 = time.time()
    with stage_store(cfg, sys.argv[2], keep_h=float(sys.argv[3])) as s:
        print(json.dumps({**s.as_dict(), "entered": time.time(), "t0": t0}), flush=True)
        time.sleep(float(sys.argv[4]))
""")


def _stage_process(store: Path, local: Path, keep_h: float = 24.0, hold_s: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _STAGE, str(store), str(local), str(keep_h), str(hold_s)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_two_processes_on_one_node_share_one_checked_copy(store: Path, tmp_path: Path) -> None:
    local = tmp_path / "node-local"
    procs = [_stage_process(store, local, hold_s=1.0) for _ in range(2)]
    a, b = (_result(p) for p in procs)
    assert a["path"] == b["path"] and a["version"] == b["version"]
    assert sorted([a["copied"], b["copied"]]) == [False, True]  # one copied, the other found the copy
    copy = Path(a["path"])
    assert copy.parent == local / store_key(store.resolve())
    assert chroma_files.chunks_per_collection(copy) == {"docs": 300}
    assert (copy / "bm25" / "docs" / "index.bin").read_bytes() == (store / "bm25" / "docs" / "index.bin").read_bytes()
    assert not (copy / "ingest").exists() and not (copy / ".rag-pipeline-ingest.lock").exists()
    assert [p.name for p in copy.parent.iterdir() if p.is_dir()] == [a["version"]]  # one copy, no partial left
    meta = json.loads((copy.parent / f"{a['version']}.json").read_text())
    assert meta["chunks"] == {"docs": 300} and meta["source"] == str(store.resolve())


def test_reuse_new_version_stale_cleanup_and_repair(store: Path, tmp_path: Path) -> None:
    local = tmp_path / "node-local"
    cfg = _cfg(store)
    with stage_store(cfg, local) as first:
        assert first.copied
        # a client reading the copy (and one reading the source) changes the SQLite file's time, not the version
        sqlite = Path(first.path) / chroma_files.SQLITE_FILE
        before = sqlite.stat().st_mtime_ns
        for path in (first.path, store):
            subprocess.run([sys.executable, "-c", _READ, str(path)], check=True, timeout=300)
        assert sqlite.stat().st_mtime_ns != before
    with stage_store(cfg, local) as again:
        assert not again.copied and again.version == first.version

    write_chunks(store, 50, start=300)  # an ingest: a new version of the store
    holder = _stage_process(store, local, hold_s=30.0)  # a run on this node reads the new version meanwhile
    try:
        line = holder.stdout.readline()  # type: ignore[union-attr]
        held = json.loads(line)
        assert held["copied"] and held["version"] != first.version
        assert chroma_files.chunks_per_collection(held["path"]) == {"docs": 350}
        # a copy in use that fails its check is never deleted under its reader: one line instead
        victim = next(p for p in Path(held["path"]).rglob("*.bin") if p.stat().st_size > 0)
        original = victim.read_bytes()
        victim.write_bytes(original[:-1])
        with pytest.raises(StoreError, match="fails its check .* while another run uses it") as exc:
            with stage_store(cfg, local):
                pass
        assert "\n" not in str(exc.value) and Path(held["path"]).is_dir()
        victim.write_bytes(original)
        # keep_h = 0: the old, unused version goes; the one in use by the other process stays
        write_chunks(store, 10, start=350)
        with stage_store(cfg, local, keep_h=0.0) as third:
            assert third.removed == (first.version,)
            assert not Path(first.path).exists() and Path(held["path"]).is_dir()
    finally:
        holder.terminate()
        holder.communicate(timeout=60)
    with stage_store(cfg, local, keep_h=0.0) as fourth:  # nobody uses it now: it goes too
        assert fourth.removed == (held["version"],) and not fourth.copied

    # a damaged copy fails its check and is made again
    victim = next(p for p in Path(fourth.path).rglob("*.bin") if p.stat().st_size > 0)
    victim.write_bytes(victim.read_bytes()[:-1])
    with stage_store(cfg, local) as fifth:
        assert fifth.copied and fifth.version == fourth.version
        assert victim.stat().st_size == (store / victim.relative_to(fourth.path)).stat().st_size
    # a copy without its .json (its stager died between the rename and the record) is made again
    (Path(fifth.path).parent / f"{fifth.version}.json").unlink()
    with stage_store(cfg, local) as sixth:
        assert sixth.copied and chroma_files.chunks_per_collection(sixth.path) == {"docs": 360}


def test_bm25_path_outside_the_store_is_copied_with_it(store: Path, tmp_path: Path) -> None:
    bm25 = tmp_path / "shared" / "bm25-elsewhere"
    (bm25 / "docs").mkdir(parents=True)
    (bm25 / "docs" / "params.json").write_text("{}")
    with stage_store(_cfg(store, bm25_path=str(bm25)), tmp_path / "node-local") as s:
        assert Path(s.bm25_path) == Path(s.path) / "_bm25"
        assert (Path(s.bm25_path) / "docs" / "params.json").read_text() == "{}"
        assert s.store_config(_cfg(store, bm25_path=str(bm25))).path == s.path


def test_an_ingest_in_progress_refuses_staging_and_staging_refuses_an_ingest(store: Path, tmp_path: Path) -> None:
    cfg = _cfg(store)
    with writer_lock(cfg):
        with pytest.raises(StoreError, match="an ingest is writing to this store now") as exc:
            with stage_store(cfg, tmp_path / "node-local"):
                pass
        assert "\n" not in str(exc.value)
    holder = _stage_process(store, tmp_path / "node-local", hold_s=0.0)
    _result(holder)
    from pipeline.store.client import reader_lock

    with reader_lock(cfg):  # what a stager holds while it copies
        with pytest.raises(StoreError, match="or a run is copying it"):
            with writer_lock(cfg):
                pass


def test_not_enough_free_space_is_one_line_before_copying(store: Path, tmp_path: Path) -> None:
    small = tmp_path / "small-disk"
    small.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.decode().strip()}")
    try:
        with pytest.raises(StoreError) as exc:
            with stage_store(_cfg(store), small):
                pass
        msg = str(exc.value)
        assert "not enough free space to stage the store" in msg and "\n" not in msg and "MiB free" in msg
        key_dir = small / store_key(store.resolve())
        assert [p.name for p in key_dir.iterdir()] == [".stage.lock"]  # nothing copied
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_run_on_a_full_node_disk_stops_in_one_line_before_any_server(store: Path, tmp_path: Path) -> None:
    small = tmp_path / "small-disk"
    small.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.decode().strip()}")
    try:
        inp = tmp_path / "in.jsonl"
        inp.write_text('{"id": 1, "query": "q"}\n')
        res = _cli("run", "--input", str(inp), "--output", str(tmp_path / "out"), "--store", str(store),
                   "--collection", "docs", "--store-local-dir", str(small), "--endpoints", "http://127.0.0.1:9",
                   "--no-progress")
        assert res.returncode == 4, res.stderr
        (line,) = [x for x in res.stderr.splitlines() if x.startswith("Error:")]
        assert line.startswith(f"Error: {small}/") and "not enough free space to stage the store" in line
        assert "Traceback" not in res.stderr
        main_log = (tmp_path / "out" / ".rag-pipeline/logs" / "main.log").read_text()
        assert "endpoint" not in main_log.split("not enough free space")[0].lower()  # no server was reached first
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_run_refuses_to_ingest_into_a_staged_store(store: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "query": "q"}\n')
    out = tmp_path / "out"
    res = _cli("run", "--input", str(inp), "--output", str(out), "--store", str(store), "--collection", "docs",
               "--ingest", str(inp), "--store-local-dir", str(tmp_path / "node-local"))
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("Error: --ingest with store.local_dir") and "ingest first" in line
    assert not out.exists() and not (tmp_path / "node-local").exists()
    res = _cli("run", "--input", str(inp), "--output", str(out), "--store", str(store), "--collection", "docs",
               "--reset-collection", "--store-local-dir", str(tmp_path / "node-local"))
    assert res.returncode == 2 and res.stderr.startswith("Error: --reset-collection with store.local_dir"), res.stderr
    assert not out.exists() and not (tmp_path / "node-local").exists()


def test_submit_refuses_ingest_in_the_tasks(store: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "query": "q"}\n')
    out = tmp_path / "out"
    res = _cli("submit", "--input", str(inp), "--output", str(out), "--nodes", "2", "--dry-run", "--",
               "--store", str(store), "--collection", "docs", "--ingest", str(inp))
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert "--ingest" in line and "ingest first" in line and "then submit" in line
    assert not out.exists()
    reset = _cli("submit", "--input", str(inp), "--output", str(out), "--nodes", "2", "--dry-run", "--",
                 "--store", str(store), "--collection", "docs", "--reset-collection")
    assert reset.returncode == 2 and "--reset-collection" in reset.stderr and "then submit" in reset.stderr
    ok = _cli("submit", "--input", str(inp), "--output", str(out), "--nodes", "2", "--dry-run", "--",
              "--store", str(store), "--collection", "docs")
    assert ok.returncode == 0, ok.stderr
    user = __import__("getpass").getuser()
    assert f"--store-local-dir /tmp/rag-pipeline-stores-{user}" in ok.stdout
    off = _cli("submit", "--input", str(inp), "--output", str(out), "--nodes", "2", "--dry-run",
               "--store-local-dir", "", "--", "--store", str(store), "--collection", "docs")
    assert off.returncode == 0 and "--store-local-dir" not in off.stdout
    time.sleep(0)  # nothing was submitted or written
    assert not out.exists()
