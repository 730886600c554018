"""Ingestion into a real ChromaDB with the real packaged embedding model (pipeline/corpus/ingest.py, `ingest` CLI)."""

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import EmbeddingConfig, IngestConfig, StoreConfig
from pipeline.corpus.ingest import ingest_source
from pipeline.errors import InputError, StoreError
from pipeline.retrieval.retriever import Retriever
from pipeline.store.client import open_collection, writer_lock
from tests.fixtures.store import SMALL_QUERIES, make_pdf, write_small_corpus

EMBED = EmbeddingConfig(device="cpu")
CHUNKED = IngestConfig(chunk_chars=200, chunk_overlap=50)


def _store(tmp_path, name="small"):
    return StoreConfig(path=str(tmp_path / "store"), collection=name)


def _snapshot(store_cfg):
    """Everything stored: {chunk id: (document, metadata, embedding)}."""
    col = open_collection(store_cfg, create=False)
    res = col.get(include=["documents", "metadatas", "embeddings"])
    return {
        cid: (doc, meta, np.asarray(emb, dtype=np.float32))
        for cid, doc, meta, emb in zip(res["ids"], res["documents"], res["metadatas"], res["embeddings"], strict=True)
    }


def _same(a, b):
    return a.keys() == b.keys() and all(
        a[k][0] == b[k][0] and a[k][1] == b[k][1] and np.array_equal(a[k][2], b[k][2]) for k in a
    )


def _top_doc(store_cfg, embedder, query):
    return Retriever(store_cfg, embedder).search([query], top_k=1)[0].hits[0].doc_id


def test_ingest_then_query_finds_the_right_document(tmp_path, embedder):
    src = write_small_corpus(tmp_path / "src")
    store_cfg = _store(tmp_path)
    s = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    assert (s.docs_added, s.docs_updated, s.docs_unchanged, s.docs_removed) == (5, 0, 0, 0)
    assert s.chunks_added == s.chunks_total > 5  # the longer files give several chunks
    assert s.chunks_per_s > 0 and "documents added 5" in s.line()
    assert json.loads(json.dumps(s.as_dict()))["docs_added"] == 5

    snap = _snapshot(store_cfg)
    for cid, (text, meta, emb) in snap.items():
        doc_id, idx = cid.rsplit("#", 1)
        assert meta["doc_id"] == doc_id and meta["chunk_index"] == int(idx)
        assert 0 <= meta["chunk_index"] < meta["n_chunks"] and meta["chunking"] == "200/50"
        assert len(text) <= 200 and emb.shape == (384,) and abs(float(np.linalg.norm(emb)) - 1) < 1e-3
    vol = [v for k, v in snap.items() if k.startswith("volcano.txt#")]
    full = (src / "volcano.txt").read_text(encoding="utf-8").strip()
    assert len(vol) == vol[0][1]["n_chunks"] >= 2
    assert vol[0][1]["doc_hash"] == hashlib.sha256(full.encode()).hexdigest()
    assert vol[0][1]["source"] == "volcano.txt"
    assert snap["sat-1#0"][1]["source"] == "corpus/sat.jsonl"

    results = Retriever(store_cfg, embedder).search(list(SMALL_QUERIES.values()), top_k=3)
    assert [r.hits[0].doc_id for r in results] == list(SMALL_QUERIES)


def test_reingest_is_a_noop(tmp_path, embedder):
    src = write_small_corpus(tmp_path / "src")
    store_cfg = _store(tmp_path)
    first = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    before = _snapshot(store_cfg)
    again = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    assert (again.docs_added, again.docs_updated, again.docs_unchanged, again.docs_removed) == (0, 0, 5, 0)
    assert again.chunks_written == 0 and again.chunks_removed == 0
    assert again.chunks_unchanged == again.chunks_total == first.chunks_total
    assert _same(before, _snapshot(store_cfg))


def test_edit_and_remove_files_update_and_remove_their_chunks(tmp_path, embedder):
    src = write_small_corpus(tmp_path / "src")
    store_cfg = _store(tmp_path)
    ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    before = _snapshot(store_cfg)
    old_bread = {k for k in before if k.startswith("bread.md#")}
    assert len(old_bread) >= 2

    (src / "bread.md").write_text("Rye bread is dense and dark because rye has little gluten.", encoding="utf-8")
    (src / "volcano.txt").unlink()
    s = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    assert (s.docs_added, s.docs_updated, s.docs_unchanged, s.docs_removed) == (0, 1, 3, 1)
    assert s.chunks_updated == 1

    after = _snapshot(store_cfg)
    assert not any(k.startswith("volcano.txt#") for k in after)
    assert {k for k in after if k.startswith("bread.md#")} == {"bread.md#0"}
    assert after["bread.md#0"][1]["n_chunks"] == 1 and after["bread.md#0"][0].startswith("Rye bread")
    assert after["bread.md#0"][1]["doc_hash"] != before["bread.md#0"][1]["doc_hash"]
    # untouched documents keep their chunks byte for byte
    for k, v in before.items():
        if not k.startswith(("bread.md#", "volcano.txt#")):
            assert _same({k: v}, {k: after[k]})
    n_volcano = sum(1 for k in before if k.startswith("volcano.txt#"))
    assert s.chunks_removed == (len(old_bread) - 1) + n_volcano
    assert s.chunks_total == len(after) == len(before) - s.chunks_removed
    assert _top_doc(store_cfg, embedder, "Why is rye bread dense?") == "bread.md"
    assert _top_doc(store_cfg, embedder, "Which volcano in Sicily erupts often?") != "volcano.txt"


def test_changed_chunking_rewrites_every_document(tmp_path, embedder):
    src = write_small_corpus(tmp_path / "src")
    store_cfg = _store(tmp_path)
    ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    s = ingest_source(src, store_cfg, IngestConfig(chunk_chars=0), EMBED, embedder=embedder, progress=False)
    assert (s.docs_updated, s.chunks_updated, s.chunks_total) == (5, 5, 5)
    assert sorted(_snapshot(store_cfg)) == sorted(f"{d}#0" for d in SMALL_QUERIES)


def _break(src, case):
    """Add one bad input of class ``case`` to the corpus folder; return (source arg, expected message start)."""
    if case == "missing-source":
        return src / "does-not-exist", f"{src / 'does-not-exist'}: source not found"
    if case == "corrupt-pdf":
        make_pdf(src / "good.pdf", ["A fine page."])
        bad = src / "zz.pdf"
        bad.write_bytes((src / "good.pdf").read_bytes()[:60])
        return src, f"{bad}: corrupt or unreadable PDF"
    if case == "non-utf8":
        bad = src / "latin1.txt"
        bad.write_bytes("first line\ncaf\xe9\n".encode("latin-1"))
        return src, f"{bad}:2: not valid UTF-8"
    bad = src / "corpus" / "sat.jsonl"
    line = {"invalid-json": '{"_id": "sat-3", "text": "unterminated',
            "missing-id": '{"title": "no id", "text": "x"}',
            "missing-text": '{"_id": "sat-3", "title": "no text"}'}[case]
    with bad.open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    reason = {"invalid-json": "invalid JSON", "missing-id": "field '_id' is missing",
              "missing-text": "field 'text' is missing"}[case]
    return src, f"{bad}:3: {reason}"


BAD_CASES = ["missing-source", "corrupt-pdf", "invalid-json", "missing-id", "missing-text", "non-utf8"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_and_leaves_the_store_intact(tmp_path, embedder, case):
    src = write_small_corpus(tmp_path / "src")
    store_cfg = _store(tmp_path)
    ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    before = _snapshot(store_cfg)
    query = SMALL_QUERIES["volcano.txt"]
    hits_before = Retriever(store_cfg, embedder).search([query], top_k=3)[0].hits

    (src / "volcano.txt").write_text("Changed text that must not be written.", encoding="utf-8")
    source, expected = _break(src, case)
    for reset in (False, True):  # even --reset does not touch the store before SOURCE is validated
        with pytest.raises(InputError) as err:
            ingest_source(source, store_cfg, CHUNKED, EMBED, reset=reset, embedder=embedder, progress=False)
        assert str(err.value).startswith(expected), str(err.value)

    assert _same(before, _snapshot(store_cfg))
    hits_after = Retriever(store_cfg, embedder).search([query], top_k=3)[0].hits
    assert [(h.chunk_id, round(h.score, 5)) for h in hits_after] == [
        (h.chunk_id, round(h.score, 5)) for h in hits_before
    ]


def test_skip_mode_ingests_the_rest_and_keeps_a_bad_files_stored_documents(tmp_path, embedder):
    src = write_small_corpus(tmp_path / "src")
    store_cfg = _store(tmp_path)
    ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    n_sat = sum(1 for k in _snapshot(store_cfg) if k.startswith("sat-"))
    jsonl = src / "corpus" / "sat.jsonl"
    jsonl.write_bytes(b"\xff\xfe not utf-8 at all \x80\n")  # the whole file is now bad
    (src / "new.txt").write_text("A new document about tidal power stations.", encoding="utf-8")

    skip = IngestConfig(chunk_chars=200, chunk_overlap=50, on_error="skip")
    s = ingest_source(src, store_cfg, skip, EMBED, embedder=embedder, progress=False)
    assert [str(x) for x in s.skipped] == [f"{jsonl}:1: not valid UTF-8 (byte 0 of the line)"]
    assert (s.docs_added, s.docs_removed) == (1, 0)  # sat-1/sat-2 stay: their file was skipped, not emptied
    snap = _snapshot(store_cfg)
    assert sum(1 for k in snap if k.startswith("sat-")) == n_sat
    assert _top_doc(store_cfg, embedder, "tidal power") == "new.txt"


def test_a_second_writer_is_refused(tmp_path, embedder):
    src = write_small_corpus(tmp_path / "src")
    store_cfg = _store(tmp_path)
    with writer_lock(store_cfg), pytest.raises(StoreError, match="another ingest is writing"):
        ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ingest_and_search_through_a_chroma_server(tmp_path, embedder):
    """store.chroma_url: the same ingest + search against a real `chroma run` server."""
    port = _free_port()
    chroma = shutil.which("chroma", path=str(Path(sys.executable).parent))
    assert chroma, "the chroma CLI is installed with chromadb"
    proc = subprocess.Popen(
        [chroma, "run", "--path", str(tmp_path / "server"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{url}/api/v2/heartbeat", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "chroma server did not start"
            time.sleep(0.2)
        store_cfg = StoreConfig(path=str(tmp_path / "unused"), collection="remote", chroma_url=url)
        src = write_small_corpus(tmp_path / "src")
        s = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
        assert s.docs_added == 5 and s.store == url
        assert _top_doc(store_cfg, embedder, SMALL_QUERIES["sat-2"]) == "sat-2"
        assert not (tmp_path / "unused").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- CLI ---------------------------------------------------------------------------------------
def test_cli_ingest_prints_a_summary_line(tmp_path):
    """The summary is on stdout once; at the default verbosity stderr does not repeat it."""
    src = write_small_corpus(tmp_path / "src")
    store = tmp_path / "store"
    args = ["ingest", str(src), "--store", str(store), "--collection", "cli-test", "--chunk-chars", "300",
            "--chunk-overlap", "60", "--device", "cpu", "--no-progress"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "documents added 5, updated 0, unchanged 0, removed 0" in lines[0]
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [ln for ln in proc.stdout.splitlines() if "documents added 0, updated 0, unchanged 5, removed 0" in ln]
    assert "documents added" not in proc.stderr


@pytest.mark.parametrize("case", ["missing-source", "invalid-json", "bad-option"])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, case):
    src = write_small_corpus(tmp_path / "src")
    extra = []
    if case == "missing-source":
        source, expected = str(tmp_path / "nope"), f"Error: {tmp_path / 'nope'}: source not found"
    elif case == "invalid-json":
        (src / "corpus" / "sat.jsonl").write_text('{"_id": "a", "text": "ok"}\n{oops\n', encoding="utf-8")
        source, expected = str(src), f"Error: {src / 'corpus' / 'sat.jsonl'}:2: invalid JSON"
    else:
        source, expected, extra = str(src), "Error: Invalid value for '--on-error'", ["--on-error", "ignore"]
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ingest", source, "--store", str(tmp_path / "store"),
         "--collection", "docs", "--no-progress", *extra],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    err_lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Error")]
    assert len(err_lines) == 1 and err_lines[0].startswith(expected), res.stderr
    if case != "bad-option":
        assert res.stderr.strip().count("\n") == 0, res.stderr
    assert not (tmp_path / "store").exists()


def test_cli_help_for_ingest_and_eval():
    for cmd in ("ingest", "eval-retrieval"):
        res = CliRunner().invoke(main, [cmd, "--help"])
        assert res.exit_code == 0 and "--store" in res.output and "--collection" in res.output


def test_example_records_match_queries():
    """data/example/records.jsonl holds the same claims as queries.jsonl (the input of `make run`)."""
    from tests.fixtures.store import EXAMPLE_DIR

    queries = [json.loads(x) for x in (EXAMPLE_DIR / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    records = [json.loads(x) for x in (EXAMPLE_DIR / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 40
    assert [(r["claim_id"], r["query"]) for r in records] == [(int(q["_id"]), q["text"]) for q in queries]
    assert len({r["id"] for r in records}) == 40
