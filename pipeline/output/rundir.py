"""One run directory and its commit protocol.

Layout (``--output``, or ``--output/shard-I-of-N`` with ``--shard I/N``)::

    _run.json          input (absolute path), fingerprint {size, sha256}, shard, total_records, config, created
    part-00000.parquet committed rows (one row per record; the parts themselves are the durable ledger)
    part-00001.parquet ...
    _rejected.jsonl    bad input records (on_bad_record=skip); one JSON object a line, with "line" and "id" if known
    _manifest.json     written at the end of a run; ``{"complete": true, ...}`` when every record has a row

Commit protocol (:meth:`OutputDir.commit_part`): the part is written to ``part-NNNNN.parquet.tmp``, fsynced,
renamed with :func:`os.replace` (atomic on POSIX) and the directory is fsynced. A crash at any instant leaves
either a complete ``part-NNNNN.parquet`` or a ``.tmp`` file that readers ignore and :meth:`OutputDir.prepare`
deletes. Exactly-once is checked against the in-memory :class:`~pipeline.output.ledger.Ledger`, loaded once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError, RunError
from pipeline.output.files import atomic_write_bytes, atomic_write_json, fsync_dir, now, read_json
from pipeline.output.ledger import Ledger
from pipeline.output.reading import PART_RE, RUN_FILE, part_paths

log = logging.getLogger(__name__)

MANIFEST_FILE = "_manifest.json"
REJECTED_FILE = "_rejected.jsonl"


class OutputDir:
    """One run directory: ``_run.json``, committed Parquet parts, manifest and rejected records.

    One process writes a given directory at a time (the run's main process), through ONE ``OutputDir`` for
    the whole run: its ledger is loaded on first use and updated in memory by every commit.
    :meth:`commit_part` is thread-safe within that process. Exactly-once is enforced: committing an id
    twice raises.

    Args:
        path: the run directory (created by :meth:`prepare`).
        track_ids: see :class:`~pipeline.output.ledger.Ledger` (False only for merge, which verifies
            exactly-once before writing).
    """

    def __init__(self, path: str | Path, *, track_ids: bool = True) -> None:
        self.path = Path(path)
        self.track_ids = track_ids
        self._lock = threading.Lock()
        self._ledger: Ledger | None = None

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
            input_path: the input (file or directory; stored as an absolute path).
            fingerprint: :func:`~pipeline.output.files.input_fingerprint` of the input.
            shard: ``"I/N"`` or ``None`` for an unsharded run.
            total_records: records this directory is expected to hold rows for.
            config: ``Config.to_dict()`` of the run (merge reads ``config["run"]``).
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
        created = now()
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
            "updated": now(),
        }
        atomic_write_json(self.run_file, info)
        self._ledger = None

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

    @property
    def ledger(self) -> Ledger:
        """The run's ledger (loaded from the parts on first use, then kept up to date by commits).

        Raises:
            RunError: a committed part is unreadable, has a null id, or an id is committed twice.
        """
        with self._lock:
            if self._ledger is None:
                self._ledger = Ledger(self.path, track_ids=self.track_ids)
            return self._ledger

    def committed_ids(self) -> set[str]:
        """Ids of every committed row (a copy of the ledger's set; prefer ``id in od.ledger``).

        Raises:
            RunError: see :attr:`ledger`.
        """
        return set(self.ledger.ids)

    def commit_part(self, table: pa.Table) -> Path:
        """Commit rows atomically as the next ``part-NNNNN.parquet``.

        Writes ``part-NNNNN.parquet.tmp``, fsyncs it, renames it with :func:`os.replace`, fsyncs the
        directory. ``NNNNN`` is one more than the highest committed index. Cost: proportional to the
        table's rows, independent of the number of parts committed before.

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
        col = table.column("id")
        if col.null_count:
            raise RunError(f"commit to {self.path}: table has a null id")
        ids = [str(i) for i in col.to_pylist()]
        ledger = self.ledger
        with self._lock:
            ledger.check(ids)
            dest = self.path / f"part-{ledger.next_index:05d}.parquet"
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
            fsync_dir(self.path)
            ledger.add(ids)
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

        Each object should carry ``"line"`` (1-based line number in a JSONL input, row number in a
        Parquet input) and ``"id"`` when known.

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
        with self.rejected_file.open() as fh:
            for line in fh:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s: skipping an unparseable line", self.rejected_file)
                    continue
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    def rejected_count(self) -> int:
        """Number of lines of ``_rejected.jsonl`` (0 if absent), streamed."""
        if not self.rejected_file.exists():
            return 0
        with self.rejected_file.open("rb") as fh:
            return sum(1 for line in fh if line.strip())
