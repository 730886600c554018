"""Retrieval quality and speed per mode on BEIR SciFact: dense vs BM25 vs hybrid, measured in one run.

Ingests the SciFact corpus with the defaults (chunk_chars 1000 / overlap 200; the Chroma collection and its
BM25 index; idempotent, so a second run reuses the store), then evaluates every retrieval mode on the 300 test
queries with the same code as `rag-pipeline eval-retrieval` (documents ranked by their best chunk):
nDCG@10, Recall@100 and queries/s (query embedding + search to 100 documents, one batch, wall time).

Baselines: dense and BM25 are measured in the same run; the published numbers on the same split are printed
beside them (all-MiniLM-L6-v2 0.645 (MTEB); BM25 0.665 (BEIR paper, Thakur et al. 2021), 0.6789 (Anserini);
BM25 + MiniLM cross-encoder reranking 0.688 (BEIR paper)). Goals: bm25 >= 0.665, hybrid >= 0.70.

Hybrid settings are fixed a priori (RRF k = 60 from Cormack et al. 2009; BM25 k1 = 1.2, b = 0.75 from
Lucene/Elasticsearch); `--sweep` additionally prints RRF k in {10, 30, 100} and document-level fusion as a
sensitivity check on the test split, not for choosing parameters.

Usage: python bench/retrieval.py [--data ../shared/data/scifact] [--store /tmp/bench_scifact] [--sweep]
Default: ~5 min ingest on 2 idle CPU cores the first time (11,436 chunks), then ~1 min per mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PUBLISHED = {"dense": ("all-MiniLM-L6-v2 (MTEB)", 0.64508), "bm25": ("BM25 (BEIR paper)", 0.665),
             "hybrid": ("BM25 + CE rerank (BEIR)", 0.688)}
GOALS = {"bm25": 0.665, "hybrid": 0.70}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "scifact"),
                    help="folder with corpus.jsonl.gz, queries.test.jsonl, qrels/test.tsv")
    ap.add_argument("--store", default="/tmp/bench_scifact", help="Chroma store (reused when already ingested)")
    ap.add_argument("--collection", default="scifact")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sweep", action="store_true", help="also RRF k 10/30/100 and document-level fusion")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

    from pipeline.config import load_config
    from pipeline.corpus.ingest import ingest_source
    from pipeline.evaluation.retrieval import evaluate_retriever, load_qrels, load_queries
    from pipeline.retrieval.bm25 import BM25Settings
    from pipeline.retrieval.embedding import load_embedder
    from pipeline.retrieval.retriever import Retriever, retriever_options

    data = Path(args.data)
    cfg = load_config()  # the defaults are the product
    store = dataclasses.replace(cfg.store, path=args.store, collection=args.collection, chroma_url="")
    cfg = dataclasses.replace(cfg, store=store, embedding=dataclasses.replace(cfg.embedding, device=args.device))
    embedder = load_embedder(args.device)
    s = ingest_source(data / "corpus.jsonl.gz", cfg.store, cfg.ingest, cfg.embedding, embedder=embedder,
                      progress=False, bm25=BM25Settings.from_config(cfg.retrieval))
    print(s.line())
    queries = load_queries(data / "queries.test.jsonl")
    qrels = load_qrels(data / "qrels" / "test.tsv")
    n_q = sum(1 for q in qrels if any(r > 0 for r in qrels[q].values()))

    variants = [("dense", {}), ("bm25", {}), ("hybrid", {})]
    if args.sweep:
        variants += [("hybrid", {"fusion": "document"})] + [("hybrid", {"rrf_k": k}) for k in (10, 30, 100)]
    print(f"\nSciFact test: {n_q} queries, {s.chunks_total} chunks (chunk_chars {cfg.ingest.chunk_chars}, "
          f"overlap {cfg.ingest.chunk_overlap}); BM25 k1 {cfg.retrieval.bm25_k1} b {cfg.retrieval.bm25_b} "
          f"{cfg.retrieval.bm25_language}; RRF k {cfg.retrieval.rrf_k}, fusion depth {cfg.retrieval.fusion_depth}")
    print(f"{'mode':<30}{'nDCG@10':>9}{'R@100':>8}{'q/s':>8}  {'published':<26}{'pub':>7}{'ours/pub':>9}  goal")
    results = {}
    for mode, extra in variants:
        rcfg = dataclasses.replace(cfg, retrieval=dataclasses.replace(cfg.retrieval, mode=mode, **extra))
        t0 = time.perf_counter()
        r = Retriever(cfg.store, embedder, batch_size=cfg.embedding.batch_size, create=False,
                      **retriever_options(rcfg))
        open_s = time.perf_counter() - t0
        m = evaluate_retriever(r, queries, qrels, k=10)
        label = mode + "".join(f" {k}={v}" for k, v in extra.items())
        results[label] = m
        pub_name, pub = PUBLISHED[mode]
        goal = GOALS.get(mode) if not extra else None
        verdict = "" if goal is None else ("ok" if m["ndcg@10"] >= goal else "MISSED") + f" (>= {goal})"
        print(f"{label:<30}{m['ndcg@10']:>9.4f}{m['recall@100']:>8.4f}{m['queries/s']:>8.1f}  "
              f"{pub_name:<26}{pub:>7.4f}{m['ndcg@10'] / pub:>9.3f}  {verdict}   (index open {open_s:.1f} s)")
    best_single = max(results["dense"]["ndcg@10"], results["bm25"]["ndcg@10"])
    print(f"\nhybrid / best single mode (same run): {results['hybrid']['ndcg@10'] / best_single:.3f}")


if __name__ == "__main__":
    main()
