"""ChromaDB access: clients, collections (cosine space, no embedding function), reset, error wrapping.

We always pass our own embeddings (all-MiniLM-L6-v2, :mod:`pipeline.retrieval.embedding`), so collections are created
and fetched with ``embedding_function=None``: chromadb never instantiates or downloads its default ONNX model
and nothing model-specific is recorded in the collection.

Facts measured with chromadb 1.x: PersistentClient is not multi-process safe (one writer; readers open their client after
the writer is done); a deleted and recreated collection makes old handles raise
``NotFoundError: Collection [uuid] does not exist.``, fixed by ``get_or_create_collection(name)``.
Several nodes read node-local copies of a store (:mod:`pipeline.store.staging`); a user's own Chroma server
(behind an authenticating proxy: Chroma 1.x has no authentication of its own) is reached through
``store.chroma_url`` with the token of ``store.token_env`` (:func:`pipeline.store.auth.token_headers`), its https
certificate verified against ``store.ca_file`` (:func:`pipeline.store.auth.ca_file`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pipeline.errors import StoreError

if TYPE_CHECKING:  # pragma: no cover
    from chromadb.api import ClientAPI
    from chromadb.api.models.Collection import Collection

    from pipeline.config import StoreConfig

log = logging.getLogger(__name__)

LOCK_FILE = ".rag-pipeline-ingest.lock"
"""The flock file of a local store's one writer (:func:`writer_lock`)."""

COLLECTION_CONFIGURATION: dict[str, Any] = {"hnsw": {"space": "cosine"}}
"""Chroma collection configuration: cosine distance (score = 1 - distance = cosine similarity)."""


def is_not_found(exc: BaseException) -> bool:
    """True for chromadb's "collection does not exist" errors (NotFoundError, or its message)."""
    from chromadb.errors import NotFoundError

    return isinstance(exc, NotFoundError) or "does not exist" in str(exc)


@contextlib.contextmanager
def store_errors(what: str) -> Iterator[None]:
    """Turn chromadb errors raised inside the block into :class:`pipeline.errors.StoreError`.

    Args:
        what: the operation and target for the message, e.g. ``"query collection 'x' in data/store"``.

    Raises:
        pipeline.errors.StoreError: ``cannot <what>: <chromadb message>``; the chromadb exception is the cause.
    """
    from chromadb.errors import ChromaError

    try:
        yield
    except StoreError:
        raise
    except (ChromaError, ValueError, OSError, RuntimeError) as exc:
        raise StoreError(f"cannot {what}: {type(exc).__name__}: {exc}") from exc


def describe(store_cfg: StoreConfig) -> str:
    """Human-readable location of the store (URL or path) for messages."""
    return store_cfg.chroma_url or str(store_cfg.path)


def open_client(store_cfg: StoreConfig, *, create: bool = True) -> ClientAPI:
    """Open a Chroma client: ``HttpClient`` when ``store_cfg.chroma_url`` is set, else ``PersistentClient(path)``.

    Args:
        store_cfg: where the store lives.
        create: for a local path, create the directory if missing; ``False`` makes a missing store an error.

    Raises:
        pipeline.errors.StoreError: a missing store directory (``create=False``), an invalid URL, or the
            client cannot be opened / the server cannot be reached, a TLS certificate not accepted included
            (:func:`pipeline.store.auth.tls_problem`; the message never holds the token).
        pipeline.errors.ConfigError: see :func:`pipeline.store.auth.token_headers` and
            :func:`pipeline.store.auth.ca_file`.
    """
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if store_cfg.chroma_url:
        url = urlparse(store_cfg.chroma_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise StoreError(f"invalid chroma_url {store_cfg.chroma_url!r} (expected https://host:port)")
        port = url.port or (443 if url.scheme == "https" else 8000)
        from pipeline.store.auth import ca_file, redact, tls_problem, token_headers

        headers = token_headers(store_cfg)
        ca = ca_file(store_cfg)
        if ca:  # chromadb hands it to its httpx client as ``verify``
            settings = Settings(anonymized_telemetry=False, chroma_server_ssl_verify=ca)
        with store_errors(f"connect to Chroma server {store_cfg.chroma_url}"):
            try:
                return chromadb.HttpClient(
                    host=url.hostname, port=port, ssl=url.scheme == "https", headers=headers, settings=settings
                )
            except Exception as exc:  # noqa: BLE001 - httpx/requests connection errors of many types
                reason = tls_problem(exc, store_cfg) or redact(str(exc), headers)
                raise StoreError(f"cannot connect to Chroma server {store_cfg.chroma_url}: {reason}") from None
    if not str(store_cfg.path).strip():
        from pipeline.store.preflight import STORE_MISSING

        raise StoreError(STORE_MISSING)  # never a store in the current directory by default
    path = Path(store_cfg.path)
    if not create and not path.is_dir():
        raise StoreError(f"{path}: vector store not found (run `rag-pipeline ingest` first)")
    with store_errors(f"open vector store {path}"):
        path.mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=str(path), settings=settings)


def collection_exists(client: ClientAPI, name: str) -> bool:
    """True if ``name`` is a collection of ``client``."""
    with store_errors(f"list collections of {client}"):
        return name in {c if isinstance(c, str) else c.name for c in client.list_collections()}


def get_collection(client: ClientAPI, name: str, *, create: bool = True) -> Collection:
    """Get (or create, cosine space, no embedding function) collection ``name``.

    Raises:
        pipeline.errors.StoreError: ``create=False`` and the collection does not exist; an invalid name
            (Chroma: 3-512 characters of ``[a-zA-Z0-9._-]``); any other chromadb error.
    """
    with store_errors(f"open collection {name!r}"):
        if create:
            return client.get_or_create_collection(
                name, configuration=COLLECTION_CONFIGURATION, embedding_function=None
            )
        try:
            return client.get_collection(name, embedding_function=None)
        except Exception as exc:
            if is_not_found(exc):
                raise StoreError(f"collection {name!r} not found (run `rag-pipeline ingest` first)") from exc
            raise


def reset_collection(client: ClientAPI, name: str) -> Collection:
    """Delete collection ``name`` if it exists and create it empty (cosine, no embedding function).

    Other processes holding a handle to the old collection get ``NotFoundError`` on their next call
    (:class:`pipeline.retrieval.retriever.Retriever` rebinds by name and retries).

    Raises:
        pipeline.errors.StoreError: a chromadb error.
    """
    with store_errors(f"reset collection {name!r}"):
        try:
            client.delete_collection(name)
            log.info("deleted collection %r", name)
        except Exception as exc:
            if not is_not_found(exc):
                raise
    return get_collection(client, name, create=True)


def open_collection(store_cfg: StoreConfig, name: str | None = None, *, create: bool = True) -> Collection:
    """Client + collection in one call (``name`` defaults to ``store_cfg.collection``).

    Raises:
        pipeline.errors.StoreError: no store or collection named (:func:`pipeline.store.preflight.
            require_store_named`); see :func:`open_client` and :func:`get_collection`.
    """
    from pipeline.store.preflight import require_store_named

    if name is None:
        require_store_named(store_cfg)
    client = open_client(store_cfg, create=create)
    return get_collection(client, name or store_cfg.collection, create=create)


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
                f"{path}: another ingest is writing to this store, or a run is copying it to a node "
                "(one writer only: a local Chroma store is not multi-process safe)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def reader_lock(store_cfg: StoreConfig) -> Iterator[None]:
    """Hold the store's writer lock (:func:`writer_lock`'s file) in shared mode: no ingest writes while held,
    and any number of readers (runs copying the store to their node) hold it together.

    A store whose directory is read-only and has no lock file yet is read without the lock (no ingest of this
    tool can write to it either).

    Raises:
        pipeline.errors.StoreError: an ingest is writing to the store now.
    """
    path = Path(store_cfg.path)
    lock = path / LOCK_FILE
    try:
        fh = open(lock, "a+")  # noqa: SIM115 - closed below
    except OSError:
        try:
            fh = open(lock)  # noqa: SIM115 - a read-only store: flock works on a read-only descriptor
        except OSError:
            log.debug("%s: no lock file and not writable: read without the lock", path)
            yield
            return
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{path}: an ingest is writing to this store now; run again once it has finished "
                             "(a copy taken meanwhile could miss part of it)") from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
