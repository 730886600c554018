"""Node-local copies of a store: a multi-node run reads the store from each node's own disk, with no server.

With ``store.local_dir`` set (``submit`` sets it for its array tasks), ``run`` copies the store from the shared
filesystem (``store.path``: the Chroma directory with its BM25 indexes, and ``store.bm25_path`` when it lies
elsewhere) to that node-local directory before any worker opens it, and its RAG workers read the copy exactly as
they read a local store (one loopback Chroma server per node past the measured size: :mod:`pipeline.store.mode`).
Nothing listens on the network for the store.

Layout under ``local_dir`` (default :func:`default_local_dir`, one per user and node, shared by every task of
that user on the node)::

    <store key>/                 one folder per source store: its directory name + sha256 of its absolute path
        .stage.lock              filelock: one task of the node stages (or checks) this store at a time
        <version>/               the verified copy
        <version>.json           what the copy holds (file sizes, chunks per collection), written once verified
        <version>.use            flock(LOCK_SH) held by every run reading the copy; its mtime = last use
        <version>.partial-<pid>/ a copy being made (left behind only by a stager that died: removed)

Rules (:func:`stage_store`):

* **Version.** A digest of every copied file's relative path and size, with for Chroma's own files the digest of
  the store's write state (:func:`pipeline.store.chroma_files.write_state`) and for the BM25 files their
  modification time. Not Chroma's file times: a client that merely reads a store rewrites its SQLite file and, for
  a small collection, its HNSW files (measured with chromadb 1.5: same sizes, new times). A new ingest makes a new
  version; reading does not. (A store whose SQLite layout is not readable falls back to every file's time.)
* **Once per node and version.** Under the store's ``.stage.lock``, the first task copies and the others wait,
  then find the copy and check it: concurrent tasks on a node share one copy.
* **Taken under the store's lock.** The version is read, and the copy made, while holding the source store's
  ingest lock in shared mode (:func:`pipeline.store.client.reader_lock`): no ingest writes meanwhile (an ingest
  running now is an error, one line, exit 4), and an ingest started meanwhile is refused.
* **Checked before use.** Every file of the copy has the size of its source, and the copy's SQLite file lists the
  same collections with the same chunk counts as the source (:func:`compare_files`); a copy that fails the check
  is deleted and made again, unless another run is reading it (its ``.use`` lock is held): then it is checked
  again a few times, and never deleted under that run (one line, exit 4, if it still fails).
* **Free space first.** Before copying, the local disk must have the copy's size plus :data:`SPACE_RESERVE_BYTES`
  (or :data:`SPACE_RESERVE_FRACTION` of the copy, the larger) free, after the stale copies are removed: else one
  line naming the directory, the bytes needed and free, and ``store.local_dir`` (exit 4).
* **Stale copies.** When a task stages, other versions of the same store whose ``.use`` lock nobody holds and that
  nobody used for ``store.local_keep_h`` hours are deleted (:func:`select_stale`); so are ``.partial-*`` folders
  (a stager holds ``.stage.lock`` while copying: one found under it belongs to a stager that died). Copies of
  other stores are left alone. ``rm -rf <local_dir>`` between jobs is always safe when no run uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import getpass
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import StoreError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import StoreConfig

log = logging.getLogger(__name__)

SPACE_RESERVE_BYTES = 1 << 30
"""Bytes left free on the local disk beyond the copy (1 GiB): room for the run's own temporary files."""
SPACE_RESERVE_FRACTION = 0.05
"""Fraction of the copy's size left free beyond it when that is more than :data:`SPACE_RESERVE_BYTES`."""
STAGE_LOCK_TIMEOUT_S = 6 * 3600.0
"""Longest wait for another task of the node that is copying the same store (seconds)."""
EXTERNAL_BM25 = "_bm25"
"""Folder of the copy holding ``store.bm25_path`` when that lies outside the store directory."""
_SKIPPED_TOP = frozenset({".rag-pipeline-ingest.lock", "ingest"})
"""Top-level entries of a store not copied: the ingest lock and the ingest ledgers (a staged run never ingests)."""


def default_local_dir() -> str:
    """``/tmp/rag-pipeline-stores-<user>``: node-wide (not the job's ``$SLURM_TMPDIR``) so that the tasks of one
    node share a copy, and per user so that users do not share (or delete) each other's copies."""
    return f"/tmp/rag-pipeline-stores-{getpass.getuser()}"


# --- the pure rules ------------------------------------------------------------------------------
def version_of(entries: Mapping[str, tuple[int, int | str]]) -> str:
    """The store version: sha256 (first 16 hex characters) of the sorted ``{relative path: (size, stamp)}``,
    ``stamp`` being the store's write-state digest for Chroma's files, a BM25 file's modification time in ns."""
    h = hashlib.sha256()
    for rel in sorted(entries):
        size, stamp = entries[rel]
        h.update(f"{rel}\0{size}\0{stamp}\n".encode())
    return h.hexdigest()[:16]


def compare_files(expected: Mapping[str, int], found: Mapping[str, int],
                  expected_chunks: Mapping[str, int] | None = None,
                  found_chunks: Mapping[str, int] | None = None) -> list[str]:
    """What differs between a copy and what it should hold; empty when the copy is good.

    Args:
        expected: ``{relative path: size in bytes}`` of the source.
        found: the same for the copy (files the source does not have are not counted against it).
        expected_chunks: ``{collection: chunks}`` of the source (None: not compared).
        found_chunks: the same read from the copy (None while ``expected_chunks`` is not: unreadable).

    Returns:
        One short line per difference, e.g. ``"chroma.sqlite3: 4096 bytes, expected 8192"``.
    """
    problems = []
    for rel in sorted(expected):
        if rel not in found:
            problems.append(f"{rel}: missing")
        elif found[rel] != expected[rel]:
            problems.append(f"{rel}: {found[rel]} bytes, expected {expected[rel]}")
    if expected_chunks is not None and dict(found_chunks or {}) != dict(expected_chunks):
        problems.append(f"chunks per collection {dict(found_chunks) if found_chunks is not None else 'unreadable'}, "
                        f"expected {dict(expected_chunks)}")
    return problems


def space_needed(copy_bytes: int) -> int:
    """Free bytes a copy of ``copy_bytes`` needs: itself plus the larger of :data:`SPACE_RESERVE_BYTES` and
    :data:`SPACE_RESERVE_FRACTION` of it."""
    return copy_bytes + max(SPACE_RESERVE_BYTES, int(copy_bytes * SPACE_RESERVE_FRACTION))


def space_problem(copy_bytes: int, free_bytes: int, where: str) -> str | None:
    """None when ``free_bytes`` suffice for a copy of ``copy_bytes`` (:func:`space_needed`), else the one-line
    error naming ``where``, both figures (MiB: needed rounded up, free rounded down) and the setting to change."""
    need = space_needed(copy_bytes)
    if free_bytes >= need:
        return None
    mib = 2**20
    return (f"{where}: not enough free space to stage the store: need {-(-need // mib)} MiB (the copy "
            f"{-(-copy_bytes // mib)} MiB + reserve), {free_bytes // mib} MiB free; set store.local_dir "
            "(submit --store-local-dir) to a larger node-local disk, or free space there")


@dataclass(frozen=True)
class CopyEntry:
    """A staged version of one store, as the stale-copy rule sees it.

    Attributes:
        version: its version (folder name).
        last_used_s: when a run last used it (Unix time, seconds: the ``.use`` file's mtime).
        in_use: a run holds its ``.use`` lock now.
    """

    version: str
    last_used_s: float
    in_use: bool


def select_stale(entries: list[CopyEntry], current: str, now_s: float, max_idle_s: float) -> list[str]:
    """Versions to delete: not ``current``, not in use, and unused for at least ``max_idle_s`` seconds.

    Args:
        entries: the store's staged versions.
        current: the version being staged now (never selected).
        now_s: current Unix time, seconds.
        max_idle_s: ``store.local_keep_h`` in seconds.

    Returns:
        The selected versions, sorted.
    """
    return sorted(e.version for e in entries
                  if e.version != current and not e.in_use and now_s - e.last_used_s >= max_idle_s)


# --- the files ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceStore:
    """What a copy of the store is made of, read under the store's lock.

    Attributes:
        path: the store directory (absolute).
        bm25_dir: ``store.bm25_path`` when it lies outside the store directory (copied to ``_bm25``), else None.
        files: ``{relative path in the copy: size in bytes}``.
        version: :func:`version_of` the files.
        chunks: ``{collection: chunks}`` (None: the SQLite layout is not readable).
    """

    path: Path
    bm25_dir: Path | None
    files: dict[str, int]
    version: str
    chunks: dict[str, int] | None

    @property
    def bytes(self) -> int:
        """Size of the copy."""
        return sum(self.files.values())


def _walk(root: Path, prefix: str = "", skip_top: frozenset[str] = frozenset()) -> Iterator[tuple[str, os.stat_result]]:
    """``(relative path, stat)`` of every regular file under ``root`` (symbolic links followed)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in skip_top]
            filenames = [f for f in filenames if f not in skip_top]
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            st = p.stat()
            yield prefix + str((rel_dir / name).as_posix()), st


def sizes(copy_dir: Path) -> dict[str, int]:
    """``{relative path: size}`` of every file of a copy."""
    return {rel: st.st_size for rel, st in _walk(copy_dir)}


def read_source(store_cfg: StoreConfig) -> SourceStore:
    """Scan the store the copy is made from (call it under :func:`pipeline.store.client.reader_lock`).

    Raises:
        StoreError: the store directory does not exist or cannot be read.
    """
    from pipeline.store import chroma_files

    path = Path(store_cfg.path).resolve()
    if not path.is_dir():
        raise StoreError(f"{path}: vector store not found (run `rag-pipeline ingest` first)")
    bm25 = Path(store_cfg.bm25_path).resolve() if store_cfg.bm25_path else None
    if bm25 is not None and (bm25 == path or path in bm25.parents or not bm25.is_dir()):
        bm25 = None  # inside the store (copied with it), or absent (the workers build it)
    state = chroma_files.write_state(path)
    entries: dict[str, tuple[int, int | str]] = {}
    try:
        for rel, st in _walk(path, skip_top=_SKIPPED_TOP):
            chroma_file = state is not None and not rel.startswith("bm25/")
            entries[rel] = (st.st_size, state if chroma_file else st.st_mtime_ns)
        if bm25 is not None:
            for rel, st in _walk(bm25, prefix=EXTERNAL_BM25 + "/"):
                entries[rel] = (st.st_size, st.st_mtime_ns)
    except OSError as exc:
        raise StoreError(f"{path}: cannot read the store to stage it: {exc}") from None
    return SourceStore(path, bm25, {k: v[0] for k, v in entries.items()}, version_of(entries),
                       chroma_files.chunks_per_collection(path))


def store_key(path: Path) -> str:
    """Folder name of a source store under ``local_dir``: its name and 12 hex of sha256 of its absolute path."""
    return f"{path.name or 'store'}-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


def check_copy(copy_dir: Path, source: SourceStore) -> list[str]:
    """:func:`compare_files` of ``copy_dir`` against ``source`` (sizes, then chunks per collection)."""
    from pipeline.store import chroma_files

    if not copy_dir.is_dir():
        return [f"{copy_dir}: missing"]
    found_chunks = chroma_files.chunks_per_collection(copy_dir) if source.chunks is not None else None
    return compare_files(source.files, sizes(copy_dir), source.chunks, found_chunks)


IN_USE_RECHECKS = 3
"""Checks of a copy another run is reading, :data:`IN_USE_RECHECK_S` apart, before giving up on it."""
IN_USE_RECHECK_S = 1.0


def _check_existing(key_dir: Path, copy_dir: Path, source: SourceStore) -> list[str]:
    """:func:`check_copy` of a copy found on the node. A copy that another run holds (its ``.use`` lock) is never
    deleted under it: it is checked again a few times (a Chroma client reading it rewrites its files), and if it
    still fails, staging stops with one line.

    Raises:
        StoreError: the copy fails its check while another run uses it.
    """
    problems = check_copy(copy_dir, source)
    use = key_dir / f"{source.version}.use"
    for _ in range(IN_USE_RECHECKS):
        if not problems or not (use.exists() and _in_use(use)):
            return problems
        time.sleep(IN_USE_RECHECK_S)
        problems = check_copy(copy_dir, source)
    if problems:
        raise StoreError(f"{copy_dir}: the staged copy fails its check ({'; '.join(problems)}) while another run "
                         "uses it; run again when that run has finished, or set another store.local_dir")
    return problems


def _copy(source: SourceStore, dest: Path) -> None:
    """Copy the store (and an outside BM25 folder) into ``dest`` (which must not exist), times preserved."""
    shutil.copytree(source.path, dest, copy_function=shutil.copy2, ignore=lambda d, names: [
        n for n in names if Path(d) == source.path and n in _SKIPPED_TOP])
    if source.bm25_dir is not None:
        shutil.copytree(source.bm25_dir, dest / EXTERNAL_BM25, copy_function=shutil.copy2)


def _in_use(use_file: Path) -> bool:
    """True when a run holds ``use_file``'s shared lock (an exclusive try fails)."""
    try:
        fh = open(use_file, "a+")  # noqa: SIM115 - closed below
    except OSError:
        return False
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        fh.close()  # closing drops the lock taken by the try
    return False


def _entries(key_dir: Path) -> list[CopyEntry]:
    out = []
    for meta in key_dir.glob("*.json"):
        version = meta.stem
        use = key_dir / f"{version}.use"
        try:
            last = (use if use.exists() else meta).stat().st_mtime
        except OSError:
            continue
        out.append(CopyEntry(version, last, _in_use(use) if use.exists() else False))
    return out


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clean(key_dir: Path, current: str, max_idle_s: float) -> list[str]:
    """Remove leftover partial copies and the stale versions of this store (under its ``.stage.lock``)."""
    for partial in key_dir.glob("*.partial-*"):
        log.info("removing %s (a copy left by a task that stopped while staging)", partial)
        _remove(partial)
    stale = select_stale(_entries(key_dir), current, time.time(), max_idle_s)
    for version in stale:
        log.info("removing stale staged copy %s (unused for %.1f h or more)", key_dir / version, max_idle_s / 3600)
        for p in (key_dir / f"{version}.json", key_dir / version, key_dir / f"{version}.use"):
            _remove(p)
    return stale


# --- staging --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StagedStore:
    """A node-local copy in use by this run (its ``.use`` lock held until :func:`stage_store` exits).

    Attributes:
        source: the shared store directory.
        path: the copy (``store.path`` of the workers).
        bm25_path: ``store.bm25_path`` of the workers ("" = the default ``<path>/bm25``).
        version: the store version copied.
        bytes: size of the copy.
        copied: this task made the copy (False: it found a good one).
        seconds: wall time of the staging step, waits for other tasks included.
        removed: stale versions this task removed.
    """

    source: str
    path: str
    bm25_path: str
    version: str
    bytes: int
    copied: bool
    seconds: float
    removed: tuple[str, ...] = ()

    def store_config(self, store_cfg: StoreConfig) -> StoreConfig:
        """``store_cfg`` pointing at the copy."""
        return dataclasses.replace(store_cfg, path=self.path, bm25_path=self.bm25_path)

    def as_dict(self) -> dict[str, Any]:
        """For the manifest."""
        return dataclasses.asdict(self)


@contextlib.contextmanager
def stage_store(store_cfg: StoreConfig, local_dir: str | Path, *, keep_h: float = 24.0,
                lock_timeout_s: float = STAGE_LOCK_TIMEOUT_S) -> Iterator[StagedStore]:
    """Stage ``store_cfg.path`` into ``local_dir`` (see the module docstring) and hold the copy while in the block.

    Args:
        store_cfg: the store to copy (a local path; ``bm25_path`` is copied too when outside it).
        local_dir: the node-local directory (created if missing).
        keep_h: ``store.local_keep_h``: idle hours after which other versions of this store are removed.
        lock_timeout_s: longest wait for another task of the node staging the same store, seconds.

    Yields:
        The :class:`StagedStore` in use.

    Raises:
        StoreError: the store is missing, an ingest is writing to it, the local directory cannot be created or
            written, there is not enough free space, the copy fails its check, or the wait for another stager
            timed out.
    """
    from filelock import FileLock, Timeout

    from pipeline.store.client import reader_lock

    t0 = time.monotonic()
    source_path = Path(store_cfg.path).resolve()
    key_dir = Path(local_dir).expanduser().absolute() / store_key(source_path)
    try:
        key_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"store.local_dir {local_dir}: cannot create {key_dir}: {exc.strerror or exc}") from None
    use_fh = None
    try:
        with FileLock(str(key_dir / ".stage.lock"), timeout=lock_timeout_s):
            with reader_lock(store_cfg):
                source = read_source(store_cfg)
                copy_dir = key_dir / source.version
                meta = key_dir / f"{source.version}.json"
                copied = False
                problems = _check_existing(key_dir, copy_dir, source) if meta.exists() else ["not staged yet"]
                if problems and meta.exists():
                    log.warning("staged copy %s fails its check (%s): staging it again", copy_dir, "; ".join(problems))
                    _remove(meta)
                if problems:
                    _remove(copy_dir)  # without its .json (a stager died between the two) it was never used
                removed = _clean(key_dir, source.version, keep_h * 3600.0)
                if problems:
                    free = shutil.disk_usage(key_dir).free
                    problem = space_problem(source.bytes, free, str(key_dir))
                    if problem:
                        raise StoreError(problem)
                    partial = key_dir / f"{source.version}.partial-{os.getpid()}"
                    log.info("staging store %s (%.1f MiB, version %s) to %s", source.path, source.bytes / 2**20,
                             source.version, copy_dir)
                    try:
                        _copy(source, partial)
                    except BaseException:
                        _remove(partial)  # a full disk or a signal mid-copy leaves nothing behind
                        raise
                    bad = check_copy(partial, source)
                    if bad:
                        _remove(partial)
                        raise StoreError(f"{partial}: the staged copy of {source.path} fails its check: {'; '.join(bad)}")
                    partial.rename(copy_dir)
                    meta.write_text(json.dumps({"source": str(source.path), "version": source.version,
                                                "bytes": source.bytes, "chunks": source.chunks,
                                                "files": source.files}, indent=1))
                    copied = True
                else:
                    log.info("store %s version %s already staged in %s: using it", source.path, source.version,
                             copy_dir)
            use_file = key_dir / f"{source.version}.use"
            use_fh = open(use_file, "a+")  # noqa: SIM115 - held for the whole run, closed below
            fcntl.flock(use_fh.fileno(), fcntl.LOCK_SH)
            os.utime(use_file)
    except Timeout:
        raise StoreError(f"{key_dir}: another task of this node has been staging the store for "
                         f"{lock_timeout_s:.0f} s (its lock: {key_dir / '.stage.lock'})") from None
    except OSError as exc:
        raise StoreError(f"cannot stage {source_path} into {key_dir}: {exc.strerror or exc}"
                         f"{' (' + str(exc.filename) + ')' if exc.filename else ''}") from None
    bm25 = ""
    if source.bm25_dir is not None:
        bm25 = str(copy_dir / EXTERNAL_BM25)
    elif store_cfg.bm25_path:
        bm25 = str(copy_dir / Path(store_cfg.bm25_path).resolve().relative_to(source_path)) \
            if source_path in Path(store_cfg.bm25_path).resolve().parents else store_cfg.bm25_path
    staged = StagedStore(str(source.path), str(copy_dir), bm25, source.version, source.bytes, copied,
                         round(time.monotonic() - t0, 3), tuple(removed))
    try:
        yield staged
    finally:
        with contextlib.suppress(OSError):
            os.utime(key_dir / f"{source.version}.use")  # last use = the end of this run
        use_fh.close()


__all__ = ["CopyEntry", "SourceStore", "StagedStore", "check_copy", "compare_files", "default_local_dir",
           "read_source", "select_stale", "space_needed", "space_problem", "stage_store", "store_key", "version_of"]
