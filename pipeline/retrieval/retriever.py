"""Dense, BM25 and hybrid retrieval over one or more Chroma collections, with self-healing collection handles.

Modes (``retrieval.mode``):

- ``dense``: cosine similarity of all-MiniLM-L6-v2 embeddings; the collections use cosine space, so
  ``score = 1 - distance`` (embeddings are L2-normalised, see :mod:`pipeline.retrieval.embedding`).
- ``bm25``: Lucene BM25 over the collection's chunks (:mod:`pipeline.retrieval.bm25`); ``score`` = BM25 score.
- ``hybrid``: reciprocal rank fusion (RRF; Cormack, Clarke & Buettcher, "Reciprocal Rank Fusion outperforms
  Condorcet and individual Rank Learning Methods", SIGIR 2009) of the dense and the BM25 ranking, each cut at
  ``fusion_depth``: ``score(c) = sum_r 1 / (rrf_k + rank_r(c))`` over the rankings r that contain c (ranks from
  1; k = 60 as in the paper). ``fusion="chunk"`` fuses chunk rankings; ``fusion="document"`` fuses document
  rankings (a document ranked by its best chunk) and returns each document's best fused chunk.

Every :class:`Hit` carries its source ranks (``dense_rank``, ``bm25_rank``; None when that ranking did not
retrieve it) and source scores where known.

Self-healing: when another process deletes and recreates a collection, our handle raises
``NotFoundError: Collection [uuid] does not exist.``; we rebind with ``get_or_create_collection(name)`` and
retry the call once; a second failure propagates.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.errors import StoreError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection
    from sentence_transformers import SentenceTransformer

    from pipeline.config import Config, StoreConfig
    from pipeline.retrieval.bm25 import BM25Index, BM25Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

QUERY_RESULTS_PER_CALL = 10_000
"""Most (queries x n_results) in one Chroma query call (its SQLite backend caps statement variables)."""


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk.

    Attributes:
        doc_id: id of the document the chunk belongs to.
        chunk_id: ``<doc_id>#<chunk_index>``.
        text: the chunk text.
        score: the mode's score: cosine similarity ``1 - cosine distance`` in [-1, 1] (dense), BM25 score >= 0
            (bm25), fused RRF score in (0, 2 / (rrf_k + 1)] (hybrid).
        metadata: the chunk's stored metadata (doc_id, source, chunk_index, n_chunks, doc_hash, chunking).
        collection: the collection it came from.
        dense_rank, bm25_rank: 1-based rank in the dense / BM25 ranking of its collection (None if absent).
        dense_score, bm25_score: cosine similarity / BM25 score (None if that ranking did not retrieve it).
    """

    doc_id: str
    chunk_id: str
    text: str
    score: float
    metadata: dict[str, Any]
    collection: str
    dense_rank: int | None = None
    bm25_rank: int | None = None
    dense_score: float | None = None
    bm25_score: float | None = None

    def is_hit(self, min_score: float, min_bm25_score: float = 0.0) -> bool:
        """True if the passage counts as retrieved: its cosine similarity is >= ``min_score`` (dense and hybrid
        modes: every returned hit has one), or, without a cosine (bm25 mode), its BM25 score is
        > ``min_bm25_score``."""
        if self.dense_score is not None:
            return self.dense_score >= min_score
        return self.bm25_score is not None and self.bm25_score > min_bm25_score


@dataclass(frozen=True)
class QueryResult:
    """The hits of one query, best first, and the collections that failed for it.

    Attributes:
        hits: at most ``top_k`` hits merged over all collections, sorted by score descending.
        source_errors: ``{collection: error message}`` for collections that failed (the record is degraded);
            empty when every collection answered.
    """

    hits: list[Hit]
    source_errors: dict[str, str] = field(default_factory=dict)


class Retriever:
    """Embeds query batches and searches the configured collections.

    Args:
        store_cfg: the store (path or chroma_url); ``store_cfg.collection`` is the main collection.
        embedder: a model from :func:`pipeline.retrieval.embedding.load_embedder`.
        collections: extra collections (``retrieval.collections``) searched besides the main collection
            ``store_cfg.collection``, concurrently, merged by score; the main one is always searched first
            and is the one :meth:`count` and :meth:`search_documents` use (duplicates are ignored).
        batch_size: queries per ``encode`` forward pass.
        create: create the store directory and the main collection if missing (rank0 may ingest into it
            afterwards; an empty collection simply returns no hits). ``False``: a missing store or main
            collection is a StoreError. Missing extra collections are never created: they fail at search
            time, recorded per query in ``source_errors``.
        mode: ``"dense"``, ``"bm25"`` or ``"hybrid"`` (``retrieval.mode``, module docstring); each collection is
            ranked this way and the collections' hits are merged by score.
        bm25: BM25 settings (index settings; default :class:`pipeline.retrieval.bm25.BM25Settings`). The BM25 index of a
            collection is opened on first use (:func:`pipeline.retrieval.bm25.open_index`), the main one at construction.
        rrf_k: RRF constant k (hybrid).
        fusion: ``"chunk"`` or ``"document"`` (``retrieval.fusion``; hybrid).
        fusion_depth: candidates taken from each ranking before fusion (hybrid).

    Raises:
        pipeline.errors.StoreError: the store cannot be opened, or (``create=False``) the store or the main
            collection does not exist.
        pipeline.errors.ConfigError: an unknown mode/fusion or invalid BM25 settings.
    """

    def __init__(
        self,
        store_cfg: StoreConfig,
        embedder: SentenceTransformer,
        collections: list[str] | None = None,
        batch_size: int = 64,
        *,
        create: bool = True,
        mode: str = "dense",
        bm25: BM25Settings | None = None,
        rrf_k: int = 60,
        fusion: str = "chunk",
        fusion_depth: int = 100,
    ) -> None:
        from pipeline.config import choices
        from pipeline.errors import ConfigError
        from pipeline.retrieval.bm25 import BM25Settings
        from pipeline.store.client import describe, get_collection, open_client

        modes, fusions = choices("retrieval.mode"), choices("retrieval.fusion")
        if mode not in modes or fusion not in fusions or rrf_k < 0 or fusion_depth < 1:
            raise ConfigError(
                f"retrieval mode {mode!r}/fusion {fusion!r}/rrf_k {rrf_k}/fusion_depth {fusion_depth}: expected "
                f"mode in {', '.join(modes)}, fusion {'|'.join(fusions)}, rrf_k >= 0, fusion_depth >= 1"
            )
        self.mode = mode
        self.bm25_settings = bm25 or BM25Settings()
        self.bm25_settings.check()
        self.rrf_k = rrf_k
        self.fusion = fusion
        self.fusion_depth = fusion_depth
        self._bm25: dict[str, BM25Index] = {}
        self.store_cfg = store_cfg
        self.embedder = embedder
        self.batch_size = batch_size
        self.names: list[str] = list(dict.fromkeys([store_cfg.collection, *(collections or [])]))
        self._where = describe(store_cfg)
        self._client: ClientAPI = open_client(store_cfg, create=create)
        self._lock = threading.Lock()
        self._cols: dict[str, Collection] = {}
        self._cols[self.names[0]] = get_collection(self._client, self.names[0], create=create)
        self.rebinds = 0
        """How many times a stale collection handle was rebound (self-healing), for logs and tests."""
        if mode != "dense":
            self.bm25_index(self.names[0])

    # --- collection handles -------------------------------------------------------------------
    def _collection(self, name: str) -> Collection:
        from pipeline.store.client import get_collection

        with self._lock:
            col = self._cols.get(name)
            if col is None:
                col = get_collection(self._client, name, create=False)
                self._cols[name] = col
            return col

    def _rebind(self, name: str) -> Collection:
        """Replace the handle of ``name`` with ``get_or_create_collection(name)`` (self-healing)."""
        from pipeline.store.client import get_collection

        with self._lock:
            col = get_collection(self._client, name, create=True)
            self._cols[name] = col
            self._bm25.pop(name, None)  # the recreated collection has its own BM25 build
            self.rebinds += 1
        log.warning("collection %r in %s was recreated by another process; rebound the handle", name, self._where)
        return col

    def _call(self, name: str, fn: Callable[[Collection], T]) -> T:
        """``fn(collection)``; on "does not exist" rebind and retry once; errors become StoreError."""
        from pipeline.store.client import is_not_found, store_errors

        with store_errors(f"search collection {name!r} in {self._where}"):
            col = self._collection(name)
            try:
                return fn(col)
            except Exception as exc:
                if not is_not_found(exc):
                    raise
                log.info("collection %r: %s; rebinding and retrying once", name, exc)
            col = self._rebind(name)
            return fn(col)

    # --- public API -----------------------------------------------------------------------------
    def embed(self, queries: Sequence[str]) -> np.ndarray:
        """Embeddings of the queries in one encode call: float32 [n_queries, 384], L2-normalised."""
        from pipeline.retrieval.embedding import embed_texts

        return embed_texts(self.embedder, list(queries), batch_size=self.batch_size)

    def count(self) -> int:
        """Number of chunks in the main collection.

        Raises:
            pipeline.errors.StoreError: the store fails (after one self-healing retry).
        """
        return int(self._call(self.names[0], lambda col: col.count()))

    def _query(self, name: str, emb: np.ndarray, n_results: int) -> list[list[Hit]]:
        """Top ``n_results`` hits per embedding row from one collection (StoreError on failure)."""

        def run(col: Collection) -> Any:
            # Chroma returns fewer than n_results when the collection is smaller (none when empty).
            return col.query(
                query_embeddings=emb, n_results=max(1, n_results), include=["documents", "metadatas", "distances"]
            )

        # Chroma fetches the results' metadata with one SQL statement; SQLite caps its variables (~32k), so
        # large query batches x n_results are split.
        rows = max(1, QUERY_RESULTS_PER_CALL // max(1, n_results))
        if len(emb) > rows:
            out: list[list[Hit]] = []
            for lo in range(0, len(emb), rows):
                out.extend(self._query(name, emb[lo : lo + rows], n_results))
            return out
        res = self._call(name, run)
        out = []
        for qi in range(len(emb)):
            ids = res["ids"][qi]
            docs = (res.get("documents") or [[]] * len(emb))[qi]
            metas = (res.get("metadatas") or [[]] * len(emb))[qi]
            dists = res["distances"][qi]
            hits = []
            for j, cid in enumerate(ids):
                meta = dict(metas[j] or {}) if j < len(metas) else {}
                hits.append(
                    Hit(
                        doc_id=str(meta.get("doc_id", cid.rsplit("#", 1)[0])),
                        chunk_id=cid,
                        text=(docs[j] if j < len(docs) else "") or "",
                        score=1.0 - float(dists[j]),
                        metadata=meta,
                        collection=name,
                    )
                )
            out.append(hits)
        return out

    def bm25_index(self, name: str) -> BM25Index:
        """The BM25 index of collection ``name`` (opened once; see :func:`pipeline.retrieval.bm25.open_index`).

        Raises:
            pipeline.errors.StoreError: the collection cannot be read.
        """
        from pipeline.retrieval.bm25 import open_index

        with self._lock:
            index = self._bm25.get(name)
        if index is None:
            index = self._call(name, lambda col: open_index(col, self.store_cfg, self.bm25_settings))
            with self._lock:
                self._bm25[name] = index
        return index

    def _fetch(self, name: str, chunk_ids: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        """``{chunk_id: (text, metadata)}`` of the given chunks of collection ``name`` (``get`` calls of at most
        :data:`QUERY_RESULTS_PER_CALL` ids)."""
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        for lo in range(0, len(chunk_ids), QUERY_RESULTS_PER_CALL):
            ids = chunk_ids[lo : lo + QUERY_RESULTS_PER_CALL]
            res = self._call(name, lambda col, ids=ids: col.get(ids=ids, include=["documents", "metadatas"]))
            docs = res.get("documents") or [""] * len(res["ids"])
            metas = res.get("metadatas") or [None] * len(res["ids"])
            out.update({cid: (d or "", dict(m or {})) for cid, d, m in zip(res["ids"], docs, metas, strict=True)})
        return out

    def _bm25_hits(self, name: str, queries: list[str], n: int) -> list[list[Hit]]:
        """Top ``n`` BM25 hits per query, without text and metadata yet (:meth:`_fill` adds them)."""
        return [
            [Hit(doc_id=cid.rsplit("#", 1)[0], chunk_id=cid, text="", score=score, metadata={}, collection=name,
                 bm25_rank=rank, bm25_score=score) for rank, (cid, score) in enumerate(r, start=1)]
            for r in self.bm25_index(name).search(queries, n)
        ]

    def _fill(self, name: str, hits: list[list[Hit]]) -> list[list[Hit]]:
        """Text and metadata of the hits that came from the BM25 ranking only (one ``get``); a chunk deleted
        from the collection after the index was opened is dropped."""
        missing = list(dict.fromkeys(h.chunk_id for hs in hits for h in hs if h.dense_rank is None))
        if not missing:
            return hits
        found = self._fetch(name, missing)
        out = []
        for hs in hits:
            row = []
            for h in hs:
                if h.dense_rank is not None:
                    row.append(h)
                elif h.chunk_id in found:
                    text, meta = found[h.chunk_id]
                    row.append(replace(h, text=text, metadata=meta, doc_id=str(meta.get("doc_id", h.doc_id))))
            out.append(row)
        return out

    def _dense_hits(self, name: str, emb: np.ndarray, n: int) -> list[list[Hit]]:
        """Top ``n`` dense hits per embedding row, with ``dense_rank``/``dense_score`` set."""
        return [
            [replace(h, dense_rank=rank, dense_score=h.score) for rank, h in enumerate(hits, start=1)]
            for hits in self._query(name, emb, n)
        ]

    def _fuse(self, name: str, dense: list[Hit], lexical: list[Hit], n: int) -> list[Hit]:
        """RRF of one query's dense and BM25 hits (chunk or document level), best ``n`` first."""
        by_id: dict[str, Hit] = {}
        for h in dense:
            by_id[h.chunk_id] = h
        for h in lexical:
            old = by_id.get(h.chunk_id)
            by_id[h.chunk_id] = h if old is None else replace(old, bm25_rank=h.bm25_rank, bm25_score=h.bm25_score)
        chunk_scores = rrf_scores([[h.chunk_id for h in dense], [h.chunk_id for h in lexical]], self.rrf_k)
        fused = [replace(by_id[cid], score=sc, collection=name) for cid, sc in chunk_scores.items()]
        fused.sort(key=lambda h: (-h.score, h.chunk_id))
        if self.fusion == "chunk":
            return fused[:n]
        doc_scores = rrf_scores(
            [list(dict.fromkeys(h.doc_id for h in dense)), list(dict.fromkeys(h.doc_id for h in lexical))], self.rrf_k
        )
        best: dict[str, Hit] = {}
        for h in fused:  # best fused chunk of each document
            best.setdefault(h.doc_id, h)
        docs = sorted(doc_scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        return [replace(best[d], score=sc) for d, sc in docs]

    def _search_collection(self, name: str, queries: list[str], emb: np.ndarray | None, n: int) -> list[list[Hit]]:
        """Top ``n`` hits per query from one collection in ``self.mode``."""
        if self.mode == "dense":
            return self._dense_hits(name, emb, n)
        if self.mode == "bm25":
            return self._fill(name, self._bm25_hits(name, queries, n))
        depth = max(n, self.fusion_depth)
        dense = self._dense_hits(name, emb, depth)
        lexical = self._bm25_hits(name, queries, depth)
        fused = [self._fuse(name, d, b, n) for d, b in zip(dense, lexical, strict=True)]
        return self._with_cosine(name, emb, self._fill(name, fused))

    def _with_cosine(self, name: str, emb: np.ndarray, hits: list[list[Hit]]) -> list[list[Hit]]:
        """Set ``dense_score`` (cosine similarity) of the hits only the BM25 ranking found, from their stored
        embeddings (one ``get``), so that ``retrieval.min_score`` means the same in hybrid as in dense mode."""
        import numpy as np

        missing = list(dict.fromkeys(h.chunk_id for hs in hits for h in hs if h.dense_score is None))
        if not missing:
            return hits
        res = self._call(name, lambda col: col.get(ids=missing, include=["embeddings"]))
        vectors = {cid: np.asarray(e, dtype=np.float32) for cid, e in zip(res["ids"], res["embeddings"], strict=True)}
        return [
            [h if h.dense_score is not None or h.chunk_id not in vectors
             else replace(h, dense_score=float(np.dot(emb[qi], vectors[h.chunk_id]))) for h in hs]
            for qi, hs in enumerate(hits)
        ]

    def search(self, queries: list[str], top_k: int) -> list[QueryResult]:
        """Top-k chunks per query over all configured collections, in ``self.mode``.

        All queries are embedded in ONE encode call (not at all in bm25 mode). With several collections, each
        is searched in its own thread and the hits are merged by score. A failing collection is recorded in
        every result's ``source_errors`` (the records are degraded), unless all collections fail.

        Args:
            queries: n query strings.
            top_k: hits per query (after merging).

        Returns:
            n :class:`QueryResult`, in query order.

        Raises:
            pipeline.errors.StoreError: every collection failed (after one self-healing retry each).
        """
        if not queries:
            return []
        emb = self.embed(queries) if self.mode != "bm25" else None
        per_col: dict[str, list[list[Hit]]] = {}
        errors: dict[str, str] = {}
        if len(self.names) == 1:
            per_col[self.names[0]] = self._search_collection(self.names[0], queries, emb, top_k)
        else:
            with ThreadPoolExecutor(max_workers=len(self.names), thread_name_prefix="retrieve") as pool:
                futures = {name: pool.submit(self._search_collection, name, queries, emb, top_k)
                           for name in self.names}
                for name, fut in futures.items():
                    try:
                        per_col[name] = fut.result()
                    except StoreError as exc:
                        errors[name] = str(exc)
                        log.warning("retrieval source %r failed: %s", name, exc)
            if not per_col:
                raise StoreError("all retrieval sources failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
        results = []
        for qi in range(len(queries)):
            hits = [h for name in self.names if name in per_col for h in per_col[name][qi]]
            hits.sort(key=lambda h: h.score, reverse=True)
            results.append(QueryResult(hits=hits[:top_k], source_errors=dict(errors)))
        return results

    def search_documents(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        """Document-level ranking for evaluation, in ``self.mode``: a document's score is the best score of its
        chunks (hybrid ``fusion="document"``: the RRF of the document rankings).

        Searches the main collection only. Fetches ``max(2 * k, fusion_depth)`` chunks per query and ranking,
        and twice as many again for the queries that got fewer than ``k`` distinct documents, until ``k``
        documents or the whole collection (so Recall@100 sees 100 documents even when documents have many
        chunks).

        Args:
            queries: n query strings (embedded in one encode call, except in bm25 mode).
            k: documents per query.

        Returns:
            Per query, up to ``k`` ``(doc_id, score)`` pairs sorted by score descending.

        Raises:
            pipeline.errors.StoreError: the store fails (after one self-healing retry).
        """
        if not queries:
            return []
        name = self.names[0]
        emb = self.embed(queries) if self.mode != "bm25" else None
        total = self.count()
        n = min(max(1, 2 * k, self.fusion_depth if self.mode == "hybrid" else 1), total)
        pending = list(range(len(queries)))
        out: list[list[tuple[str, float]]] = [[] for _ in queries]
        while pending:
            sub_emb = emb[pending] if emb is not None else None
            if self.mode == "hybrid":
                dense = self._dense_hits(name, sub_emb, n)
                lexical = self._bm25_hits(name, [queries[i] for i in pending], n)
                # document fusion needs every document of both lists; chunk fusion every chunk
                hits = [self._fuse(name, d, b, 2 * n) for d, b in zip(dense, lexical, strict=True)]
            elif self.mode == "bm25":  # ranking only: no passage text needed
                hits = self._bm25_hits(name, [queries[i] for i in pending], n)
            else:
                hits = self._search_collection(name, [queries[i] for i in pending], sub_emb, n)
            retry = []
            for qi, qhits in zip(pending, hits, strict=True):
                best: dict[str, float] = {}
                for h in qhits:
                    if h.score > best.get(h.doc_id, -math.inf):
                        best[h.doc_id] = h.score
                if len(best) < k and n < total:
                    retry.append(qi)
                else:
                    out[qi] = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
            pending = retry
            n = min(2 * n, total)
        return out


def retriever_options(cfg: Config) -> dict[str, Any]:
    """:class:`Retriever` keyword arguments from ``cfg.retrieval`` (mode, BM25 settings, fusion)."""
    from pipeline.retrieval.bm25 import BM25Settings

    r = cfg.retrieval
    return {"mode": r.mode, "bm25": BM25Settings.from_config(r), "rrf_k": r.rrf_k, "fusion": r.fusion,
            "fusion_depth": r.fusion_depth}


def rrf_scores(rankings: Sequence[Sequence[str]], k: int = 60) -> dict[str, float]:
    """Reciprocal rank fusion (Cormack, Clarke & Buettcher, SIGIR 2009): ``sum_r 1 / (k + rank_r(x))``.

    Args:
        rankings: item ids per ranking, best first (rank 1); an item missing from a ranking adds nothing;
            duplicates within one ranking count at their first position.
        k: the RRF constant (60 in the paper).

    Returns:
        ``{item: fused score}`` in descending score order (ties: first seen first).
    """
    scores: dict[str, float] = {}
    for ranking in rankings:
        seen: set[str] = set()
        for rank, item in enumerate(ranking, start=1):
            if item in seen:
                continue
            seen.add(item)
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return dict(sorted(scores.items(), key=lambda kv: -kv[1]))
