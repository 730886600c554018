"""Read-only look into a local Chroma store's files, for the main process (which never imports chromadb).

The main process checks a store before any server starts (:mod:`pipeline.store.preflight`) and sizes it for the
``store.shared`` decision (:mod:`pipeline.store.mode`) without chromadb: chromadb is heavy, and a
``PersistentClient`` is not safe to open from several processes. Both read Chroma's own SQLite file instead,
only through this module, which is therefore the one place that knows Chroma's internal layout:

* ``<store>/chroma.sqlite3`` (:data:`SQLITE_FILE`), with the tables
* ``collections`` (``id``, ``name``): one row per collection;
* ``segments`` (``id``, ``collection``, ``scope``): a collection's segments; the ``METADATA`` one holds its rows;
* ``embeddings`` (``id``, ``segment_id``): one row per stored chunk of a segment.

Every query runs on a read-only connection (``mode=ro``; nothing is created or locked for writing). Layout
mismatch fallback: when the file is not an SQLite database or lacks these tables or columns (another Chroma
version), every reader returns None instead of raising; the callers then leave the decision to the process that
opens the store with chromadb (rank0).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE_FILE = "chroma.sqlite3"
"""Chroma's SQLite database, at the top of the store directory (``store.path``)."""

TIMEOUT_S = 10.0
"""Seconds a query waits for a lock held by a writer (an ingest) before it gives up (then: the fallback)."""

_COLLECTION_NAMES = "SELECT name FROM collections"
_COLLECTION_CHUNKS = (
    "SELECT COUNT(e.id) FROM collections c JOIN segments s ON s.collection = c.id "
    "JOIN embeddings e ON e.segment_id = s.id WHERE c.name = ? AND s.scope = 'METADATA'"
)


def sqlite_file(store_path: str | Path) -> Path:
    """The path of the store's SQLite database (it may not exist)."""
    return Path(store_path) / SQLITE_FILE


def has_sqlite_file(store_path: str | Path) -> bool:
    """Whether ``store_path`` holds Chroma's SQLite database (a regular file named :data:`SQLITE_FILE`)."""
    return sqlite_file(store_path).is_file()


def _read(store_path: str | Path, query: Callable[[sqlite3.Connection], T]) -> T | None:
    """``query(con)`` on a read-only connection to the store's database; None when there is no database or it
    cannot be read with the expected layout (the fallback: any ``sqlite3.Error``, logged at debug level)."""
    db = sqlite_file(store_path)
    if not db.is_file():
        return None
    try:
        # a file: URI (percent-encoded, so '?', '#' or '%' in the path stay part of the path) opened read-only
        con = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True, timeout=TIMEOUT_S)
        try:
            return query(con)
        finally:
            con.close()
    except sqlite3.Error as exc:
        log.debug("%s: not readable with the expected Chroma layout (%s)", db, exc)
        return None


def collection_names(store_path: str | Path) -> set[str] | None:
    """Names of the collections in the local store at ``store_path``.

    Returns:
        The set of names (empty for a store without collections), or None when the store has no
        :data:`SQLITE_FILE` or its layout is not the expected one (see the module docstring). Never raises for
        a missing or unreadable store.
    """
    return _read(store_path, lambda con: {str(row[0]) for row in con.execute(_COLLECTION_NAMES)})


def count_chunks(store_path: str | Path, collections: list[str]) -> int | None:
    """Chunks stored in ``collections`` of the local store at ``store_path``, together.

    Counted as the rows of each collection's metadata segment; a collection that does not exist counts 0.

    Returns:
        The number of chunks, or None when the store has no :data:`SQLITE_FILE` or its layout is not the expected
        one (see the module docstring). Never raises for a missing or unreadable store.
    """

    def count(con: sqlite3.Connection) -> int:
        return sum(int(con.execute(_COLLECTION_CHUNKS, (name,)).fetchone()[0] or 0) for name in collections)

    return _read(store_path, count)


_CHUNKS_PER_COLLECTION = (
    "SELECT c.name, COUNT(e.id) FROM collections c LEFT JOIN segments s ON s.collection = c.id "
    "AND s.scope = 'METADATA' LEFT JOIN embeddings e ON e.segment_id = s.id GROUP BY c.name ORDER BY c.name"
)
_WRITE_STATE = (
    ("collections", "SELECT id, name FROM collections ORDER BY id"),
    ("collection_metadata", "SELECT collection_id, key, str_value, int_value, float_value, bool_value "
                            "FROM collection_metadata ORDER BY collection_id, key"),
    ("max_seq_id", "SELECT segment_id, seq_id FROM max_seq_id ORDER BY segment_id"),
    ("embeddings_queue", "SELECT MAX(seq_id) FROM embeddings_queue"),
)


def chunks_per_collection(store_path: str | Path) -> dict[str, int] | None:
    """``{collection name: chunks}`` of every collection of the local store at ``store_path``.

    Returns:
        The counts (a collection without chunks counts 0), or None when the store has no :data:`SQLITE_FILE` or
        its layout is not the expected one. Never raises for a missing or unreadable store.
    """
    return _read(store_path, lambda con: {str(n): int(c or 0) for n, c in con.execute(_CHUNKS_PER_COLLECTION)})


def write_state(store_path: str | Path) -> str | None:
    """A digest (sha256 hex) of what every write to the store changes: the collections and their metadata, the
    last operation applied to each segment (``max_seq_id``) and the last one logged (``embeddings_queue``).

    Reading the store (a client that opens it and queries) leaves it unchanged, while the database file's
    modification time does change then; so this, not the file's time, tells two versions of a store apart.

    Returns:
        64 hex characters, or None when the store has no :data:`SQLITE_FILE` or its layout is not the expected
        one. Never raises for a missing or unreadable store.
    """
    import hashlib

    def digest(con: sqlite3.Connection) -> str:
        h = hashlib.sha256()
        for name, query in _WRITE_STATE:
            h.update(name.encode())
            for row in con.execute(query):
                h.update(repr(tuple(row)).encode())
        return h.hexdigest()

    return _read(store_path, digest)


__all__ = ["SQLITE_FILE", "chunks_per_collection", "collection_names", "count_chunks", "has_sqlite_file",
           "sqlite_file", "write_state"]
