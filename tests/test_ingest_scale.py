"""Corpus scale: streaming sources, the on-disk ingest ledger (resume after SIGKILL, rebuild,
stale removal), duplicate ids across files, device-aware batch sizes, and `store.shared` (one Chroma server per
node) with real Chroma, the real embedding model and, for the run, real llama.cpp servers."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc

import certifi
import psutil
import pytest

from pipeline.config import EmbeddingConfig, IngestConfig, StoreConfig
from pipeline.corpus.ingest import ingest_source
from pipeline.corpus.ledger import ledger_path
from pipeline.corpus.sources import SourceReport, SqliteSeenIds, iter_source, read_source
from pipeline.errors import ConfigError, InputError
from pipeline.retrieval.embedding import (
    CPU_BATCH_SIZE,
    CUDA_BATCH_SIZE,
    resolve_batch_size,
    resolve_write_batch,
)
from pipeline.store.chroma_files import count_chunks
from pipeline.store.client import open_collection
from pipeline.store.mode import AUTO_MIN_DUPLICATE_BYTES, INDEX_BYTES_PER_CHUNK, decide
from tests.fixtures.llm import requires_llama
from tests.fixtures.store import write_small_corpus
from tests.runtools import (
    REPO,
    processes_with_marker,
    read_rows,
    run_args,
    start_run,
    wait_for_parts,
    wait_no_survivors,
    write_config,
    write_records,
)

EMBED = EmbeddingConfig(device="cpu")
CHUNKED = IngestConfig(chunk_chars=200, chunk_overlap=50)


class CountingEmbedder:
    """The real model, counting the texts it embeds (to check what an ingest re-embeds)."""

    def __init__(self, model):
        self.model = model
        self.texts = 0

    @property
    def device(self):
        return self.model.device

    def encode(self, texts, **kw):
        self.texts += len(texts)
        return self.model.encode(texts, **kw)


def _tiny_jsonl(path, n, start=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(start, start + n):
            fh.write(json.dumps({"_id": f"d{i}", "title": f"T{i}", "text": f"document number {i} " + "w" * 80}) + "\n")
    return path


# --- streaming ---------------------------------------------------------------------------------
def test_iter_source_is_lazy_and_holds_no_corpus(tmp_path):
    src = _tiny_jsonl(tmp_path / "big.jsonl", 20_000)
    report = SourceReport()
    gen = iter_source(src, report=report)
    first = next(gen)
    assert first.doc_id == "d0" and report.documents == 1  # one line read, not 20,000
    gen.close()

    def peak_bytes(fn):
        gc.collect()
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    seen = SqliteSeenIds.temporary(tmp_path / "seen.sqlite")
    n = []
    streamed = peak_bytes(lambda: n.append(sum(1 for _ in iter_source(src, seen=seen))))
    seen.close()
    held = peak_bytes(lambda: read_source(src))
    assert n == [20_000]
    assert held > 8 * 2**20  # the whole corpus as a list: ~2.2 MB of text in 20k Document objects
    assert streamed < 1 * 2**20, f"streaming peaked at {streamed} bytes"


def test_duplicate_id_across_files_is_detected(tmp_path, embedder):
    src = tmp_path / "src"
    _tiny_jsonl(src / "a.jsonl", 3)
    (src / "b.jsonl").write_text(json.dumps({"_id": "d1", "text": "again"}) + "\n", encoding="utf-8")
    store_cfg = StoreConfig(path=str(tmp_path / "store"), collection="dups")
    with pytest.raises(InputError, match=r"b\.jsonl:1: duplicate _id 'd1' \(first at a\.jsonl:2\)"):
        ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    assert not (tmp_path / "store").exists()  # found by the validation pass, before the store is opened
    skip = IngestConfig(chunk_chars=200, chunk_overlap=50, on_error="skip")
    s = ingest_source(src, store_cfg, skip, EMBED, embedder=embedder, progress=False)
    assert s.docs_added == 3 and [x.reason[:15] for x in s.skipped] == ["duplicate _id '"]
    assert open_collection(store_cfg).get(ids=["d1#0"])["documents"][0].startswith("T1 document number 1")


# --- ledger ------------------------------------------------------------------------------------
def test_ledger_lives_in_the_store_and_is_rebuilt_when_lost(tmp_path, embedder):
    src = write_small_corpus(tmp_path / "src")
    store_cfg = StoreConfig(path=str(tmp_path / "store"), collection="small")
    first = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    path = ledger_path(store_cfg, "small")
    assert path == tmp_path / "store" / "ingest" / "small.sqlite" and path.is_file()
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT COUNT(*), SUM(n_chunks) FROM docs").fetchone() == (5, first.chunks_total)

    path.unlink()  # a store written before the ledger existed, or a lost file
    counting = CountingEmbedder(embedder)
    again = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=counting, progress=False)
    assert again.ledger_rebuilt and counting.texts == 0
    assert (again.docs_unchanged, again.chunks_unchanged, again.docs_added) == (5, first.chunks_total, 0)

    # an incomplete document in the collection (a chunk deleted behind the ledger's back) is rewritten
    col = open_collection(store_cfg)
    col.delete(ids=["volcano.txt#1"])
    path.unlink()
    fixed = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=counting, progress=False)
    assert fixed.ledger_rebuilt and (fixed.docs_updated, fixed.docs_unchanged) == (1, 4)
    assert fixed.chunks_total == first.chunks_total
    # the ledger claims more chunks than the collection holds -> rebuilt without being deleted
    col.delete(ids=["bread.md#0"])
    again = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=counting, progress=False)
    assert again.ledger_rebuilt and again.docs_updated == 1 and again.chunks_total == first.chunks_total


def test_reset_and_recreated_collection_invalidate_the_ledger(tmp_path, embedder):
    src = write_small_corpus(tmp_path / "src")
    store_cfg = StoreConfig(path=str(tmp_path / "store"), collection="small")
    ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    s = ingest_source(src, store_cfg, CHUNKED, EMBED, reset=True, embedder=embedder, progress=False)
    assert s.docs_added == 5 and not s.ledger_rebuilt  # new collection id: the old rows do not count


def test_stale_documents_are_removed_through_the_ledger(tmp_path, embedder):
    src = tmp_path / "src"
    _tiny_jsonl(src / "a.jsonl", 30)
    _tiny_jsonl(src / "b.jsonl", 30, start=30)
    store_cfg = StoreConfig(path=str(tmp_path / "store"), collection="stale")
    ingest_source(src, store_cfg, IngestConfig(chunk_chars=0), EMBED, embedder=embedder, progress=False)
    (src / "b.jsonl").unlink()
    _tiny_jsonl(src / "a.jsonl", 25)  # 5 documents of a.jsonl gone too
    s = ingest_source(src, store_cfg, IngestConfig(chunk_chars=0), EMBED, embedder=embedder, progress=False)
    assert (s.docs_unchanged, s.docs_removed, s.chunks_removed, s.chunks_total) == (25, 35, 35, 25)
    ids = set(open_collection(store_cfg).get()["ids"])
    assert ids == {f"d{i}#0" for i in range(25)}
    with sqlite3.connect(ledger_path(store_cfg, "stale")) as con:
        assert con.execute("SELECT COUNT(*) FROM docs").fetchone()[0] == 25


_KILL_SCRIPT = """
import sys
from pipeline.config import EmbeddingConfig, IngestConfig, StoreConfig
from pipeline.corpus.ingest import ingest_source
ingest_source(sys.argv[1], StoreConfig(path=sys.argv[2], collection="resume"),
              IngestConfig(chunk_chars=0, write_batch_chunks=16), EmbeddingConfig(device="cpu"), progress=False)
"""


def test_resume_after_sigkill_embeds_only_unfinished_documents(tmp_path, embedder):
    n_docs = 400
    src = _tiny_jsonl(tmp_path / "src" / "c.jsonl", n_docs)
    store = tmp_path / "store"
    ledger = store / "ingest" / "resume.sqlite"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(src), str(store)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finished() -> int:
        try:
            with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=1) as con:
                return con.execute("SELECT COUNT(*) FROM docs WHERE doc_hash != ''").fetchone()[0]
        except sqlite3.Error:
            return 0

    deadline = time.monotonic() + 300
    while finished() < 48:
        assert proc.poll() is None, f"ingest ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "ingest made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = finished()
    assert 48 <= done < n_docs and done % 16 == 0  # whole write batches are finished, nothing in between

    counting = CountingEmbedder(embedder)
    cfg = IngestConfig(chunk_chars=0, write_batch_chunks=16)
    store_cfg = StoreConfig(path=str(store), collection="resume")
    s = ingest_source(src, store_cfg, cfg, EMBED, embedder=counting, progress=False)
    assert counting.texts == n_docs - done  # finished documents are not embedded again
    assert s.docs_unchanged == done and s.docs_added + s.docs_updated == n_docs - done
    assert s.chunks_total == n_docs and not s.ledger_rebuilt
    assert set(open_collection(store_cfg).get()["ids"]) == {f"d{i}#0" for i in range(n_docs)}
    again = ingest_source(src, store_cfg, cfg, EMBED, embedder=counting, progress=False)
    assert again.docs_unchanged == n_docs and counting.texts == n_docs - done


def test_ledger_location_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    local = StoreConfig(path=str(tmp_path / "s"), collection="c")
    assert ledger_path(local, "c") == tmp_path / "s" / "ingest" / "c.sqlite"
    remote = StoreConfig(chroma_url="http://store-host:8123", collection="c")
    assert ledger_path(remote, "c") == tmp_path / "cache" / "rag-pipeline" / "ingest" / "store-host_8123" / "c.sqlite"
    shared = StoreConfig(chroma_url="http://h:1", bm25_path=str(tmp_path / "shared" / "bm25"), collection="c")
    assert ledger_path(shared, "c") == tmp_path / "shared" / "ingest" / "c.sqlite"


# --- batch sizes -------------------------------------------------------------------------------
def test_embedding_batch_sizes_follow_the_device():
    assert resolve_batch_size(0, "cpu") == CPU_BATCH_SIZE == 64
    assert resolve_batch_size(0, "cuda:3") == resolve_batch_size(0, "cuda") == CUDA_BATCH_SIZE == 256
    assert resolve_batch_size(100, "cuda:0") == resolve_batch_size(100, "cpu") == 100
    assert resolve_write_batch(0, 64) == 512 and resolve_write_batch(0, 256) == 2048
    assert resolve_write_batch(300, 256) == 300


# --- store.shared ------------------------------------------------------------------------------
def test_store_shared_resolution():
    big = AUTO_MIN_DUPLICATE_BYTES // INDEX_BYTES_PER_CHUNK + 1  # chunks whose one extra copy passes the bound
    assert decide("auto", 2, big).shared and "> 1024 MiB" in decide("auto", 2, big).reason
    assert not decide("auto", 2, big - 2).shared
    assert not decide("auto", 1, 10 * big).shared  # one worker: nothing duplicated
    assert decide("auto", 8, big // 7 + 1).shared and not decide("auto", 8, big // 7 - 1).shared
    assert not decide("auto", 8, None).shared  # unknown size (no store yet)
    assert decide("on", 1, 0).shared and not decide("off", 8, 10 * big).shared
    m = decide("on", 8, 10, chroma_url="http://x:1")
    assert m.mode == "server" and not m.shared  # the user's server is already one copy
    with pytest.raises(ConfigError, match="shared"):
        decide("maybe", 2, 1)


def test_count_chunks_reads_the_store_without_chromadb(example_store, tmp_path):
    path = example_store.store_cfg.path
    assert count_chunks(path, ["example"]) == example_store.n_chunks
    assert count_chunks(path, ["example", "absent"]) == example_store.n_chunks
    assert count_chunks(tmp_path / "nothing", ["example"]) is None


@requires_llama
@pytest.mark.slow
def test_run_with_a_shared_store_retrieves_what_a_local_run_does(tmp_path, example_store, llama_endpoints):
    records = write_records(tmp_path, 6)
    cfg = write_config(tmp_path)
    store_copy = tmp_path / "store"
    shutil.copytree(example_store.store_cfg.path, store_copy)
    got = {}
    # a CA bundle set for a user's https server (e.g. in a shared config) does not follow the run's own plain-http
    # server to its RAG workers
    ca = ("--store-ca-file", certifi.where())
    for mode, store, extra in (("off", example_store.store_cfg.path, ()), ("on", str(store_copy), ca)):
        out = tmp_path / f"out-{mode}"
        proc, marker = start_run(run_args(records, out, cfg, "--endpoints", ",".join(llama_endpoints),
                                          "--store", store, "--collection", "example", "--store-shared", mode, *extra))
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert wait_no_survivors(marker) == []  # the Chroma server too
        manifest = json.loads((out / ".rag-pipeline/manifest.json").read_text())
        got[mode] = ({r["id"]: [c["chunk_id"] for c in r["contexts"]] for r in read_rows(out)}, manifest["store"])
    (local, m_local), (shared, m_shared) = got["off"], got["on"]
    assert m_local["mode"] == "local" and m_shared["mode"] == "shared" and m_shared["url"].startswith("http://127.")
    assert m_shared["reason"] == "store.shared = on" and m_shared["chunks"] == example_store.n_chunks
    assert len(local) == 6 and all(local.values()) and shared == local
    port = int(m_shared["url"].rsplit(":", 1)[1])  # the server is gone: nothing listens on its port any more
    assert not any(c.laddr.port == port for c in psutil.net_connections() if c.status == psutil.CONN_LISTEN)


@requires_llama
@pytest.mark.slow
def test_shared_store_server_killed_mid_run_is_restarted_without_failure_rows(tmp_path, example_store,
                                                                              llama_endpoints):
    """The run's own Chroma server (store.shared = on) killed with SIGKILL mid-run: RAG dispatch pauses, the run
    starts it again on the same port, the records whose retrieval failed meanwhile are sent again; no row carries
    a store error and the run completes."""
    records = write_records(tmp_path, 12)
    cfg = write_config(tmp_path, {"retrieval": {"query_batch_size": 2}, "run": {"queue_size": 2}})
    store_copy = tmp_path / "store"
    shutil.copytree(example_store.store_cfg.path, store_copy)
    out = tmp_path / "out"
    proc, marker = start_run(run_args(records, out, cfg, "--endpoints", ",".join(llama_endpoints), "--store",
                                      str(store_copy), "--collection", "example", "--store-shared", "on"))
    wait_for_parts(out, 1, proc)
    chroma = [p for p in processes_with_marker(marker) if " run --path " in " ".join(p.cmdline())]
    assert len(chroma) == 1, [p.cmdline() for p in processes_with_marker(marker)]
    os.killpg(chroma[0].pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "Chroma server" in err and "exited" in err and "is back" in err, err[-3000:]
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == sorted(json.loads(x)["id"] for x in records.read_text().splitlines())
    assert not [r for r in rows if "StoreError" in (r["rag_error"] or "")], [r["rag_error"] for r in rows]
    assert all(r["rag_status"] != "hard_fail" for r in rows)
    assert wait_no_survivors(marker) == []
