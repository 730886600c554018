"""The ingest ledger: what a collection holds, per document, on disk (stdlib ``sqlite3``), for bounded-memory ingest.

One SQLite file per collection with one row per stored document::

    docs(doc_id TEXT PRIMARY KEY, doc_hash TEXT, chunking TEXT, source TEXT,
         n_chunks INTEGER, max_chunks INTEGER, seen_generation INTEGER)

``doc_hash`` is the sha256 of the document's indexed text as stored, ``''`` while the document is not completely
stored (a write in progress, or an inconsistent state found in the collection): such a row never matches a
document, so the document is rewritten. ``n_chunks`` is its number of stored chunks (ids ``doc#0..n-1``);
``max_chunks`` the most chunk ids any write of it may have left (the range deleted when it is removed or
shrinks). ``seen_generation`` is the number of the last ingest that found the document in SOURCE: after the
write pass, rows with an older generation are the stale documents.

Write protocol (:meth:`IngestLedger.intend` / :meth:`IngestLedger.finish`, one SQLite commit each): before a
write batch is upserted, its documents' rows get ``doc_hash = ''`` and ``max_chunks = max(old, new)`` (new
documents a new row); after every chunk of the batch is in the collection, the rows get their hash and chunk
count. So a killed ingest leaves finished documents with their final rows (not re-embedded next time) and the
documents of the interrupted batch with an old or empty hash (rewritten next time), and every chunk id a write
may have created is known.

Validity: the file records the Chroma collection's id; a collection deleted and recreated (``--reset``, another
tool) has another id and the ledger is rebuilt. A missing ledger for a non-empty collection (a store written by
an older version, a lost file), or one that claims more complete chunks than the collection holds, is rebuilt
from the collection's chunk metadata, paged into a staging table (bounded memory), then grouped in SQL.

Where it lives (:func:`ledger_path`): local store -> ``<store.path>/ingest/<collection>.sqlite``; Chroma server
with ``store.bm25_path`` -> ``<bm25_path>/../ingest/<collection>.sqlite`` (beside the BM25 indexes, on the
shared filesystem); Chroma server without it -> ``$XDG_CACHE_HOME/rag-pipeline/ingest/<host>_<port>/
<collection>.sqlite`` (``~/.cache`` by default). Rollback journal (not WAL): it works on network filesystems.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pipeline.corpus.sources import SqliteSeenIds
from pipeline.errors import StoreError

if TYPE_CHECKING:  # pragma: no cover
    from chromadb.api.models.Collection import Collection

    from pipeline.config import StoreConfig

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Layout version of the ledger file; another version is rebuilt."""

TOUCH_BATCH = 10_000
"""Unchanged documents whose generation is updated per executemany."""


def ledger_path(store_cfg: StoreConfig, collection: str) -> Path:
    """The ledger file of ``collection`` (see the module docstring for the rules)."""
    if not store_cfg.chroma_url:
        return Path(store_cfg.path) / "ingest" / f"{collection}.sqlite"
    if store_cfg.bm25_path:
        return Path(store_cfg.bm25_path).resolve().parent / "ingest" / f"{collection}.sqlite"
    url = urlparse(store_cfg.chroma_url)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    port = url.port or (443 if url.scheme == "https" else 8000)
    return cache / "rag-pipeline" / "ingest" / f"{url.hostname}_{port}" / f"{collection}.sqlite"


@dataclass(frozen=True)
class LedgerRow:
    """One document as stored (see the module docstring for the fields)."""

    doc_id: str
    doc_hash: str
    chunking: str
    source: str
    n_chunks: int
    max_chunks: int
    seen_generation: int


def chunk_ids(doc_id: str, lo: int, hi: int) -> list[str]:
    """Chunk ids ``doc#lo .. doc#hi-1``."""
    return [f"{doc_id}#{i}" for i in range(lo, hi)]


class IngestLedger:
    """The ledger of one collection, opened by the single writer (the ingest holding the store's writer lock).

    Args:
        path: the SQLite file (created with its directory).
        collection_id: the Chroma collection's id (str of its UUID).

    Raises:
        pipeline.errors.StoreError: the file cannot be created or read.
    """

    def __init__(self, path: Path, collection_id: str) -> None:
        self.path = path
        self.collection_id = collection_id
        self.rebuilt = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.con = sqlite3.connect(str(path), isolation_level=None, timeout=60)
            self.con.execute("PRAGMA synchronous=NORMAL")
            self.con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self.con.execute(
                "CREATE TABLE IF NOT EXISTS docs (doc_id TEXT PRIMARY KEY, doc_hash TEXT NOT NULL, chunking TEXT, "
                "source TEXT, n_chunks INTEGER NOT NULL, max_chunks INTEGER NOT NULL, seen_generation INTEGER NOT NULL)"
            )
            self.con.execute("CREATE INDEX IF NOT EXISTS docs_generation ON docs (seen_generation)")
            meta = dict(self.con.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("collection_id") != collection_id or meta.get("schema") != str(SCHEMA_VERSION):
                if meta:
                    log.info("ingest ledger %s belongs to another collection or version: starting afresh", path)
                self._set_meta(collection_id=collection_id, schema=str(SCHEMA_VERSION), generation="0", valid="0")
                self.con.execute("DELETE FROM docs")
            self.con.execute("BEGIN")
            self.seen = SqliteSeenIds(self.con)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the ingest ledger {path}: {exc}") from exc
        self.generation = int(self._meta("generation") or 0)
        self._touch: list[tuple[int, str]] = []

    # ------------------------------------------------------------------ meta
    def _meta(self, key: str) -> str | None:
        row = self.con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, **values: str) -> None:
        self.con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))

    def commit(self) -> None:
        """Flush pending generation updates and commit (the unit of durability)."""
        self._flush_touch()
        self.con.execute("COMMIT")
        self.con.execute("BEGIN")

    def close(self) -> None:
        """Empty the duplicate-id table (it would double the file), commit and close."""
        self.seen.clear()
        self.commit()
        self.con.execute("COMMIT")
        self.con.close()

    # ------------------------------------------------------------------ validity
    def ensure_valid(self, col: Collection, page: int) -> bool:
        """Rebuild the rows from the collection if they cannot be trusted; returns True if it rebuilt.

        Trusted: built for this collection id (checked on open) and marked valid, and the complete rows'
        chunks are not more than the collection holds (chunks deleted behind the ledger's back, or a crash
        between deleting stale chunks and their rows, make it rebuild).

        Raises:
            pipeline.errors.StoreError: the collection cannot be read.
        """
        from pipeline.store.client import store_errors

        with store_errors(f"count collection {col.name!r}"):
            count = col.count()
        claimed = self.con.execute("SELECT COALESCE(SUM(n_chunks), 0) FROM docs WHERE doc_hash != ''").fetchone()[0]
        if self._meta("valid") == "1" and claimed <= count:
            return False
        if count == 0 and claimed == 0:
            self._set_meta(valid="1")
            self.commit()
            return False
        self.rebuild(col, page)
        return True

    def rebuild(self, col: Collection, page: int) -> None:
        """Replace the rows by what the collection's chunk metadata says (paged ``get``, staged in SQLite).

        A document is complete (its hash kept) when all its chunks agree on hash, chunking, source and
        ``n_chunks`` and it has exactly ``n_chunks`` of them; otherwise its hash is ``''`` (rewritten if still
        in SOURCE, removed otherwise).

        Raises:
            pipeline.errors.StoreError: the collection cannot be read.
        """
        from pipeline.store.client import store_errors

        t0 = time.perf_counter()
        con = self.con
        con.execute("DELETE FROM docs")
        con.execute("DROP TABLE IF EXISTS staging")
        con.execute("CREATE TABLE staging (doc_id TEXT, chunk_index INTEGER, doc_hash TEXT, chunking TEXT, "
                    "source TEXT, n INTEGER)")
        offset = n_chunks = 0
        with store_errors(f"read collection {col.name!r}"):
            while True:
                res = col.get(include=["metadatas"], limit=page, offset=offset)
                ids = res["ids"]
                rows = []
                for cid, meta in zip(ids, res["metadatas"] or [None] * len(ids), strict=True):
                    meta = meta or {}
                    base, _, idx = cid.rpartition("#")
                    ci = meta.get("chunk_index")
                    if not isinstance(ci, int):
                        ci = int(idx) if idx.isdigit() else 0
                    n = meta.get("n_chunks")
                    rows.append((str(meta.get("doc_id", base or cid)), ci, str(meta.get("doc_hash", "")),
                                 str(meta.get("chunking", "")), str(meta.get("source", "")),
                                 n if isinstance(n, int) else -1))
                con.executemany("INSERT INTO staging VALUES (?, ?, ?, ?, ?, ?)", rows)
                n_chunks += len(ids)
                if len(ids) < page:
                    break
                offset += len(ids)
        con.execute(
            "INSERT INTO docs SELECT doc_id, "
            "CASE WHEN COUNT(DISTINCT doc_hash) = 1 AND COUNT(DISTINCT chunking) = 1 AND COUNT(DISTINCT source) = 1 "
            "AND COUNT(DISTINCT n) = 1 AND MIN(n) = COUNT(*) AND COUNT(DISTINCT chunk_index) = COUNT(*) "
            "AND MIN(chunk_index) = 0 AND MAX(chunk_index) = COUNT(*) - 1 THEN MIN(doc_hash) ELSE '' END, "
            "MIN(chunking), MIN(source), COUNT(*), MAX(MAX(chunk_index) + 1, MAX(n)), ? FROM staging GROUP BY doc_id",
            (self.generation,),
        )
        con.execute("DROP TABLE staging")
        self._set_meta(valid="1")
        self.commit()
        self.rebuilt = True
        n_docs = con.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
        log.warning("ingest ledger %s rebuilt from the collection: %d chunks of %d documents in %.1f s",
                    self.path, n_chunks, n_docs, time.perf_counter() - t0)

    # ------------------------------------------------------------------ one ingest
    def begin(self) -> int:
        """Start a new ingest: a new generation number, an empty duplicate-id table. Returns the generation."""
        self.generation += 1
        self._set_meta(generation=str(self.generation))
        self.seen.clear()
        self.commit()
        return self.generation

    def get(self, doc_id: str) -> LedgerRow | None:
        """The stored row of ``doc_id``, or None."""
        row = self.con.execute("SELECT * FROM docs WHERE doc_id = ?", (doc_id,)).fetchone()
        return LedgerRow(*row) if row else None

    def touch(self, doc_id: str) -> None:
        """Mark an unchanged document as seen by this ingest (buffered; written by :meth:`commit`)."""
        self._touch.append((self.generation, doc_id))
        if len(self._touch) >= TOUCH_BATCH:
            self._flush_touch()

    def _flush_touch(self) -> None:
        if self._touch:
            self.con.executemany("UPDATE docs SET seen_generation = ? WHERE doc_id = ?", self._touch)
            self._touch.clear()

    def intend(self, docs: Iterable[tuple[str, int]]) -> None:
        """Before a write batch: ``(doc_id, chunks about to be written)``; committed at once. The rows lose their
        hash until :meth:`finish`: a document half-overwritten by a killed ingest is never taken as unchanged."""
        self.con.executemany(
            "INSERT INTO docs VALUES (?1, '', '', '', 0, ?2, ?3) ON CONFLICT(doc_id) DO UPDATE SET "
            "doc_hash = '', max_chunks = MAX(max_chunks, ?2), seen_generation = ?3",
            [(d, n, self.generation) for d, n in docs],
        )
        self.commit()

    def finish(self, rows: Iterable[tuple[str, str, str, str, int]]) -> None:
        """After a write batch (every chunk upserted, chunks beyond the new count deleted):
        ``(doc_id, doc_hash, chunking, source, n_chunks)``; committed at once."""
        self.con.executemany(
            "UPDATE docs SET doc_hash = ?2, chunking = ?3, source = ?4, n_chunks = ?5, max_chunks = ?5, "
            "seen_generation = ?6 WHERE doc_id = ?1",
            [(*r, self.generation) for r in rows],
        )
        self.commit()

    def stale(self, page: int) -> Iterator[list[LedgerRow]]:
        """Pages of rows not seen by this ingest (keyset pagination by doc_id; rows deleted meanwhile by the
        caller with :meth:`delete` do not disturb it)."""
        last = ""
        while True:
            rows = self.con.execute(
                "SELECT * FROM docs WHERE seen_generation < ? AND doc_id > ? ORDER BY doc_id LIMIT ?",
                (self.generation, last, page),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [LedgerRow(*r) for r in rows]

    def delete(self, doc_ids: list[str]) -> None:
        """Forget documents whose chunks were deleted; committed at once."""
        self.con.executemany("DELETE FROM docs WHERE doc_id = ?", [(d,) for d in doc_ids])
        self.commit()

    def totals(self) -> dict[str, Any]:
        """Documents and complete chunks recorded (for logs and tests)."""
        docs, chunks = self.con.execute(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN doc_hash != '' THEN n_chunks END), 0) FROM docs").fetchone()
        return {"documents": docs, "chunks": chunks}


__all__ = ["IngestLedger", "LedgerRow", "chunk_ids", "ledger_path"]
