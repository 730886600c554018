"""Dense retrieval over one or more Chroma collections, with self-healing collection handles.

Scores are cosine similarities: the collections use cosine space, so ``score = 1 - distance``
(embeddings are L2-normalised, see :mod:`workers.embedding`).

Self-healing (DESIGN.md): when another process deletes and recreates a collection, our handle raises
``NotFoundError: Collection [uuid] does not exist.``; we rebind with ``get_or_create_collection(name)`` and
retry the call once; a second failure propagates.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.errors import StoreError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection
    from sentence_transformers import SentenceTransformer

    from pipeline.config import StoreConfig

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
        score: cosine similarity to the query, ``1 - cosine distance``, in [-1, 1].
        metadata: the chunk's stored metadata (doc_id, source, chunk_index, n_chunks, doc_hash, chunking).
        collection: the collection it came from.
    """

    doc_id: str
    chunk_id: str
    text: str
    score: float
    metadata: dict[str, Any]
    collection: str


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
        embedder: a model from :func:`workers.embedding.load_embedder`.
        collections: extra collections (``retrieval.collections``) searched besides the main collection
            ``store_cfg.collection``, concurrently, merged by score; the main one is always searched first
            and is the one :meth:`count` and :meth:`search_documents` use (duplicates are ignored).
        batch_size: queries per ``encode`` forward pass.
        create: create the store directory and the main collection if missing (rank0 may ingest into it
            afterwards; an empty collection simply returns no hits). ``False``: a missing store or main
            collection is a StoreError. Missing extra collections are never created: they fail at search
            time, recorded per query in ``source_errors``.

    Raises:
        pipeline.errors.StoreError: the store cannot be opened, or (``create=False``) the store or the main
            collection does not exist.
    """

    def __init__(
        self,
        store_cfg: StoreConfig,
        embedder: SentenceTransformer,
        collections: list[str] | None = None,
        batch_size: int = 64,
        *,
        create: bool = True,
    ) -> None:
        from workers.store import describe, get_collection, open_client

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

    # --- collection handles -------------------------------------------------------------------
    def _collection(self, name: str) -> Collection:
        from workers.store import get_collection

        with self._lock:
            col = self._cols.get(name)
            if col is None:
                col = get_collection(self._client, name, create=False)
                self._cols[name] = col
            return col

    def _rebind(self, name: str) -> Collection:
        """Replace the handle of ``name`` with ``get_or_create_collection(name)`` (self-healing)."""
        from workers.store import get_collection

        with self._lock:
            col = get_collection(self._client, name, create=True)
            self._cols[name] = col
            self.rebinds += 1
        log.warning("collection %r in %s was recreated by another process; rebound the handle", name, self._where)
        return col

    def _call(self, name: str, fn: Callable[[Collection], T]) -> T:
        """``fn(collection)``; on "does not exist" rebind and retry once; errors become StoreError."""
        from workers.store import is_not_found, store_errors

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
        from workers.embedding import embed_texts

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

    def search(self, queries: list[str], top_k: int) -> list[QueryResult]:
        """Top-k chunks per query over all configured collections.

        All queries are embedded in ONE encode call. With several collections, each is queried in its own
        thread and the hits are merged by score. A failing collection is recorded in every result's
        ``source_errors`` (the records are degraded), unless all collections fail.

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
        emb = self.embed(queries)
        per_col: dict[str, list[list[Hit]]] = {}
        errors: dict[str, str] = {}
        if len(self.names) == 1:
            per_col[self.names[0]] = self._query(self.names[0], emb, top_k)
        else:
            with ThreadPoolExecutor(max_workers=len(self.names), thread_name_prefix="retrieve") as pool:
                futures = {name: pool.submit(self._query, name, emb, top_k) for name in self.names}
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
        """Document-level ranking for evaluation: a document's score is the max over its chunks.

        Searches the main collection only. Fetches ``k * 2`` chunks per query, and twice as many again for
        the queries that got fewer than ``k`` distinct documents, until ``k`` documents or the whole
        collection (so Recall@100 sees 100 documents even when documents have many chunks).

        Args:
            queries: n query strings (embedded in one encode call).
            k: documents per query.

        Returns:
            Per query, up to ``k`` ``(doc_id, score)`` pairs sorted by score descending.

        Raises:
            pipeline.errors.StoreError: the store fails (after one self-healing retry).
        """
        if not queries:
            return []
        emb = self.embed(queries)
        name = self.names[0]
        total = self.count()
        n = min(max(1, 2 * k), total)
        pending = list(range(len(queries)))
        out: list[list[tuple[str, float]]] = [[] for _ in queries]
        while pending:
            hits = self._query(name, emb[pending], n)
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
