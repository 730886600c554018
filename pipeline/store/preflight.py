"""Checks of the vector store made by the main process before any server starts (exit 4 instead of a failure
minutes later, after SGLang loaded, when rank0 opens the store).

The main process never imports chromadb (it is heavy and, with a PersistentClient, not multi-process
safe). So the checks are light:

* local store (``store.path``): the directory exists and its ``chroma.sqlite3`` lists the collection (read
  through :mod:`pipeline.store.chroma_files`; when the file's layout is not the expected one, e.g. a future Chroma
  version, the check is skipped and rank0's own check applies);
* Chroma server (``store.chroma_url``): ``store.ca_file`` (when set) is a PEM CA bundle, ``GET /api/v2/heartbeat``
  answers (its https certificate verified against that bundle), and the collection is found with
  ``GET /api/v2/tenants/default_tenant/databases/default_database/collections/NAME`` (404 = missing).

When rank0 will ingest (``run.ingest``) the collection may be absent: only the ingest source (it must exist) and
a server's answer to the heartbeat are checked.

Before any of that, :func:`require_store_named` refuses a store or collection nobody named: the bundled defaults
name none, so every command that reads or writes the store retrieves only from what the user chose.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import Config, StoreConfig
from pipeline.errors import InputError, StoreError
from pipeline.store import chroma_files

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 10.0


STORE_MISSING = ("no vector store named: pass --store DIR (a local Chroma store) or --chroma-url URL, "
                 "or set [store] path in your --config")
INGEST_HINT = "; to build it from a corpus first, add --ingest SOURCE"
"""Appended by `run` to :data:`STORE_MISSING` (rank0 ingests into a store that does not exist yet)."""
COLLECTION_MISSING = "no collection named: pass --collection NAME, or set [store] collection in your --config"


def missing_store_names(store_cfg: StoreConfig) -> list[str]:
    """What the store configuration leaves unnamed, as messages (:data:`STORE_MISSING`,
    :data:`COLLECTION_MISSING`); empty when a store (``path`` or ``chroma_url``) and a collection are named."""
    out = []
    if not store_cfg.chroma_url and not str(store_cfg.path).strip():
        out.append(STORE_MISSING)
    if not store_cfg.collection.strip():
        out.append(COLLECTION_MISSING)
    return out


def require_store_named(store_cfg: StoreConfig, hint: str = "") -> None:
    """Refuse a store or collection that nobody named (one line; the first missing piece, then the others).

    Args:
        store_cfg: the store section of the configuration.
        hint: appended to the message when no store is named, e.g. how to build one first.

    Raises:
        StoreError: no ``path``/``chroma_url``, or no ``collection``.
    """
    missing = missing_store_names(store_cfg)
    if missing:
        text = missing[0] + (hint if missing[0] == STORE_MISSING else "")
        rest = [m.split(":", 1)[0] for m in missing[1:]]
        raise StoreError(text + (f" (also: {'; '.join(rest)})" if rest else ""))


def check_store(cfg: Config) -> None:
    """Check the store and collections the run reads (see the module docstring).

    Raises:
        ConfigError: ``store.token_env`` or ``store.ca_file`` is unusable (:mod:`pipeline.store.auth`).
        InputError: ``run.ingest`` names a source that does not exist.
        StoreError: no store or collection named, the store directory or server is missing/unreachable, or a
            collection does not exist.
    """
    require_store_named(cfg.store, INGEST_HINT)
    from pipeline.store.auth import ca_file, token_headers

    headers = token_headers(cfg.store) if cfg.store.chroma_url else {}
    verify = ca_file(cfg.store) or True
    if cfg.run.ingest:
        if not Path(cfg.run.ingest).exists():
            raise InputError(f"{cfg.run.ingest}: ingest source not found (--ingest)")
        if cfg.store.chroma_url:  # the server must answer (certificate, token); the collection may not exist yet
            _check_server(cfg.store, [], headers, verify)
        return
    names = [cfg.store.collection, *cfg.retrieval.collections]
    if cfg.store.chroma_url:
        _check_server(cfg.store, names, headers, verify)
    else:
        _check_local(Path(cfg.store.path), names)


def _check_local(path: Path, names: list[str]) -> None:
    if not path.is_dir():
        raise StoreError(f"{path}: vector store not found (run `rag-pipeline ingest SOURCE --store {path}` first)")
    if not chroma_files.has_sqlite_file(path):
        raise StoreError(f"{path}: not a Chroma store (no {chroma_files.SQLITE_FILE}); run `rag-pipeline ingest` first")
    found = chroma_files.collection_names(path)
    if found is None:
        log.debug("store check skipped (%s: layout not readable); rank0 checks the store", path)
        return
    _require(names, found, str(path))


def _check_server(store_cfg: StoreConfig, names: list[str], headers: dict[str, str], verify: str | bool) -> None:
    import requests

    url = store_cfg.chroma_url.rstrip("/")
    try:
        beat = requests.get(f"{url}/api/v2/heartbeat", headers=headers, timeout=HTTP_TIMEOUT_S, verify=verify)
        if beat.status_code in (401, 403):
            raise StoreError(f"Chroma server {url}: HTTP {beat.status_code}: token missing or rejected "
                             "(store.token_env, store.token_header)")
        beat.raise_for_status()
    except requests.RequestException as exc:
        raise StoreError(_unreachable(store_cfg, exc)) from None
    missing = []
    for name in names:
        try:
            r = requests.get(f"{url}/api/v2/tenants/default_tenant/databases/default_database/collections/{name}",
                             headers=headers, timeout=HTTP_TIMEOUT_S, verify=verify)
        except requests.RequestException as exc:
            raise StoreError(_unreachable(store_cfg, exc)) from None
        if r.status_code in (401, 403):
            raise StoreError(f"Chroma server {url}: HTTP {r.status_code} for collection {name!r}: token missing or "
                             "rejected (store.token_env, store.token_header)")
        text = r.text.lower() if r.status_code >= 400 else ""
        if r.status_code == 404 or "does not exist" in text or "not found" in text:
            missing.append(name)
    if missing:
        raise StoreError(f"collection {missing[0]!r} not found in {url}; ingest it first "
                         f"(rag-pipeline ingest SOURCE --chroma-url {url} --collection {missing[0]})")


def _unreachable(store_cfg: StoreConfig, exc: Exception) -> str:
    """The message for a request that got no answer: a TLS failure named as such
    (:func:`pipeline.store.auth.tls_problem`), else requests' message, which names the URL and the cause, never
    the request's headers (the token)."""
    from pipeline.store.auth import tls_problem

    url = store_cfg.chroma_url.rstrip("/")
    problem = tls_problem(exc, store_cfg)
    return f"Chroma server {url}: {problem}" if problem else f"Chroma server {url} does not answer: {exc}"


def _require(names: list[str], found: set[str], where: str) -> None:
    for name in names:
        if name not in found:
            known = ", ".join(sorted(found)) or "none"
            raise StoreError(f"collection {name!r} not found in {where} (collections: {known}); ingest it first "
                             f"(rag-pipeline ingest SOURCE --store {where} --collection {name})")
