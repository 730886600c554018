"""Ingest a SOURCE into a Chroma collection: read + validate, chunk, embed, write; idempotent.

Steps of :func:`ingest_source`:

1. Read and validate ALL of SOURCE (:func:`workers.sources.read_source`). With ``on_error="fail"`` a bad
   input raises here, before the store is even opened, so nothing stored is lost or half-written.
2. Open the store (one writer: an exclusive lock file guards a local store against a second ``ingest``),
   optionally reset the collection, and read the metadata of the chunks already stored.
3. Compare per document: sha256 of the indexed text (``doc_hash``), the chunking parameters, the source path
   and the completeness of its stored chunks. Unchanged documents are skipped; new ones are added; changed
   (or incompletely stored) ones are rewritten; documents no longer in SOURCE are removed - except those of a
   file that was skipped as bad (``on_error="skip"``): we cannot know what it holds, so its documents stay.
4. Embed the chunks to write in batches of ``ingest.write_batch_chunks`` and upsert them (ids
   ``<doc_id>#<chunk_index>``), then delete stale chunk ids. New chunks are written before old ones are
   deleted, so a document never disappears during an update; an interrupted ingest is repaired by the next
   one (incomplete documents fail the completeness check and are rewritten).
5. Keep the collection's BM25 index (:mod:`workers.bm25`) in step: an ingest that changes the collection first
   clears the collection's BM25 build marker, and after writing rebuilds the index from the collection and
   marks the new build current; an ingest that changes nothing rebuilds only when the current build is missing
   or was made with other BM25 settings. A Chroma server without ``store.bm25_path`` stores no index (readers
   build it in memory).

Chunk metadata: ``doc_id`` (str), ``source`` (str, path relative to SOURCE), ``chunk_index`` (int),
``n_chunks`` (int), ``doc_hash`` (str, sha256 hex of the indexed text), ``chunking`` (str,
``"<chunk_chars>/<chunk_overlap>"``; a change of chunking parameters rewrites the document).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from pipeline.errors import StoreError
from workers.chunking import check_chunking, chunk_text
from workers.sources import SkippedInput, read_source

if TYPE_CHECKING:  # pragma: no cover
    from chromadb.api.models.Collection import Collection
    from sentence_transformers import SentenceTransformer

    from pipeline.config import EmbeddingConfig, IngestConfig, StoreConfig
    from workers.bm25 import BM25Settings

log = logging.getLogger(__name__)

LOCK_FILE = ".rag-pipeline-ingest.lock"
"""Lock file inside a local store directory held (flock, exclusive) by the one ingest writing to it."""


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
    if not given, embedding, writing); ``chunks_per_s`` = written chunks / ``seconds``.
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


@dataclass
class _StoredDoc:
    """What the collection holds for one document."""

    ids: set[str] = field(default_factory=set)
    hashes: set[str] = field(default_factory=set)
    n_chunks: set[int] = field(default_factory=set)
    chunkings: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)

    def matches(self, doc_hash: str, chunking: str, source: str) -> bool:
        """True if complete and identical to what ingesting the document now would write."""
        if self.hashes != {doc_hash} or self.chunkings != {chunking} or self.sources != {source}:
            return False
        if len(self.n_chunks) != 1:
            return False
        (n,) = self.n_chunks
        return len(self.ids) == n


@contextlib.contextmanager
def writer_lock(store_cfg: StoreConfig) -> Iterator[None]:
    """Hold an exclusive, non-blocking flock on ``<store>/.rag-pipeline-ingest.lock`` (local stores only).

    Raises:
        pipeline.errors.StoreError: another process is ingesting into the same store directory.
    """
    if store_cfg.chroma_url:
        yield  # a Chroma server serialises writes itself
        return
    path = Path(store_cfg.path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                f"{path}: another ingest is writing to this store (one writer only; see DESIGN.md)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_stored(col: Collection, page: int) -> dict[str, _StoredDoc]:
    """Metadata of every chunk in the collection, grouped by doc_id (paged ``get`` of ``page`` ids)."""
    stored: dict[str, _StoredDoc] = {}
    offset = 0
    while True:
        res = col.get(include=["metadatas"], limit=page, offset=offset)
        ids = res["ids"]
        for cid, meta in zip(ids, res["metadatas"] or [None] * len(ids), strict=True):
            meta = meta or {}
            did = str(meta.get("doc_id", cid.rsplit("#", 1)[0]))
            sd = stored.setdefault(did, _StoredDoc())
            sd.ids.add(cid)
            sd.hashes.add(str(meta.get("doc_hash", "")))
            sd.chunkings.add(str(meta.get("chunking", "")))
            sd.sources.add(str(meta.get("source", "")))
            n = meta.get("n_chunks")
            sd.n_chunks.add(n if isinstance(n, int) else -1)
        if len(ids) < page:
            return stored
        offset += len(ids)


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
) -> IngestSummary:
    """Ingest SOURCE into collection ``store_cfg.collection`` (see the module docstring for the steps).

    Args:
        source: a folder (recursively) or a .jsonl/.jsonl.gz file (:mod:`workers.sources`).
        store_cfg: the store (path or chroma_url) and collection name.
        ingest_cfg: chunk_chars, chunk_overlap, on_error (fail|skip), write_batch_chunks.
        embed_cfg: device and batch_size of the embedding model.
        reset: delete and recreate the collection first (after SOURCE was validated).
        embedder: an already loaded model (:func:`workers.embedding.load_embedder`); loaded on
            ``embed_cfg.device`` only if something has to be embedded.
        progress: tqdm bars (stderr) over documents read and chunks embedded.
        bm25: settings of the collection's BM25 index (default :class:`workers.bm25.BM25Settings`, i.e. the
            ``retrieval.bm25_*`` defaults).

    Returns:
        An :class:`IngestSummary`.

    Raises:
        pipeline.errors.InputError: bad SOURCE with ``on_error="fail"`` (file and line named); nothing written.
        pipeline.errors.ConfigError: invalid chunking parameters or on_error value; nothing written.
        pipeline.errors.StoreError: the store cannot be opened/written, or another ingest holds the store.
    """
    from workers.bm25 import BM25Settings, index_root, rebuild, set_build_marker, stored_build
    from workers.embedding import embed_texts, load_embedder
    from workers.store import describe, get_collection, open_client, reset_collection, store_errors

    t0 = time.perf_counter()
    check_chunking(ingest_cfg.chunk_chars, ingest_cfg.chunk_overlap)
    bm25 = bm25 or BM25Settings()
    bm25.check()
    scan = read_source(source, on_error=ingest_cfg.on_error, progress=progress)
    chunking = f"{ingest_cfg.chunk_chars}/{ingest_cfg.chunk_overlap}"
    name = store_cfg.collection
    where = describe(store_cfg)

    with writer_lock(store_cfg):
        client = open_client(store_cfg, create=True)
        col = reset_collection(client, name) if reset else get_collection(client, name, create=True)
        with store_errors(f"read collection {name!r} in {where}"):
            max_batch = int(client.get_max_batch_size())
            stored = _read_stored(col, page=max(1, min(max_batch, 10_000)))

        # --- classify documents -------------------------------------------------------------
        to_write: list[tuple[Any, str, bool]] = []  # (document, hash, is_update)
        counts = dict.fromkeys(("docs_added", "docs_updated", "docs_unchanged", "docs_removed"), 0)
        chunks_unchanged = 0
        current = set()
        for doc in scan.documents:
            current.add(doc.doc_id)
            h = doc_hash(doc.text)
            old = stored.get(doc.doc_id)
            if old is None:
                to_write.append((doc, h, False))
                counts["docs_added"] += 1
            elif old.matches(h, chunking, doc.source):
                counts["docs_unchanged"] += 1
                chunks_unchanged += len(old.ids)
            else:
                to_write.append((doc, h, True))
                counts["docs_updated"] += 1

        protected = scan.skipped_sources
        stale: list[str] = []
        for did, old in stored.items():
            if did in current:
                continue
            if old.sources & protected:
                log.warning("keeping document %r: its file was skipped as bad input", did)
                continue
            stale.extend(sorted(old.ids))
            counts["docs_removed"] += 1

        # --- chunk --------------------------------------------------------------------------
        ids: list[str] = []
        texts: list[str] = []
        metas: list[dict[str, Any]] = []
        chunks_added = chunks_updated = 0
        for doc, h, is_update in to_write:
            pieces = chunk_text(doc.text, ingest_cfg.chunk_chars, ingest_cfg.chunk_overlap)
            new_ids = [chunk_id(doc.doc_id, i) for i in range(len(pieces))]
            for i, (cid, piece) in enumerate(zip(new_ids, pieces, strict=True)):
                ids.append(cid)
                texts.append(piece)
                metas.append({
                    "doc_id": doc.doc_id, "source": doc.source, "chunk_index": i,
                    "n_chunks": len(pieces), "doc_hash": h, "chunking": chunking,
                })
            if is_update:
                chunks_updated += len(pieces)
                stale.extend(sorted(stored[doc.doc_id].ids - set(new_ids)))
            else:
                chunks_added += len(pieces)

        # --- embed + write, then delete stale chunks ----------------------------------------
        changed = bool(texts or stale)
        if changed:  # the stored BM25 build no longer matches the collection from the first write on
            set_build_marker(col, "")
        if texts and embedder is None:
            embedder = load_embedder(embed_cfg.device)
        batch = max(1, min(ingest_cfg.write_batch_chunks, max_batch))
        with tqdm(total=len(texts), desc="embedding", unit="chunk", disable=not progress or not texts) as bar:
            for lo in range(0, len(texts), batch):
                hi = lo + batch
                emb = embed_texts(embedder, texts[lo:hi], batch_size=embed_cfg.batch_size)
                with store_errors(f"write to collection {name!r} in {where}"):
                    col.upsert(ids=ids[lo:hi], embeddings=emb, documents=texts[lo:hi], metadatas=metas[lo:hi])
                bar.update(hi - lo if hi <= len(texts) else len(texts) - lo)
        with store_errors(f"delete stale chunks from collection {name!r} in {where}"):
            for lo in range(0, len(stale), max_batch):
                col.delete(ids=stale[lo : lo + max_batch])
            total = col.count()

        # --- BM25 index: rebuilt from the collection when it changed or has no current build ---
        bm25_built, bm25_seconds = False, 0.0
        if index_root(store_cfg, name) is not None and (changed or stored_build(col, store_cfg, bm25) is None):
            tb = time.perf_counter()
            rebuild(col, store_cfg, bm25)
            bm25_built, bm25_seconds = True, time.perf_counter() - tb

    seconds = time.perf_counter() - t0
    written = chunks_added + chunks_updated
    summary = IngestSummary(
        collection=name,
        store=where,
        **counts,
        chunks_added=chunks_added,
        chunks_updated=chunks_updated,
        chunks_unchanged=chunks_unchanged,
        chunks_removed=len(stale),
        chunks_total=total,
        skipped=tuple(scan.skipped),
        seconds=seconds,
        chunks_per_s=written / seconds if seconds > 0 else 0.0,
        bm25_built=bm25_built,
        bm25_seconds=bm25_seconds,
    )
    log.info("%s", summary.line())
    return summary
