"""BM25 index and hybrid retrieval with the real bm25s index, real Chroma and the real embedding model.

The BM25 index must follow the collection through ingest exactly like the Chroma collection does (idempotent
re-ingest, edits, removals), readers must never use a stale build, and each retrieval mode must find the right
documents. RRF is checked on hand-computed cases.
"""

import dataclasses
import json
import logging
import shutil

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import EmbeddingConfig, IngestConfig, StoreConfig, load_config
from pipeline.corpus.ingest import ingest_source
from pipeline.errors import ConfigError
from pipeline.retrieval.bm25 import (
    BUILD_KEY,
    BM25Index,
    BM25Settings,
    build_marker,
    ensure_index,
    index_root,
    open_index,
    tokenize,
)
from pipeline.retrieval.retriever import Retriever, rrf_scores
from pipeline.store.client import open_collection
from tests.fixtures.store import EXAMPLE_DIR, SMALL_QUERIES, write_small_corpus

EMBED = EmbeddingConfig(device="cpu")
CHUNKED = IngestConfig(chunk_chars=200, chunk_overlap=50)


def _store(tmp_path, name="small"):
    return StoreConfig(path=str(tmp_path / "store"), collection=name)


def _bm25_state(store_cfg):
    """(marker, stored build dirs, {chunk id} of the current build, {chunk id} of the collection)."""
    col = open_collection(store_cfg, create=False)
    root = index_root(store_cfg, store_cfg.collection)
    builds = sorted(p.name for p in root.iterdir())
    marker = build_marker(col)
    index = BM25Index.load(root / marker, BM25Settings()) if marker else None
    return marker, builds, set(index.chunk_ids) if index else None, set(col.get()["ids"])


def _bm25_top(store_cfg, query):
    hits = Retriever(store_cfg, None, mode="bm25").search([query], top_k=1)[0].hits
    return hits[0].doc_id if hits else None


def test_rrf_hand_checked():
    # a: 1/(60+1) + 1/(60+2); b: 1/(60+2); c: 1/(60+3); d: 1/(60+1)
    got = rrf_scores([["a", "b", "c"], ["d", "a"]], k=60)
    assert got == {"a": pytest.approx(1 / 61 + 1 / 62), "b": pytest.approx(1 / 62), "c": pytest.approx(1 / 63),
                   "d": pytest.approx(1 / 61)}
    assert list(got) == ["a", "d", "b", "c"]  # descending score
    assert rrf_scores([["x", "x", "y"]], k=0) == {"x": 1.0, "y": pytest.approx(1 / 3)}  # duplicates count once


def test_bm25_scores_follow_the_lucene_formula():
    import math

    texts = ["apple banana apple", "banana cherry", "cherry date elder fig"]
    idx = BM25Index.build(["d0", "d1", "d2"], texts, BM25Settings(k1=1.2, b=0.75, language="none"))
    s = idx.scores("apple")
    n, df, avgdl = 3, 1, (3 + 2 + 4) / 3
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    tf, dl = 2, 3
    expect = idf * tf / (tf + 1.2 * (1 - 0.75 + 0.75 * dl / avgdl))
    assert s[0] == pytest.approx(expect, rel=1e-5) and s[1] == 0 and s[2] == 0
    assert idx.search(["banana"], 5)[0][0][0] == "d1"  # shorter document wins at equal tf
    assert idx.search(["zebra"], 5) == [[]]  # no term in the vocabulary: no hit
    assert tokenize(["The running dogs"], BM25Settings())[0] == ["run", "dog"]  # stopword gone, stemmed


def test_ingest_builds_the_index_and_reingest_is_a_noop(tmp_path, embedder):
    src = write_small_corpus(tmp_path / "src")
    store_cfg = _store(tmp_path)
    s = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    assert s.bm25_built and "BM25 index rebuilt" in s.line()
    marker, builds, indexed, stored = _bm25_state(store_cfg)
    assert marker and builds == [marker] and indexed == stored and len(stored) == s.chunks_total
    again = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    assert not again.bm25_built and _bm25_state(store_cfg)[:2] == (marker, builds)
    assert [_bm25_top(store_cfg, q) for q in SMALL_QUERIES.values()] == list(SMALL_QUERIES)


def test_edits_and_removals_reach_the_index(tmp_path, embedder):
    src = write_small_corpus(tmp_path / "src")
    store_cfg = _store(tmp_path)
    ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    old_marker = _bm25_state(store_cfg)[0]
    assert _bm25_top(store_cfg, "volcano Etna Sicily") == "volcano.txt"

    (src / "bread.md").write_text("Rye bread is dense and dark because rye has little gluten.", encoding="utf-8")
    (src / "volcano.txt").unlink()
    s = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    assert s.bm25_built and (s.docs_updated, s.docs_removed) == (1, 1)
    marker, builds, indexed, stored = _bm25_state(store_cfg)
    assert marker != old_marker and builds == [marker] and indexed == stored  # old build removed
    assert not any(c.startswith("volcano.txt#") for c in indexed)
    assert _bm25_top(store_cfg, "volcano Etna Sicily") != "volcano.txt"
    assert _bm25_top(store_cfg, "rye gluten") == "bread.md"
    assert _bm25_top(store_cfg, "sourdough starter lactic") is None  # the old bread text is gone


def test_readers_never_use_a_stale_or_missing_build(tmp_path, embedder, caplog):
    src = write_small_corpus(tmp_path / "src")
    store_cfg = _store(tmp_path)
    ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    col = open_collection(store_cfg, create=False)
    assert open_index(col, store_cfg, BM25Settings()).build_id == build_marker(col)

    # a crash between the collection write and the index rebuild leaves the marker cleared
    col.modify(metadata={BUILD_KEY: ""})
    with caplog.at_level(logging.WARNING, logger="pipeline.retrieval.bm25"):
        index = open_index(open_collection(store_cfg, create=False), store_cfg, BM25Settings())
    assert index.build_id == "" and set(index.chunk_ids) == set(col.get()["ids"])
    assert "built it in memory" in caplog.text
    # the next ingest (no document changed) repairs it
    s = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    assert s.chunks_written == 0 and s.bm25_built and _bm25_state(store_cfg)[0]

    # other BM25 settings: the stored build is not used and ingest rebuilds with the new settings
    other = BM25Settings(k1=0.9, b=0.4)
    assert open_index(open_collection(store_cfg, create=False), store_cfg, other).build_id == ""
    s = ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False, bm25=other)
    assert s.bm25_built
    assert open_index(open_collection(store_cfg, create=False), store_cfg, other).build_id

    # the index directory deleted by hand: readers build in memory; rank0's ensure_index stores it again
    shutil.rmtree(index_root(store_cfg, store_cfg.collection))
    assert _bm25_top(store_cfg, "rye gluten sourdough") == "bread.md"  # in-memory build
    assert ensure_index(store_cfg, other) is True and ensure_index(store_cfg, other) is False
    col = open_collection(store_cfg, create=False)
    assert open_index(col, store_cfg, other).build_id == build_marker(col) != ""


def test_modes_find_the_right_documents_with_source_ranks(tmp_path, embedder):
    src = write_small_corpus(tmp_path / "src")
    store_cfg = _store(tmp_path)
    ingest_source(src, store_cfg, CHUNKED, EMBED, embedder=embedder, progress=False)
    queries = list(SMALL_QUERIES.values())
    for mode in ("dense", "bm25", "hybrid"):
        for fusion in ("chunk", "document"):
            r = Retriever(store_cfg, embedder, mode=mode, fusion=fusion)
            res = r.search(queries, top_k=3)
            assert [x.hits[0].doc_id for x in res] == list(SMALL_QUERIES), (mode, fusion)
            docs = r.search_documents(queries, 3)
            assert [d[0][0] for d in docs] == list(SMALL_QUERIES), (mode, fusion)
    hyb = Retriever(store_cfg, embedder, mode="hybrid").search(queries[:1], top_k=5)[0].hits
    top = hyb[0]
    assert top.dense_rank == 1 and top.bm25_rank == 1 and top.score == pytest.approx(2 / 61)
    assert top.dense_score > 0.3 and top.bm25_score > 0 and top.is_hit(0.2) and not top.is_hit(0.99)
    assert all(h.dense_score is not None for h in hyb)  # BM25-only hits get their cosine too
    dense_all = {h.chunk_id: h.score for h in Retriever(store_cfg, embedder).search(queries, top_k=50)[0].hits}
    hyb_r = Retriever(store_cfg, embedder, mode="hybrid")
    lexical = hyb_r._bm25_hits("small", queries[:1], 5)  # hits as the BM25 ranking alone returns them
    assert lexical[0] and all(h.dense_score is None for h in lexical[0])
    for h in hyb_r._with_cosine("small", hyb_r.embed(queries[:1]), lexical)[0]:
        assert h.dense_score == pytest.approx(dense_all[h.chunk_id], abs=1e-4)
    bm = Retriever(store_cfg, None, mode="bm25").search(queries[:1], top_k=5)[0].hits
    assert all(h.dense_score is None and h.is_hit(0.99) and not h.is_hit(0.2, h.bm25_score) for h in bm)
    assert [h.score for h in hyb] == sorted((h.score for h in hyb), reverse=True)
    for h in hyb:
        assert h.score == pytest.approx(sum(1 / (60 + r) for r in (h.dense_rank, h.bm25_rank) if r))
    # document fusion: one hit per document
    doc_hits = Retriever(store_cfg, embedder, mode="hybrid", fusion="document").search(queries[:1], 5)[0].hits
    assert len({h.doc_id for h in doc_hits}) == len(doc_hits)
    with pytest.raises(ConfigError):
        Retriever(store_cfg, embedder, mode="sparse")


def test_eval_retrieval_all_modes_on_the_example_store(example_store, tmp_path):
    cfg = example_store.store_cfg
    out = tmp_path / "m.json"
    res = CliRunner().invoke(main, [
        "eval-retrieval", "--store", cfg.path, "--collection", cfg.collection, "--mode", "all", "--device", "cpu",
        "--queries", str(EXAMPLE_DIR / "queries.jsonl"), "--qrels", str(EXAMPLE_DIR / "qrels.tsv"),
        "--json", str(out)])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text(encoding="utf-8"))
    assert set(got) == {"dense", "bm25", "hybrid", "queries"} and got["queries"] == 40
    for mode in ("dense", "bm25", "hybrid"):
        assert got[mode]["queries/s"] > 0
        assert 0.5 < got[mode]["ndcg@10"] <= 1 and got[mode]["recall@100"] >= got[mode]["recall@10"]
    # 400 documents: fusion of two good, different rankers beats the weaker one
    assert got["hybrid"]["ndcg@10"] > min(got["dense"]["ndcg@10"], got["bm25"]["ndcg@10"])
    res = CliRunner().invoke(main, ["eval-retrieval", "--store", cfg.path, "--collection", cfg.collection,
                                    "--mode", "sparse", "--queries", "q", "--qrels", "r"])
    assert res.exit_code == 2 and "expected dense, bm25, hybrid" in res.output


def test_config_defaults_and_choices():
    cfg = load_config()
    assert cfg.retrieval.mode == "hybrid" and cfg.retrieval.rrf_k == 60 and cfg.retrieval.fusion == "chunk"
    assert BM25Settings.from_config(cfg.retrieval) == BM25Settings()
    with pytest.raises(ConfigError, match="retrieval"):
        load_config(overrides={"retrieval.mode": "sparse"})
    with pytest.raises(ConfigError):
        dataclasses.replace(BM25Settings(), b=2.0).check()


def test_stored_build_equals_the_in_memory_build(tmp_path, monkeypatch):
    import numpy as np

    import pipeline.retrieval.bm25 as bm25_mod

    monkeypatch.setattr(bm25_mod, "SCATTER_ENTRIES", 5)  # several scatter slices, columns split across them
    texts = ["The apple and the banana, apple pie", "banana cherry", "", "cherry date elder fig fig fig",
             "running dogs run", "apple", "date of the elder statesman", "the a an"]
    ids = [f"doc{i}#0" for i in range(len(texts))]
    settings = BM25Settings()
    whole = BM25Index.build(ids, texts, settings)
    pages = [(ids[i:i + 3], texts[i:i + 3]) for i in range(0, len(texts), 3)]  # three pages
    stored = BM25Index.build_stored(iter(pages), settings, tmp_path / "bm25")
    assert [p.name for p in (tmp_path / "bm25").iterdir()] == [stored.build_id]  # no spill or tmp folder left
    assert list(stored.chunk_ids) == ids and len(stored) == len(whole)
    for q in ["apple", "banana apple", "fig", "elder date", "run dog", "zebra", "the"]:
        np.testing.assert_allclose(stored.scores(q), whole.scores(q), rtol=1e-6, atol=1e-7)
        got, want = stored.search([q], 3)[0], whole.search([q], 3)[0]
        assert [c for c, _ in got] == [c for c, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert stored.search(["zebra"], 3) == [[]]
    again = BM25Index.load(tmp_path / "bm25" / stored.build_id, settings)  # bm25s reads it back, memory-mapped
    np.testing.assert_allclose(again.scores("fig"), whole.scores("fig"), rtol=1e-6)
    empty = BM25Index.build_stored(iter([]), settings, tmp_path / "empty")
    assert len(empty) == 0 and empty.search(["apple"], 3) == [[]]


def test_ingest_with_supplied_embeddings_loads_no_model(tmp_path, monkeypatch):
    import numpy as np

    import pipeline.retrieval.embedding as embedding

    def no_model(*_a, **_k):
        raise AssertionError("the model must not be loaded when embeddings are supplied")

    monkeypatch.setattr(embedding, "load_embedder", no_model)
    calls: list[list[str]] = []

    def supplied(ids, texts):
        assert len(ids) == len(texts)
        calls.append(list(ids))
        e = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(384) for t in texts])
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)

    src = write_small_corpus(tmp_path / "src")
    store_cfg = _store(tmp_path)
    s = ingest_source(src, store_cfg, CHUNKED, EMBED, progress=False, embed_fn=supplied)
    written = [i for c in calls for i in c]
    assert s.chunks_added == len(written) == s.chunks_total and s.bm25_built
    got = open_collection(store_cfg, create=False).get(ids=written[:3], include=["embeddings", "documents"])
    for cid, emb, doc in zip(got["ids"], got["embeddings"], got["documents"], strict=True):
        np.testing.assert_allclose(emb, supplied([cid], [doc])[0], rtol=1e-6)
    from pipeline.retrieval.bm25 import iter_collection

    pages = list(iter_collection(open_collection(store_cfg, create=False), page=3))
    assert all(len(i) == len(t) <= 3 for i, t in pages) and sorted(c for i, _ in pages for c in i) == sorted(written)
    calls.clear()
    assert ingest_source(src, store_cfg, CHUNKED, EMBED, progress=False, embed_fn=supplied).chunks_written == 0
    assert calls == []  # idempotent: nothing embedded again
    (src / "bread.md").write_text("Rye bread is dense and dark because rye has little gluten.", encoding="utf-8")
    (src / "volcano.txt").unlink()
    s = ingest_source(src, store_cfg, CHUNKED, EMBED, progress=False, embed_fn=supplied)
    assert (s.docs_updated, s.docs_removed) == (1, 1) and calls == [["bread.md#0"]]
    assert _bm25_top(store_cfg, "rye gluten") == "bread.md"
    assert _bm25_top(store_cfg, "volcano Etna Sicily") != "volcano.txt"
