"""Run output directory: atomic Parquet part commits, exactly-once bookkeeping, sharding helpers.

Layout of a run directory (``--output``, or ``--output/shard-I-of-N`` with ``--shard I/N``)::

    _run.json          input (absolute path), fingerprint {size, sha256}, shard, total_records, config, created
    part-00000.parquet committed rows (one row per record; the parts themselves are the ledger of done ids)
    part-00001.parquet ...
    _rejected.jsonl    bad input records (on_bad_record=skip); one JSON object a line, with "line" and "id" if known
    _manifest.json     written at the end of a run; ``{"complete": true, ...}`` when every record has a row

Commit protocol (:meth:`OutputDir.commit_part`): the part is written to ``part-NNNNN.parquet.tmp``, fsynced,
renamed with :func:`os.replace` (atomic on POSIX) and the directory is fsynced. A crash at any instant leaves
either a complete ``part-NNNNN.parquet`` or a ``.tmp`` file that readers ignore and :meth:`OutputDir.prepare`
deletes. Only files matching ``part-NNNNN.parquet`` exactly are ever read as committed.

Sharding: record ``index`` is the 0-based position of a record among the valid records of the input
(:func:`pipeline.records.iter_records`: blank and rejected lines are not records; ``--limit`` keeps
``index < limit``); shard ``I/N`` owns the records with ``index % N == I``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError, RunError

log = logging.getLogger(__name__)

RUN_FILE = "_run.json"
MANIFEST_FILE = "_manifest.json"
REJECTED_FILE = "_rejected.jsonl"
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
SHARD_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")
_SHARD_ARG_RE = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")
_HASH_BLOCK_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------
# fingerprint, atomic writes


def input_fingerprint(path: str | Path) -> dict[str, Any]:
    """Size and content hash of the input file, streamed in 1 MiB blocks.

    Args:
        path: the input file.

    Returns:
        ``{"size": <int, bytes>, "sha256": <hex str>}``.

    Raises:
        InputError: the file does not exist or cannot be read.
    """
    p = Path(path)
    digest = hashlib.sha256()
    size_bytes = 0
    try:
        with p.open("rb") as fh:
            while block := fh.read(_HASH_BLOCK_BYTES):
                digest.update(block)
                size_bytes += len(block)
    except FileNotFoundError:
        raise InputError(f"{p}: input file not found") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory, expected a JSONL file") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read input: {exc.strerror or exc}") from None
    return {"size": size_bytes, "sha256": digest.hexdigest()}


def _fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: ``path.tmp`` + fsync + :func:`os.replace` + fsync of the dir.

    Raises:
        OSError: the directory is not writable (disk full, permissions).
    """
    dest = Path(path)
    tmp = dest.with_name(dest.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)
    return dest


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object file written by this module.

    Raises:
        InputError: the file is missing, not valid JSON or not an object (message names the file).
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: {what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} must be a JSON object")
    return data


# ---------------------------------------------------------------------------------------------
# sharding


def parse_shard(spec: str) -> tuple[int, int]:
    """Parse ``"I/N"`` (partition I of N, 0-based) into ``(i, n)``.

    Raises:
        InputError: not of the form I/N with integers, N < 1, I < 0 or I >= N.
    """
    m = _SHARD_ARG_RE.match(spec or "")
    if not m:
        raise InputError(f"--shard {spec!r}: expected I/N, e.g. 0/4 (partition I of N, 0-based)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise InputError(f"--shard {spec!r}: N must be >= 1, got {n}")
    if i < 0 or i >= n:
        raise InputError(f"--shard {spec!r}: I must satisfy 0 <= I < N ({n}), got {i}")
    return i, n


def shard_dir(root: str | Path, i: int, n: int) -> Path:
    """Directory of shard ``i`` of ``n`` under the output root: ``root / "shard-{i}-of-{n}"``."""
    return Path(root) / f"shard-{i}-of-{n}"


def in_shard(index: int, i: int, n: int) -> bool:
    """True if the record at 0-based ``index`` belongs to shard ``i`` of ``n`` (``index % n == i``)."""
    return index % n == i


def shard_dirs(root: str | Path) -> list[tuple[int, int, Path]]:
    """The ``shard-I-of-N`` directories directly under ``root`` as ``(i, n, path)``, sorted by (n, i)."""
    out = []
    r = Path(root)
    if not r.is_dir():
        return out
    for child in r.iterdir():
        m = SHARD_RE.match(child.name)
        if m and child.is_dir():
            out.append((int(m.group(1)), int(m.group(2)), child))
    return sorted(out, key=lambda t: (t[1], t[0]))


# ---------------------------------------------------------------------------------------------
# the output directory


def part_paths(path: str | Path) -> list[Path]:
    """Committed part files of one run directory, in index order (``.tmp`` files are never included)."""
    d = Path(path)
    if not d.is_dir():
        return []
    parts = [(int(m.group(1)), p) for p in d.iterdir() if (m := PART_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(parts)]


class OutputDir:
    """One run directory: ``_run.json``, committed Parquet parts, manifest and rejected records.

    One process writes a given directory at a time (the run's main process). :meth:`commit_part` is
    thread-safe within that process. Exactly-once is enforced: committing an id twice raises.

    Args:
        path: the run directory (created by :meth:`prepare`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._committed: set[str] | None = None
        self._next_index: int | None = None

    def __repr__(self) -> str:
        return f"OutputDir({str(self.path)!r})"

    @property
    def run_file(self) -> Path:
        """Path of ``_run.json``."""
        return self.path / RUN_FILE

    @property
    def manifest_file(self) -> Path:
        """Path of ``_manifest.json``."""
        return self.path / MANIFEST_FILE

    @property
    def rejected_file(self) -> Path:
        """Path of ``_rejected.jsonl``."""
        return self.path / REJECTED_FILE

    # -- lifecycle ---------------------------------------------------------------------------

    def prepare(
        self,
        *,
        input_path: str | Path,
        fingerprint: dict[str, Any],
        shard: str | None,
        total_records: int,
        config: dict[str, Any],
        overwrite: bool,
    ) -> None:
        """Create (or reopen for resuming) the run directory and write ``_run.json``.

        A directory that already holds a ``_run.json`` for the same input (absolute path and fingerprint)
        and shard is resumed: its committed parts stay, ``total_records`` and ``config`` are updated and
        ``created`` is kept. Stale ``*.tmp`` files (a crash in the middle of a commit) are deleted.

        Args:
            input_path: the input JSONL (stored as an absolute path).
            fingerprint: :func:`input_fingerprint` of the input.
            shard: ``"I/N"`` or ``None`` for an unsharded run.
            total_records: records this directory is expected to hold rows for.
            config: ``Config.to_dict()`` of the run (merge reads ``config["run"]["id_field"]`` and ``limit``).
            overwrite: delete previous parts, manifest, rejected records and ``_run.json`` first.

        Raises:
            InputError: the directory belongs to another input, a changed input or another shard
                (and ``overwrite`` is False), or its ``_run.json`` is unreadable.
            OSError: the directory cannot be created or written.
        """
        input_abs = str(Path(input_path).expanduser().resolve())
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self._clear()
        created = _now()
        if self.run_file.exists():
            prev = read_json(self.run_file, "run file")
            reason = None
            if prev.get("input") != input_abs:
                reason = f"belongs to input {prev.get('input')}"
            elif prev.get("fingerprint") != fingerprint:
                reason = f"belongs to input {prev.get('input')} (changed since the first run)"
            elif prev.get("shard") != shard:
                reason = f"belongs to shard {prev.get('shard')} of input {prev.get('input')}, not {shard}"
            if reason:
                raise InputError(f"output dir {self.path} {reason}; use --overwrite or another --output")
            created = prev.get("created", created)
        for tmp in self.path.glob("*.tmp"):
            log.info("removing stale temporary file %s", tmp)
            tmp.unlink(missing_ok=True)
        info = {
            "input": input_abs,
            "fingerprint": fingerprint,
            "shard": shard,
            "total_records": int(total_records),
            "config": config,
            "created": created,
            "updated": _now(),
        }
        atomic_write_json(self.run_file, info)
        self._committed = None
        self._next_index = None

    def _clear(self) -> None:
        """Remove everything a previous run wrote in this directory (parts, tmp files, bookkeeping)."""
        for p in list(self.path.iterdir()):
            ours = p.name in (RUN_FILE, MANIFEST_FILE, REJECTED_FILE)
            if ours or PART_RE.match(p.name) or p.name.endswith(".tmp"):
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)

    def run_info(self) -> dict[str, Any]:
        """Contents of ``_run.json``.

        Raises:
            InputError: missing or invalid.
        """
        return read_json(self.run_file, "run file")

    def manifest(self) -> dict[str, Any] | None:
        """Contents of ``_manifest.json``, or ``None`` if the run has not written one.

        Raises:
            InputError: the file exists but is invalid.
        """
        if not self.manifest_file.exists():
            return None
        return read_json(self.manifest_file, "manifest")

    # -- committed rows ----------------------------------------------------------------------

    def parts(self) -> list[Path]:
        """Committed part files in index order."""
        return part_paths(self.path)

    def committed_ids(self) -> set[str]:
        """Ids of every committed row (reads only the ``id`` column of the parts; cached afterwards).

        Raises:
            RunError: a committed part is unreadable or has no ``id`` column.
        """
        with self._lock:
            return set(self._load_committed())

    def _load_committed(self) -> set[str]:
        if self._committed is None:
            ids: set[str] = set()
            for part in self.parts():
                for i in _read_ids(part):
                    if i in ids:
                        raise RunError(f"{part}: id {i!r} is committed twice in {self.path}")
                    ids.add(i)
            self._committed = ids
        return self._committed

    def _next_part_index(self) -> int:
        if self._next_index is None:
            indices = [int(m.group(1)) for p in self.path.iterdir() if (m := PART_RE.match(p.name))]
            self._next_index = max(indices, default=-1) + 1
        return self._next_index

    def commit_part(self, table: pa.Table) -> Path:
        """Commit rows atomically as the next ``part-NNNNN.parquet``.

        Writes ``part-NNNNN.parquet.tmp``, fsyncs it, renames it with :func:`os.replace`, fsyncs the
        directory. ``NNNNN`` is one more than the highest committed index.

        Args:
            table: rows to commit; must have a string ``id`` column.

        Returns:
            The committed part's path.

        Raises:
            RunError: no ``id`` column, a null id, an id duplicated within ``table`` or already committed
                (exactly-once is enforced; a duplicate is a bug in the caller).
            OSError: the write failed (disk full, ...); nothing is committed then.
        """
        if "id" not in table.column_names:
            raise RunError(f"commit to {self.path}: table has no 'id' column (columns: {table.column_names})")
        ids = table.column("id").to_pylist()
        if any(i is None for i in ids):
            raise RunError(f"commit to {self.path}: table has a null id")
        ids = [str(i) for i in ids]
        with self._lock:
            seen: set[str] = set()
            dup_set: set[str] = set()
            for i in ids:
                if i in seen:
                    dup_set.add(i)
                seen.add(i)
            dups = sorted(dup_set)
            if dups:
                raise RunError(f"commit to {self.path}: ids duplicated within the part: {_few(dups)}")
            committed = self._load_committed()
            again = sorted(seen & committed)
            if again:
                raise RunError(f"commit to {self.path}: ids already committed: {_few(again)}")
            n = self._next_part_index()
            dest = self.path / f"part-{n:05d}.parquet"
            tmp = dest.with_name(dest.name + ".tmp")
            try:
                with tmp.open("wb") as fh:
                    pq.write_table(table, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(self.path)
            committed.update(seen)
            self._next_index = n + 1
        log.debug("committed %s (%d rows)", dest.name, len(ids))
        return dest

    # -- bookkeeping files -------------------------------------------------------------------

    def write_manifest(self, manifest: dict[str, Any]) -> Path:
        """Write ``_manifest.json`` atomically. ``status`` reads its ``"complete"`` (bool) key.

        Raises:
            OSError: the write failed.
        """
        return atomic_write_json(self.manifest_file, manifest)

    def write_rejected(self, lines: list[dict[str, Any]]) -> Path:
        """Write ``_rejected.jsonl`` atomically, one JSON object per rejected record.

        Each object should carry ``"line"`` (1-based line number in the input) and ``"id"`` when known:
        merge counts an input record listed there as rejected instead of missing.

        Raises:
            OSError: the write failed.
        """
        data = "".join(json.dumps(obj, default=str) + "\n" for obj in lines).encode()
        return atomic_write_bytes(self.rejected_file, data)

    def rejected(self) -> list[dict[str, Any]]:
        """Rejected records of ``_rejected.jsonl`` (empty if absent); unparseable lines are skipped."""
        if not self.rejected_file.exists():
            return []
        out = []
        for line in self.rejected_file.read_text().splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: skipping an unparseable line", self.rejected_file)
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out


def _few(items: list[str], k: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:k])
    return shown + (f" ... ({len(items)} in all)" if len(items) > k else "")


def _read_ids(part: Path) -> list[str]:
    """The ``id`` column of one part as strings."""
    try:
        col = pq.read_table(part, columns=["id"]).column("id")
    except (OSError, pa.ArrowException, KeyError) as exc:
        raise RunError(f"{part}: cannot read committed part: {exc}") from None
    return [str(v) for v in col.to_pylist()]


# ---------------------------------------------------------------------------------------------
# reading


def is_run_dir(path: str | Path) -> bool:
    """True if ``path`` holds a ``_run.json`` (a run or shard directory)."""
    return (Path(path) / RUN_FILE).is_file()


def run_dirs(path: str | Path) -> list[Path]:
    """The run directories under ``path``: itself if it is one, else its ``shard-*-of-*`` subdirectories.

    Raises:
        InputError: ``path`` is neither a run directory nor a root of shard directories.
    """
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: output directory not found")
    if is_run_dir(p):
        return [p]
    shards = [d for _, _, d in shard_dirs(p)]
    if not shards:
        raise InputError(f"{p}: not a rag-pipeline output (no {RUN_FILE} and no shard-I-of-N directories)")
    return shards


def iter_part_tables(path: str | Path, columns: list[str] | None = None) -> Iterator[tuple[Path, pa.Table]]:
    """Yield ``(part_path, table)`` for every committed part of a run dir or a sharded root.

    Args:
        path: a run directory or a root holding ``shard-I-of-N`` directories.
        columns: read only these columns (those a part lacks are skipped, not an error).

    Raises:
        InputError: ``path`` is not an output directory.
        RunError: a committed part is unreadable.
    """
    for d in run_dirs(path):
        for part in part_paths(d):
            try:
                if columns is None:
                    table = pq.read_table(part)
                else:
                    names = set(pq.read_schema(part).names)
                    table = pq.read_table(part, columns=[c for c in columns if c in names])
            except (OSError, pa.ArrowException) as exc:
                raise RunError(f"{part}: cannot read committed part: {exc}") from None
            yield part, table


def read_rows(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All committed rows of a run directory or of a sharded root (``shard-*-of-*/``), as one table.

    Parts with slightly different schemas (e.g. a passthrough field all-null in one part) are unified
    with permissive type promotion. Uncommitted ``.tmp`` files are never read.

    Args:
        path: a run directory or a root holding ``shard-I-of-N`` directories.
        columns: optional subset of columns to read.

    Returns:
        The rows; an empty table with a string ``id`` column if nothing is committed yet.

    Raises:
        InputError: ``path`` is not an output directory.
        RunError: a committed part is unreadable or the parts' schemas cannot be unified.
    """
    tables = [t for _, t in iter_part_tables(path, columns)]
    if not tables:
        return pa.table({"id": pa.array([], pa.string())})
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as exc:
        raise RunError(f"{path}: committed parts have incompatible schemas: {exc}") from None


# ---------------------------------------------------------------------------------------------
# status and merge


def _value_counts(tables: list[pa.Table], column: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in tables:
        if column not in t.column_names:
            continue
        for item in t.column(column).combine_chunks().value_counts().to_pylist():
            key = "null" if item["values"] is None else str(item["values"])
            counts[key] = counts.get(key, 0) + item["counts"]
    return dict(sorted(counts.items()))


def dir_status(path: str | Path) -> dict[str, Any]:
    """Status of one run (or shard, or merged) directory.

    Returns:
        ``{"path", "shard", "input", "total", "done", "rejected", "complete", "manifest", "rag_status",
        "gen_status"}``: ``total`` from ``_run.json`` (records expected), ``done`` committed rows,
        ``rejected`` lines of ``_rejected.jsonl``, ``manifest`` whether ``_manifest.json`` exists,
        ``complete`` = the manifest says ``"complete": true`` and done + rejected >= total; the two
        status fields map each value (``"null"`` for a missing one) to a row count.

    Raises:
        InputError: ``_run.json`` missing or invalid.
        RunError: a committed part is unreadable.
    """
    d = OutputDir(path)
    info = d.run_info()
    tables = [t for _, t in iter_part_tables(d.path, ["id", "rag_status", "gen_status"])]
    done = sum(t.num_rows for t in tables)
    manifest = d.manifest()
    rejected = len(d.rejected())
    total = int(info.get("total_records") or 0)
    complete = bool(manifest and manifest.get("complete") is True and done + rejected >= total)
    return {
        "path": str(d.path),
        "shard": info.get("shard"),
        "input": info.get("input"),
        "total": total,
        "done": done,
        "rejected": rejected,
        "complete": complete,
        "manifest": manifest is not None,
        "rag_status": _value_counts(tables, "rag_status"),
        "gen_status": _value_counts(tables, "gen_status"),
    }


def _add_counts(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def _single_n(root: Path) -> tuple[int, dict[int, Path]]:
    shards = shard_dirs(root)
    ns = sorted({n for _, n, _ in shards})
    if len(ns) > 1:
        raise InputError(
            f"{root}: holds shards of different counts N ({', '.join(map(str, ns))}); "
            "remove the stale shard-I-of-N directories or use another --output"
        )
    return ns[0], {i: p for i, _, p in shards}


def run_status(path: str | Path) -> dict[str, Any]:
    """Status of an output directory: a run directory or a sharded root (``shard-I-of-N/``).

    Returns:
        For a run directory, :func:`dir_status` plus ``"sharded": False``. For a sharded root:
        ``{"path", "sharded": True, "n_shards", "total", "done", "rejected", "complete", "rag_status",
        "gen_status", "shards": [dir_status + "index"...], "missing_shards": [I...], "merged": dir_status
        of ``root/merged`` or None}``; ``complete`` = every shard present and complete; ``total`` sums the
        shards that exist (a missing shard's record count is unknown until it starts).

    Raises:
        InputError: not an output directory, mixed shard counts, an invalid ``_run.json``.
        RunError: a committed part is unreadable.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: output directory not found")
    if is_run_dir(root):
        return {**dir_status(root), "sharded": False}
    if not shard_dirs(root):
        raise InputError(f"{root}: not a rag-pipeline output (no {RUN_FILE} and no shard-I-of-N directories)")
    n, by_index = _single_n(root)
    shards, missing = [], []
    agg: dict[str, Any] = {"total": 0, "done": 0, "rag_status": {}, "gen_status": {}}
    rejected_lines: set[Any] = set()
    for i in range(n):
        if i not in by_index or not is_run_dir(by_index[i]):
            missing.append(i)
            continue
        st = {**dir_status(by_index[i]), "index": i}
        shards.append(st)
        for k in ("total", "done"):
            agg[k] += st[k]
        # every shard lists the bad lines of the whole input: count each line once
        rejected_lines.update(r.get("line") for r in OutputDir(by_index[i]).rejected())
        _add_counts(agg["rag_status"], st["rag_status"])
        _add_counts(agg["gen_status"], st["gen_status"])
    merged_dir = root / "merged"
    return {
        "path": str(root),
        "sharded": True,
        "n_shards": n,
        **agg,
        "rejected": len(rejected_lines),
        "complete": not missing and all(s["complete"] for s in shards),
        "shards": shards,
        "missing_shards": missing,
        "merged": dir_status(merged_dir) if is_run_dir(merged_dir) else None,
    }


def merge_shards(root: str | Path, output: str | Path | None = None, *, part_rows: int = 0) -> dict[str, Any]:
    """Combine the shards of ``root`` into ``output`` (default ``root/merged``) after verifying exactly-once.

    Reads the input named in the shards' ``_run.json`` (which must agree and be unchanged since), validates
    it like the run does (:func:`pipeline.records.scan_input`, bad lines rejected, with the shards'
    ``config["run"]`` id_field / query_field / max_query_chars / limit) and checks that every valid record
    has exactly one row across the shards. A root that is itself a run directory is treated as one shard.
    Rows are copied part by part (shard order, then part order), re-chunked to ``part_rows``, with schemas
    unified; the rejected lines go to the merged ``_rejected.jsonl``.

    Args:
        root: the output root holding ``shard-I-of-N`` directories.
        output: merged directory; an existing merge output there is replaced.
        part_rows: rows per merged part; 0 = ``config["run"]["part_rows"]`` of the shards (default 1000).

    Returns:
        The merged ``_manifest.json`` content: ``complete``, ``total_records``, ``rows``, ``rejected``,
        ``counts`` (rag_status / gen_status), ``n_shards``, ``merged_from``, ``misplaced``, ``created``.

    Raises:
        InputError: not an output root, mixed shard counts, shards of different inputs or limits, the input
            changed since the run, ``output`` is a run directory that is not a merge output.
        RunError: duplicate ids, missing records, ids not in the input (a few of each are listed), or an
            unreadable part; nothing is written then.
    """
    root_p = Path(root)
    if not root_p.is_dir():
        raise InputError(f"{root_p}: output directory not found")
    if shard_dirs(root_p):
        n, by_index = _single_n(root_p)
        present = {i: p for i, p in by_index.items() if is_run_dir(p)}
    elif is_run_dir(root_p):
        n, present = 1, {0: root_p}
    else:
        raise InputError(
            f"{root_p}: not a rag-pipeline output (no {RUN_FILE} and no shard-I-of-N directories)"
        )
    if not present:
        raise InputError(f"{root_p}: no shard has started yet (no shard-I-of-{n}/{RUN_FILE})")
    out = Path(output) if output is not None else root_p / "merged"
    if out.resolve() in {p.resolve() for p in present.values()} or out.resolve() == root_p.resolve():
        raise InputError(f"--output {out}: must not be the output root or a shard directory")
    if is_run_dir(out):
        prev_dir = OutputDir(out)
        prev = prev_dir.manifest() or {}
        if "merged_from" not in prev and (prev_dir.run_info().get("shard") is not None or prev_dir.parts()):
            raise InputError(
                f"--output {out} holds a run output, not a merge output; choose another --output"
            )

    infos = {i: OutputDir(p).run_info() for i, p in present.items()}
    first = infos[min(infos)]
    for i, info in infos.items():
        for key in ("input", "fingerprint"):
            if info.get(key) != first.get(key):
                raise InputError(
                    f"{present[i]}: was run on {info.get('input')} {info.get('fingerprint')}, but "
                    f"{present[min(infos)]} on {first.get('input')} {first.get('fingerprint')}"
                )
    run_cfg = (first.get("config") or {}).get("run") or {}
    id_field = str(run_cfg.get("id_field") or "id")
    limit = int(run_cfg.get("limit") or 0)
    for i, info in infos.items():
        other = (info.get("config") or {}).get("run") or {}
        if int(other.get("limit") or 0) != limit or str(other.get("id_field") or "id") != id_field:
            raise InputError(f"{present[i]}: was run with another --limit or id_field than the other shards")
    input_path = Path(str(first.get("input")))
    if input_fingerprint(input_path) != first.get("fingerprint"):
        raise InputError(f"{input_path}: changed since the shards were run (fingerprint differs)")

    # expected records: the run's own validation and partition (pipeline.records), bad lines rejected
    from pipeline.records import iter_records, scan_input

    fields = {
        "id_field": id_field,
        "query_field": str(run_cfg.get("query_field") or "query"),
        "max_query_chars": int(run_cfg.get("max_query_chars") or 8000),
    }
    scan = scan_input(input_path, on_bad_record="skip", **fields)
    expected: dict[str, tuple[int, int]] = {}
    for rec in iter_records(scan, **fields):
        if limit and rec.index >= limit:
            break
        expected[rec.id] = (rec.index, rec.line)

    # actual rows
    seen: dict[str, int] = {}
    dups: list[str] = []
    unknown: list[str] = []
    misplaced = 0
    schemas: list[pa.Schema] = []
    for i, p in sorted(present.items()):
        for part in part_paths(p):
            schemas.append(_read_schema(part))
            for rid in _read_ids(part):
                if rid in seen:
                    dups.append(f"{rid!r} (shard-{seen[rid]}-of-{n} and shard-{i}-of-{n})")
                    continue
                seen[rid] = i
                if rid not in expected:
                    unknown.append(f"{rid!r} (shard-{i}-of-{n})")
                elif expected[rid][0] % n != i:
                    misplaced += 1
    missing = [
        f"{rid!r} (line {line}, shard {index % n}/{n})"
        for rid, (index, line) in expected.items()
        if rid not in seen
    ]
    problems = []
    if dups:
        problems.append(f"{len(dups)} duplicate ids: {_few_raw(dups)}")
    if missing:
        absent = [f"shard-{i}-of-{n}" for i in range(n) if i not in present]
        note = f" [no output dir for {', '.join(absent)}]" if absent else ""
        problems.append(f"{len(missing)} input records have no row{note}: {_few_raw(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} ids are not in the input: {_few_raw(unknown)}")
    if problems:
        raise RunError(f"merge of {root_p} failed: " + "; ".join(problems))
    if misplaced:
        log.warning("%d rows are in another shard than index %% %d predicts", misplaced, n)

    # write
    rows_per_part = part_rows or int(run_cfg.get("part_rows") or 1000)
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else None
    dest = OutputDir(out)
    dest.prepare(
        input_path=input_path,
        fingerprint=first["fingerprint"],
        shard=None,
        total_records=len(expected),
        config=first.get("config") or {},
        overwrite=True,
    )
    # marks the directory as a merge output at once, so that a merge killed midway can be re-run over it
    dest.write_manifest({"complete": False, "merged_from": [str(p) for _, p in sorted(present.items())]})
    buffer: list[pa.Table] = []
    buffered = 0
    counts: dict[str, dict[str, int]] = {"rag_status": {}, "gen_status": {}}
    for _, table in iter_part_tables_of([p for _, p in sorted(present.items())]):
        for col in counts:
            _add_counts(counts[col], _value_counts([table], col))
        buffer.append(_conform(table, schema))
        buffered += table.num_rows
        while buffered >= rows_per_part:
            combined = pa.concat_tables(buffer)
            dest.commit_part(combined.slice(0, rows_per_part))
            rest = combined.slice(rows_per_part)
            buffer, buffered = ([rest] if rest.num_rows else []), rest.num_rows
    if buffered:
        dest.commit_part(pa.concat_tables(buffer))
    if scan.rejected:
        dest.write_rejected(scan.rejected)
    manifest = {
        "complete": True,
        "input": str(input_path),
        "total_records": len(expected),
        "rows": len(seen),
        "rejected": len(scan.rejected),
        "counts": counts,
        "n_shards": n,
        "merged_from": [str(p) for _, p in sorted(present.items())],
        "misplaced": misplaced,
        "created": _now(),
    }
    dest.write_manifest(manifest)
    return manifest


def iter_part_tables_of(dirs: list[Path]) -> Iterator[tuple[Path, pa.Table]]:
    """Yield ``(part_path, table)`` for the committed parts of several run directories, in order.

    Raises:
        RunError: a committed part is unreadable.
    """
    for d in dirs:
        for part in part_paths(d):
            try:
                yield part, pq.read_table(part)
            except (OSError, pa.ArrowException) as exc:
                raise RunError(f"{part}: cannot read committed part: {exc}") from None


def _read_schema(part: Path) -> pa.Schema:
    try:
        return pq.read_schema(part)
    except (OSError, pa.ArrowException) as exc:
        raise RunError(f"{part}: cannot read committed part: {exc}") from None


def _conform(table: pa.Table, schema: pa.Schema | None) -> pa.Table:
    """Cast ``table`` to ``schema``, adding all-null columns it lacks."""
    if schema is None:
        return table
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _few_raw(items: list[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (f" ... ({len(items)} in all)" if len(items) > k else "")


__all__ = [
    "OutputDir",
    "dir_status",
    "merge_shards",
    "run_status",
    "atomic_write_bytes",
    "atomic_write_json",
    "in_shard",
    "input_fingerprint",
    "is_run_dir",
    "iter_part_tables",
    "parse_shard",
    "part_paths",
    "read_rows",
    "run_dirs",
    "shard_dir",
    "shard_dirs",
]
