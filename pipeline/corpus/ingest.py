"""Ingest a SOURCE into a Chroma collection: read + validate, chunk, embed, write; idempotent.

Steps of :func:`ingest_source` (memory bounded whatever the corpus size: one write batch, one document, and
SQLite's page cache; the BM25 rebuild of step 6 adds ~30-40 B per chunk plus its vocabulary, texts and tokens
stay on disk):

1. With ``on_error="fail"`` (or ``reset``): a VALIDATION pass streams all of SOURCE
   (:func:`pipeline.corpus.sources.iter_source`: parse + validate, duplicate ids detected in a temporary SQLite table),
   so a bad input raises before the store is even opened and nothing stored is lost or half-written.
   Reading is cheap next to embedding (bench/ingest.py prints both).
2. Open the store (one writer: an exclusive lock file guards a local store against a second ``ingest``),
   optionally reset the collection, and open its ingest ledger (:mod:`pipeline.corpus.ledger`: one SQLite row per
   stored document), rebuilt from the collection's metadata when missing or untrustworthy.
3. The WRITE pass streams SOURCE again and compares each document with its ledger row: sha256 of the indexed
   text (``doc_hash``), the chunking parameters, the source path. Unchanged documents are only marked as seen;
   new and changed ones are chunked into the current write batch.
4. A write batch (``ingest.write_batch_chunks`` chunks, whole documents; 0 = 8 encode batches of the device's
   size) is embedded and upserted (ids ``<doc_id>#<chunk_index>``); chunks of changed documents beyond their new
   count are deleted; only then do the documents' ledger rows get their new hash (one SQLite commit). A killed
   ingest therefore re-embeds at most the batch it was writing. New chunks are written before old ones are
   deleted, so a document never disappears during an update.
5. Documents in the ledger but not seen by this ingest are removed (paged out of SQLite; their chunk ids
   ``doc#0..n-1`` deleted) - except those of a file that was skipped as bad (``on_error="skip"``): we cannot
   know what it holds, so its documents stay.
6. Keep the collection's BM25 index (:mod:`pipeline.retrieval.bm25`) in step: an ingest that changes the collection first
   clears the collection's BM25 build marker, and after writing rebuilds the index from the collection and
   marks the new build current (:meth:`pipeline.retrieval.bm25.BM25Index.build_stored`: paged reads of the
   collection, two passes through spill files); an ingest that changes nothing rebuilds only when the current build is missing
   or was made with other BM25 settings. A Chroma server without ``store.bm25_path`` stores no index (readers
   build it in memory).

Chunk metadata: ``doc_id`` (str), ``source`` (str, path relative to SOURCE), ``chunk_index`` (int),
``n_chunks`` (int), ``doc_hash`` (str, sha256 hex of the indexed text), ``chunking`` (str,
``"<chunk_chars>/<chunk_overlap>"``; a change of chunking parameters rewrites the document).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from pipeline.corpus.chunking import check_chunking, chunk_text
from pipeline.corpus.ledger import IngestLedger, LedgerRow, ledger_path
from pipeline.corpus.ledger import chunk_ids as ledger_chunk_ids
from pipeline.corpus.sources import SkippedInput, SourceReport, SqliteSeenIds, iter_source
from pipeline.store.client import writer_lock

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from chromadb.api.models.Collection import Collection
    from sentence_transformers import SentenceTransformer

    from pipeline.config import EmbeddingConfig, IngestConfig, StoreConfig
    from pipeline.retrieval.bm25 import BM25Settings

log = logging.getLogger(__name__)


def doc_hash(text: str) -> str:
    """sha256 hex digest of a document's indexed text (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chunk_id(doc_id: str, chunk_index: int) -> str:
    """Stable chunk id ``<doc_id>#<chunk_index>``."""
    return f"{doc_id}#{chunk_index}"


@dataclass(frozen=True)
class IngestSummary:
    """What an ingest did. Counts are documents (``docs_*``) and chunks (``chunks_*``).

    ``chunks_added``/``chunks_updated`` were embedded and written for new/changed documents,
    ``chunks_unchanged`` were left as they were, ``chunks_removed`` were deleted (vanished documents and
    stale chunks of changed ones). ``seconds`` is the wall time of the whole call (reading, model loading
    if not given, embedding, writing); ``chunks_per_s`` = written chunks / ``seconds``;
    ``validate_seconds`` the validation pass (read + parse + validate all of SOURCE), ``embed_seconds`` the
    time inside ``encode``; ``ledger_rebuilt``: the ingest ledger was rebuilt from the collection.
    """

    collection: str
    store: str
    docs_added: int = 0
    docs_updated: int = 0
    docs_unchanged: int = 0
    docs_removed: int = 0
    chunks_added: int = 0
    chunks_updated: int = 0
    chunks_unchanged: int = 0
    chunks_removed: int = 0
    chunks_total: int = 0
    skipped: tuple[SkippedInput, ...] = field(default_factory=tuple)
    seconds: float = 0.0
    chunks_per_s: float = 0.0
    bm25_built: bool = False
    bm25_seconds: float = 0.0
    validate_seconds: float = 0.0
    embed_seconds: float = 0.0
    ledger_rebuilt: bool = False

    @property
    def chunks_written(self) -> int:
        """Chunks embedded and written by this ingest."""
        return self.chunks_added + self.chunks_updated

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for manifests and JSON (skipped inputs as ``"<file>[:<line>]: <reason>"`` strings)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["skipped"] = [str(s) for s in self.skipped]
        return d

    def line(self) -> str:
        """One-line summary for the CLI."""
        return (
            f"ingested into {self.collection!r} ({self.store}): "
            f"documents added {self.docs_added}, updated {self.docs_updated}, unchanged {self.docs_unchanged}, "
            f"removed {self.docs_removed}; chunks added {self.chunks_added}, updated {self.chunks_updated}, "
            f"unchanged {self.chunks_unchanged}, removed {self.chunks_removed}; skipped {len(self.skipped)}; "
            f"{self.chunks_total} chunks stored; {self.seconds:.1f} s, {self.chunks_per_s:.1f} chunks/s"
            + (f"; BM25 index rebuilt in {self.bm25_seconds:.1f} s" if self.bm25_built else "")
        )


def ingest_source(
    source: str | Path,
    store_cfg: StoreConfig,
    ingest_cfg: IngestConfig,
    embed_cfg: EmbeddingConfig,
    *,
    reset: bool = False,
    embedder: SentenceTransformer | None = None,
    progress: bool = True,
    bm25: BM25Settings | None = None,
    embed_fn: Callable[[list[str], list[str]], np.ndarray] | None = None,
) -> IngestSummary:
    """Ingest SOURCE into collection ``store_cfg.collection`` (see the module docstring for the steps).

    Args:
        source: a folder (recursively) or a .jsonl/.jsonl.gz file (:mod:`pipeline.corpus.sources`).
        store_cfg: the store (path or chroma_url) and collection name.
        ingest_cfg: chunk_chars, chunk_overlap, on_error (fail|skip), write_batch_chunks.
        embed_cfg: device and batch_size of the embedding model.
        reset: delete and recreate the collection first (after SOURCE was validated).
        embedder: an already loaded model (:func:`pipeline.retrieval.embedding.load_embedder`); loaded on
            ``embed_cfg.device`` only if something has to be embedded.
        progress: tqdm bars (stderr) over documents read and chunks embedded.
        bm25: settings of the collection's BM25 index (default :class:`pipeline.retrieval.bm25.BM25Settings`, i.e. the
            ``retrieval.bm25_*`` defaults).
        embed_fn: embeddings supplied instead of the model: called once per write batch with (chunk ids, chunk
            texts), n of each, it returns float32 [n, 384] L2-normalised rows in the same order (e.g. rows of
            embeddings computed elsewhere, looked up by chunk id). No model is loaded then; the write batch is
            ``ingest.write_batch_chunks`` (0 = 8 x the CPU encode batch). Raises ValueError when it returns another
            number of rows than chunks (nothing of that batch is written).

    Returns:
        An :class:`IngestSummary`.

    Raises:
        pipeline.errors.InputError: bad SOURCE with ``on_error="fail"`` (file and line named); nothing written.
        pipeline.errors.ConfigError: invalid chunking parameters or on_error value, an unusable ``store.ca_file``
            or ``store.token_env``; nothing written.
        pipeline.errors.StoreError: no store or collection named, the store cannot be opened/written, or another
            ingest holds the store.
    """
    from pipeline.retrieval.bm25 import BM25Settings, index_root, rebuild, set_build_marker, stored_build
    from pipeline.store.auth import ca_file
    from pipeline.store.client import describe, get_collection, open_client, reset_collection, store_errors
    from pipeline.store.preflight import require_store_named

    require_store_named(store_cfg)  # before anything is read: never a store in the current directory by default
    ca_file(store_cfg)  # an unusable CA bundle of a Chroma server: refused before the source is read
    t0 = time.perf_counter()
    check_chunking(ingest_cfg.chunk_chars, ingest_cfg.chunk_overlap)
    bm25 = bm25 or BM25Settings()
    bm25.check()
    chunking = f"{ingest_cfg.chunk_chars}/{ingest_cfg.chunk_overlap}"
    name = store_cfg.collection
    where = describe(store_cfg)

    # --- 1. validation pass: bad input raises before the store is touched ---------------------
    n_valid = None
    validate_s = 0.0
    if ingest_cfg.on_error == "fail" or reset:
        with tempfile.TemporaryDirectory(prefix="rag-ingest-") as tmp:
            seen = SqliteSeenIds.temporary(Path(tmp) / "seen.sqlite")
            try:
                n_valid = sum(1 for _ in iter_source(source, ingest_cfg.on_error, progress, seen=seen,
                                                     report=SourceReport()))
            finally:
                seen.close()
        validate_s = time.perf_counter() - t0
        log.info("validated %d documents of %s in %.1f s", n_valid, source, validate_s)

    with writer_lock(store_cfg):
        client = open_client(store_cfg, create=True)
        col = reset_collection(client, name) if reset else get_collection(client, name, create=True)
        with store_errors(f"read collection {name!r} in {where}"):
            max_batch = int(client.get_max_batch_size())
        page = max(1, min(max_batch, 10_000))
        ledger = IngestLedger(ledger_path(store_cfg, name), str(col.id))
        try:
            ledger.ensure_valid(col, page)
            ledger.begin()
            writer = _Writer(col, ledger, store_cfg, ingest_cfg, embed_cfg, embedder, max_batch, name, where,
                             set_build_marker, embed_fn)
            report = SourceReport()
            chunks_unchanged = docs_unchanged = 0
            # --- 2-4. write pass ---------------------------------------------------------------
            with tqdm(total=n_valid, desc="ingesting", unit="doc", disable=not progress) as bar:
                for doc in iter_source(source, ingest_cfg.on_error, False, seen=ledger.seen, report=report):
                    h = doc_hash(doc.text)
                    row = ledger.get(doc.doc_id)
                    if row is not None and (row.doc_hash, row.chunking, row.source) == (h, chunking, doc.source):
                        ledger.touch(doc.doc_id)
                        docs_unchanged += 1
                        chunks_unchanged += row.n_chunks
                    else:
                        writer.add(doc, h, chunking, row)
                    bar.update(1)
                writer.flush()
                ledger.commit()
            # --- 5. stale documents --------------------------------------------------------------
            protected = report.skipped_sources
            for rows in ledger.stale(page):
                gone = []
                for r in rows:
                    if r.source in protected:
                        log.warning("keeping document %r: its file was skipped as bad input", r.doc_id)
                        continue
                    gone.append(r)
                if gone:
                    writer.delete_documents(gone)
            with store_errors(f"count collection {name!r} in {where}"):
                total = col.count()
        finally:
            ledger.close()

        # --- 6. BM25 index: rebuilt from the collection when it changed or has no current build ---
        bm25_built, bm25_seconds = False, 0.0
        if index_root(store_cfg, name) is not None and (writer.changed or stored_build(col, store_cfg, bm25) is None):
            tb = time.perf_counter()
            log.info("rebuilding the BM25 index of %r from the collection (%d chunks)", name, total)
            rebuild(col, store_cfg, bm25)
            bm25_built, bm25_seconds = True, time.perf_counter() - tb

    seconds = time.perf_counter() - t0
    written = writer.chunks_added + writer.chunks_updated
    summary = IngestSummary(
        collection=name,
        store=where,
        docs_added=writer.docs_added,
        docs_updated=writer.docs_updated,
        docs_unchanged=docs_unchanged,
        docs_removed=writer.docs_removed,
        chunks_added=writer.chunks_added,
        chunks_updated=writer.chunks_updated,
        chunks_unchanged=chunks_unchanged,
        chunks_removed=writer.chunks_removed,
        chunks_total=total,
        skipped=tuple(report.skipped),
        seconds=seconds,
        chunks_per_s=written / seconds if seconds > 0 else 0.0,
        bm25_built=bm25_built,
        bm25_seconds=bm25_seconds,
        validate_seconds=validate_s,
        embed_seconds=writer.embed_seconds,
        ledger_rebuilt=ledger.rebuilt,
    )
    log.debug("%s", summary.line())  # the caller reports it: the ingest command on stdout, a run's rank0 in its log
    return summary


class _Writer:
    """Write batches of the write pass (step 4) and stale-document deletion (step 5) of :func:`ingest_source`."""

    def __init__(self, col: Collection, ledger: IngestLedger, store_cfg: StoreConfig, ingest_cfg: IngestConfig,
                 embed_cfg: EmbeddingConfig, embedder: SentenceTransformer | None, max_batch: int, name: str,
                 where: str, set_build_marker: Any,
                 embed_fn: Callable[[list[str], list[str]], np.ndarray] | None = None) -> None:
        self.col, self.ledger, self.ingest_cfg, self.embed_cfg = col, ledger, ingest_cfg, embed_cfg
        self.embedder = embedder
        self.embed_fn = embed_fn
        self.max_batch = max_batch
        self.name, self.where = name, where
        self._set_build_marker = set_build_marker
        self.batch_size = 0  # resolved when the model is loaded (its device)
        self.write_batch = 0
        self.changed = False
        self.docs: list[tuple[Any, str, str, list[str], LedgerRow | None]] = []
        self.n_pending = 0
        self.docs_added = self.docs_updated = self.docs_removed = 0
        self.chunks_added = self.chunks_updated = self.chunks_removed = 0
        self.embed_seconds = 0.0

    def _mark_changed(self) -> None:
        if not self.changed:  # the stored BM25 build no longer matches the collection from the first write on
            self._set_build_marker(self.col, "")
            self.changed = True

    def add(self, doc: Any, h: str, chunking: str, old: LedgerRow | None) -> None:
        """Queue a new or changed document; writes the batch once it holds ``write_batch`` chunks."""
        from pipeline.retrieval.embedding import load_embedder, resolve_batch_size, resolve_write_batch

        if not self.write_batch and self.embed_fn is not None:
            self.batch_size = resolve_batch_size(self.embed_cfg.batch_size, "cpu")
            self.write_batch = max(1, resolve_write_batch(self.ingest_cfg.write_batch_chunks, self.batch_size))
        if self.embedder is None and self.embed_fn is None:
            self.embedder = load_embedder(self.embed_cfg.device)
        if not self.write_batch:
            self.batch_size = resolve_batch_size(self.embed_cfg.batch_size, str(self.embedder.device))
            self.write_batch = max(1, resolve_write_batch(self.ingest_cfg.write_batch_chunks, self.batch_size))
            log.info("embedding on %s: %d texts per encode batch, %d chunks per write batch",
                     self.embedder.device, self.batch_size, self.write_batch)
        pieces = chunk_text(doc.text, self.ingest_cfg.chunk_chars, self.ingest_cfg.chunk_overlap)
        self.docs.append((doc, h, chunking, pieces, old))
        self.n_pending += len(pieces)
        if self.n_pending >= self.write_batch:
            self.flush()

    def flush(self) -> None:
        """Embed + upsert the queued documents, delete their chunks beyond the new counts, finish their rows."""
        from pipeline.retrieval.embedding import embed_texts
        from pipeline.store.client import store_errors

        if not self.docs:
            return
        self._mark_changed()
        docs, self.docs, self.n_pending = self.docs, [], 0
        self.ledger.intend((d.doc_id, len(p)) for d, _h, _c, p, _o in docs)
        ids: list[str] = []
        texts: list[str] = []
        metas: list[dict[str, Any]] = []
        for doc, h, chunking, pieces, _old in docs:
            for i, piece in enumerate(pieces):
                ids.append(chunk_id(doc.doc_id, i))
                texts.append(piece)
                metas.append({"doc_id": doc.doc_id, "source": doc.source, "chunk_index": i,
                              "n_chunks": len(pieces), "doc_hash": h, "chunking": chunking})
        te = time.perf_counter()
        if self.embed_fn is not None:
            emb = self.embed_fn(ids, texts)
            if len(emb) != len(ids):
                raise ValueError(f"embed_fn returned {len(emb)} embeddings for {len(ids)} chunks")
        else:
            emb = embed_texts(self.embedder, texts, batch_size=self.batch_size)
        self.embed_seconds += time.perf_counter() - te
        with store_errors(f"write to collection {self.name!r} in {self.where}"):
            for lo in range(0, len(ids), self.max_batch):
                hi = lo + self.max_batch
                self.col.upsert(ids=ids[lo:hi], embeddings=emb[lo:hi], documents=texts[lo:hi], metadatas=metas[lo:hi])
        beyond: list[str] = []
        for doc, _h, _c, pieces, old in docs:
            if old is None:
                self.docs_added += 1
                self.chunks_added += len(pieces)
            else:
                # a row with an empty hash is a document whose earlier write did not finish: it counts as updated
                self.docs_updated += 1
                self.chunks_updated += len(pieces)
                self.chunks_removed += max(0, old.n_chunks - len(pieces))
                beyond.extend(ledger_chunk_ids(doc.doc_id, len(pieces), max(old.n_chunks, old.max_chunks)))
        self._delete_ids(beyond)
        self.ledger.finish((d.doc_id, h, c, d.source, len(p)) for d, h, c, p, _o in docs)

    def delete_documents(self, rows: list[LedgerRow]) -> None:
        """Delete every chunk id the rows' documents may have, then the rows."""
        self._mark_changed()
        ids = [cid for r in rows for cid in ledger_chunk_ids(r.doc_id, 0, max(r.n_chunks, r.max_chunks))]
        self._delete_ids(ids)
        self.ledger.delete([r.doc_id for r in rows])
        self.docs_removed += sum(1 for r in rows if r.doc_hash)
        self.chunks_removed += sum(r.n_chunks for r in rows)

    def _delete_ids(self, ids: list[str]) -> None:
        from pipeline.store.client import store_errors

        if not ids:
            return
        self._mark_changed()
        with store_errors(f"delete stale chunks from collection {self.name!r} in {self.where}"):
            for lo in range(0, len(ids), self.max_batch):
                self.col.delete(ids=ids[lo:lo + self.max_batch])
