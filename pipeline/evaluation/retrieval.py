"""Retrieval evaluation: nDCG@k, Recall@k, Recall@100, MRR@k on BEIR-format queries and qrels.

Formulas (the definitions BEIR reports, computed by pytrec_eval / trec_eval, and BEIR's own MRR):

- Ranking: documents sorted by score descending, ties by document id descending (trec_eval's order).
- ``rel(d)``: the qrels score of document d (0 if unjudged); relevant means ``rel(d) > 0``.
- nDCG@k (trec_eval ``ndcg_cut``; Jarvelin & Kekalainen 2002, linear gain):
  ``DCG@k = sum_{i=1..k} rel(d_i) / log2(i + 1)``, ``nDCG@k = DCG@k / IDCG@k`` where IDCG@k is the DCG of the
  judged relevance values sorted descending.
- Recall@k (trec_eval ``recall``): ``|relevant in top k| / |relevant|``.
- MRR@k (BEIR ``custom_metrics.mrr``): ``1 / rank`` of the first relevant document in the top k, 0 if none.
- Each metric is the mean over the queries of the qrels that have at least one relevant document; a query
  without any retrieved document scores 0.

Sources: Thakur et al., "BEIR: A Heterogeneous Benchmark for Zero-shot Evaluation of Information Retrieval
Models", NeurIPS 2021 Datasets & Benchmarks (beir/retrieval/evaluation.py and custom_metrics.py);
Van Gysel & de Rijke, "Pytrec_eval: An Extremely Fast Python Interface to trec_eval", SIGIR 2018.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import InputError
from pipeline.evaluation.jsonl import iter_json_objects

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.retrieval.retriever import Retriever

log = logging.getLogger(__name__)

RECALL_DEPTH = 100
"""Depth of the always-reported Recall@100."""


# --- per-query metrics --------------------------------------------------------------------------
def rank_documents(scored: Sequence[tuple[str, float]]) -> list[str]:
    """Document ids by score descending, ties by id descending (trec_eval's ranking order)."""
    return [d for d, _ in sorted(scored, key=lambda ds: (ds[1], ds[0]), reverse=True)]


def dcg(gains: Sequence[float]) -> float:
    """``sum_i gains[i] / log2(i + 2)`` for 0-based i (i.e. rank r = i + 1 is discounted by log2(r + 1))."""
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def ndcg_at_k(ranking: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    """nDCG@k with linear gain (trec_eval ndcg_cut.k).

    Args:
        ranking: document ids, best first.
        relevance: ``{doc_id: qrels score}``; scores <= 0 are non-relevant.
        k: cutoff (> 0).

    Returns:
        nDCG@k in [0, 1]; 0 if the query has no relevant document.
    """
    ideal = dcg(sorted((r for r in relevance.values() if r > 0), reverse=True)[:k])
    if ideal == 0:
        return 0.0
    return dcg([max(relevance.get(d, 0), 0) for d in ranking[:k]]) / ideal


def recall_at_k(ranking: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    """Recall@k: relevant documents in the top k / relevant documents (0 if none is relevant)."""
    relevant = {d for d, r in relevance.items() if r > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def reciprocal_rank_at_k(ranking: Sequence[str], relevance: Mapping[str, int], k: int) -> float:
    """1 / rank of the first relevant document within the top k, else 0 (BEIR MRR@k per query)."""
    for rank, d in enumerate(ranking[:k], start=1):
        if relevance.get(d, 0) > 0:
            return 1.0 / rank
    return 0.0


def metric_names(k: int = 10) -> list[str]:
    """Keys of :func:`evaluate_run`'s result: ``ndcg@k``, ``recall@k``, ``recall@100``, ``mrr@k``."""
    names = [f"ndcg@{k}", f"recall@{k}", f"recall@{RECALL_DEPTH}", f"mrr@{k}"]
    return list(dict.fromkeys(names))


def evaluate_run(
    run: Mapping[str, Sequence[tuple[str, float]]],
    qrels: Mapping[str, Mapping[str, int]],
    k: int = 10,
) -> dict[str, float]:
    """Mean nDCG@k, Recall@k, Recall@100 and MRR@k of a run against qrels.

    Args:
        run: ``{query_id: [(doc_id, score), ...]}`` (any order; ranked by :func:`rank_documents`).
        qrels: ``{query_id: {doc_id: relevance}}``.
        k: cutoff of nDCG, Recall and MRR (Recall@100 is always reported).

    Returns:
        ``{"ndcg@k", "recall@k", "recall@100", "mrr@k"}`` -> mean over the qrels' queries with at least one
        relevant document (a query missing from ``run`` scores 0).

    Raises:
        pipeline.errors.InputError: ``k < 1`` or no query in qrels has a relevant document.
    """
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    qids = [q for q, rels in qrels.items() if any(r > 0 for r in rels.values())]
    if not qids:
        raise InputError("qrels contain no relevant document (all scores <= 0)")
    sums = dict.fromkeys(metric_names(k), 0.0)
    for qid in qids:
        ranking = rank_documents(run.get(qid, []))
        rel = qrels[qid]
        per_query = {
            f"ndcg@{k}": ndcg_at_k(ranking, rel, k),
            f"recall@{k}": recall_at_k(ranking, rel, k),
            f"recall@{RECALL_DEPTH}": recall_at_k(ranking, rel, RECALL_DEPTH),
            f"mrr@{k}": reciprocal_rank_at_k(ranking, rel, k),
        }
        for name, value in per_query.items():
            sums[name] += value
    return {name: total / len(qids) for name, total in sums.items()}


# --- BEIR files ------------------------------------------------------------------------------------
def load_queries(path: str | Path) -> dict[str, str]:
    """BEIR queries: JSONL, one ``{"_id": ..., "text": ...}`` object a line.

    Returns:
        ``{query_id: text}`` in file order.

    Raises:
        pipeline.errors.InputError: missing file, non-UTF-8, invalid JSON, missing/invalid ``_id`` or ``text``,
            duplicate ``_id``, or no query (message names file and line).
    """
    p = Path(path)
    queries: dict[str, str] = {}
    for where, rec in iter_json_objects(p, "queries file"):
        qid, text = rec.get("_id"), rec.get("text")
        if isinstance(qid, bool) or not isinstance(qid, (str, int)) or str(qid) == "":
            raise InputError(f"{where}: field '_id' is missing or not a string/integer")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: field 'text' is missing or empty")
        if str(qid) in queries:
            raise InputError(f"{where}: duplicate query _id {qid!r}")
        queries[str(qid)] = text
    if not queries:
        raise InputError(f"{p}: no queries")
    return queries


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """BEIR qrels: TSV ``query-id<TAB>corpus-id<TAB>score`` with a header line (TREC's 4-column
    ``qid iter docid rel`` is accepted too).

    Returns:
        ``{query_id: {doc_id: score}}``.

    Raises:
        pipeline.errors.InputError: missing file, non-UTF-8, a line with the wrong number of fields or a
            non-integer score (message names file and line), or no judgement at all.
    """
    p = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"{p}: cannot read qrels file: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{p}:{line}: not valid UTF-8") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        parts = [x.strip() for x in parts]
        if lineno == 1 and parts[:2] == ["query-id", "corpus-id"]:
            continue
        if len(parts) == 4:
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise InputError(f"{p}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score', got {line!r}")
        qid, did, score = parts
        try:
            qrels.setdefault(qid, {})[did] = int(score)
        except ValueError:
            raise InputError(f"{p}:{lineno}: score must be an integer, got {score!r}") from None
    if not qrels:
        raise InputError(f"{p}: no relevance judgements")
    return qrels


def evaluate_retriever(
    retriever: Retriever,
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    k: int = 10,
) -> dict[str, float]:
    """Run the retriever on the qrels' queries (document level, max over chunks) and score it.

    Args:
        retriever: searches its main collection (:meth:`pipeline.retrieval.retriever.Retriever.search_documents`).
        queries: ``{query_id: text}`` (:func:`load_queries`).
        qrels: ``{query_id: {doc_id: relevance}}`` (:func:`load_qrels`).
        k: cutoff of nDCG, Recall and MRR; ``max(k, 100)`` documents are retrieved per query.

    Returns:
        See :func:`evaluate_run`, plus ``"queries/s"``: queries ranked per second (query embedding and search
        to depth ``max(k, 100)`` documents, one batch, wall time).

    Raises:
        pipeline.errors.InputError: a qrels query id missing from the queries file.
        pipeline.errors.StoreError: the store fails.
    """
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise InputError(
            f"{len(missing)} query id(s) of the qrels are not in the queries file (first: {', '.join(missing[:5])})"
        )
    qids = [q for q in queries if q in qrels]
    depth = max(k, RECALL_DEPTH)
    t0 = time.perf_counter()
    ranked = retriever.search_documents([queries[q] for q in qids], depth)
    seconds = time.perf_counter() - t0
    run = dict(zip(qids, ranked, strict=True))
    metrics = evaluate_run(run, qrels, k)
    metrics["queries/s"] = len(qids) / seconds if seconds > 0 else math.inf
    return metrics
