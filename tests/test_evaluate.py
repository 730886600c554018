"""Retrieval metrics on hand-computed cases, BEIR file loading, and `rag-pipeline eval-retrieval`."""

import json
import math
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.evaluation.retrieval import (
    evaluate_retriever,
    evaluate_run,
    load_qrels,
    load_queries,
    ndcg_at_k,
    rank_documents,
    recall_at_k,
    reciprocal_rank_at_k,
)
from pipeline.retrieval.retriever import Retriever
from tests.fixtures.store import EXAMPLE_DIR

L3 = math.log2(3)  # discount of rank 2


def test_ndcg_binary_relevance_by_hand():
    # relevant: b (rank 2) and d (not retrieved). DCG = 1/log2(3); IDCG = 1 + 1/log2(3).
    assert ndcg_at_k(["a", "b", "c"], {"b": 1, "d": 1}, 10) == pytest.approx((1 / L3) / (1 + 1 / L3))
    assert ndcg_at_k(["a", "b", "c"], {"b": 1, "d": 1}, 10) == pytest.approx(0.386853, abs=1e-6)
    assert ndcg_at_k(["b", "d", "x"], {"b": 1, "d": 1}, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y"], {"b": 1}, 10) == 0.0


def test_ndcg_graded_relevance_uses_linear_gain():
    # ranking b (rel 1), a (rel 2): DCG = 1 + 2/log2(3) = 2.26186; IDCG = 2 + 1/log2(3) = 2.63093
    assert ndcg_at_k(["b", "a"], {"a": 2, "b": 1}, 10) == pytest.approx((1 + 2 / L3) / (2 + 1 / L3))
    assert ndcg_at_k(["b", "a"], {"a": 2, "b": 1}, 10) == pytest.approx(0.859719, abs=1e-6)
    # judged non-relevant (0) documents give no gain
    assert ndcg_at_k(["z", "a"], {"a": 1, "z": 0}, 10) == pytest.approx(1 / L3)


def test_cutoffs():
    ranking = [f"d{i}" for i in range(1, 21)]  # relevant d11 at rank 11 and d2 at rank 2
    rel = {"d11": 1, "d2": 1}
    assert recall_at_k(ranking, rel, 10) == 0.5
    assert recall_at_k(ranking, rel, 100) == 1.0
    assert reciprocal_rank_at_k(ranking, rel, 10) == 0.5
    assert reciprocal_rank_at_k(ranking, {"d11": 1}, 10) == 0.0
    assert reciprocal_rank_at_k(ranking, {"d11": 1}, 20) == pytest.approx(1 / 11)
    # IDCG@10 is over both relevant documents; only d2 counts in the top 10
    assert ndcg_at_k(ranking, rel, 10) == pytest.approx((1 / L3) / (1 + 1 / L3))


def test_ranking_order_is_score_then_id_descending_like_trec_eval():
    assert rank_documents([("a", 0.5), ("c", 0.9), ("b", 0.5)]) == ["c", "b", "a"]


def test_evaluate_run_averages_over_queries_with_relevant_documents():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}, "q3": {"x": 0}, "q4": {"z": 1}}
    run = {
        "q1": [("a", 0.9), ("b", 0.1)],  # perfect
        "q2": [("x", 0.9), ("c", 0.8)],  # c at rank 2
        "q3": [("x", 0.9)],  # no relevant document: not counted
        # q4 missing from the run: counts 0
    }
    m = evaluate_run(run, qrels, k=10)
    assert list(m) == ["ndcg@10", "recall@10", "recall@100", "mrr@10"]
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["recall@10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["ndcg@10"] == pytest.approx((1 + (1 / L3) / (1 + 1 / L3) + 0) / 3)
    assert list(evaluate_run(run, qrels, k=5)) == ["ndcg@5", "recall@5", "recall@100", "mrr@5"]
    with pytest.raises(InputError, match="no relevant document"):
        evaluate_run(run, {"q3": {"x": 0}})


def test_load_beir_queries_and_qrels(tmp_path):
    queries = load_queries(EXAMPLE_DIR / "queries.jsonl")
    qrels = load_qrels(EXAMPLE_DIR / "qrels.tsv")
    assert len(queries) == 40 and set(qrels) == set(queries)
    assert sum(len(v) for v in qrels.values()) == 46
    trec = tmp_path / "trec.txt"
    trec.write_text("1 0 d1 1\n1 0 d2 0\n", encoding="utf-8")
    assert load_qrels(trec) == {"1": {"d1": 1, "d2": 0}}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("query-id\tcorpus-id\tscore\n1\td1\n", ":2: expected 'query-id<TAB>corpus-id<TAB>score'"),
        ("query-id\tcorpus-id\tscore\n1\td1\thigh\n", ":2: score must be an integer"),
        ("query-id\tcorpus-id\tscore\n", ": no relevance judgements"),
    ],
)
def test_bad_qrels_name_file_and_line(tmp_path, content, message):
    p = tmp_path / "qrels.tsv"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=f"^{p}{message}"):
        load_qrels(p)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"_id": "1", "text": "ok"}\n{"_id": "2", "text": \n', ":2: invalid JSON"),
        ('{"_id": "1", "text": "ok"}\n{"text": "x"}\n', ":2: field '_id' is missing"),
        ('{"_id": "1"}\n', ":1: field 'text' is missing or empty"),
        ('{"_id": "1", "text": "a"}\n{"_id": "1", "text": "b"}\n', ":2: duplicate query _id"),
    ],
)
def test_bad_queries_name_file_and_line(tmp_path, content, message):
    p = tmp_path / "queries.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=f"^{p}{message}"):
        load_queries(p)


def test_missing_files(tmp_path):
    with pytest.raises(InputError, match="cannot read queries file"):
        load_queries(tmp_path / "none.jsonl")
    with pytest.raises(InputError, match="cannot read qrels file"):
        load_qrels(tmp_path / "none.tsv")


def test_qrels_query_missing_from_queries_is_an_error(example_store, embedder):
    r = Retriever(example_store.store_cfg, embedder)
    with pytest.raises(InputError, match="not in the queries file"):
        evaluate_retriever(r, {"1": "q"}, {"2": {"d": 1}})


def test_eval_retrieval_cli_matches_the_library(example_store, embedder, tmp_path):
    queries, qrels = EXAMPLE_DIR / "queries.jsonl", EXAMPLE_DIR / "qrels.tsv"
    out = tmp_path / "m.json"
    cfg = example_store.store_cfg
    res = CliRunner().invoke(main, [
        "eval-retrieval", "--store", cfg.path, "--collection", cfg.collection, "--queries", str(queries),
        "--qrels", str(qrels), "--json", str(out), "--device", "cpu", "--mode", "dense",
    ])
    assert res.exit_code == 0, res.output
    for name in ("ndcg@10", "recall@10", "recall@100", "mrr@10"):
        assert name in res.stdout
    got = json.loads(out.read_text(encoding="utf-8"))
    assert set(got) == {"ndcg@10", "recall@10", "recall@100", "mrr@10", "queries/s", "queries", "mode"}
    assert got["queries"] == 40 and got["mode"] == "dense" and got["queries/s"] > 0
    lib = evaluate_retriever(Retriever(cfg, embedder), load_queries(queries), load_qrels(qrels), k=10)
    for name, value in lib.items():
        if name != "queries/s":  # a timing, not a score
            assert got[name] == pytest.approx(value, abs=1e-5)
    # 400 documents only: far easier than the full SciFact corpus (nDCG@10 0.645). Measured: 0.811.
    assert 0.78 < got["ndcg@10"] <= 1.0 and got["recall@100"] == 1.0


@pytest.mark.parametrize("case", ["missing-qrels", "missing-store", "empty-collection"])
def test_eval_retrieval_cli_errors_are_one_line(tmp_path, case):
    from pipeline.config import StoreConfig
    from pipeline.store.client import open_collection

    store = tmp_path / "store"
    qrels = EXAMPLE_DIR / "qrels.tsv"
    code = 4
    if case == "missing-qrels":
        qrels, code = tmp_path / "none.tsv", 2
    elif case == "empty-collection":
        open_collection(StoreConfig(path=str(store), collection="empty"))
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "eval-retrieval", "--store", str(store), "--collection", "empty",
         "--queries", str(EXAMPLE_DIR / "queries.jsonl"), "--qrels", str(qrels)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == code, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("Error: "), res.stderr
    expected = {"missing-qrels": "cannot read qrels file", "missing-store": "vector store not found",
                "empty-collection": "is empty"}[case]
    assert expected in res.stderr
