"""One run directory and its commit protocol.

Layout (``--output``, or ``--output/shard-I-of-N`` with ``--shard I/N``; :mod:`pipeline.output.layout`)::

    part-00000.parquet          committed rows (one row per record; the parts themselves are the durable ledger)
    part-00001.parquet ...
    .rag-pipeline/run.json      input (absolute path), fingerprint {size, sha256}, shard, total_records, config,
                                created
    .rag-pipeline/rejected.jsonl  bad input records (on_bad_record=skip); one JSON object a line, with "line" and
                                "id" if known
    .rag-pipeline/manifest.json written at the end of a run; ``{"complete": true, ...}`` when every record has a row
    .rag-pipeline/retry-00000.pending  replacement rows of ``run --retry-failed`` until they are applied

Only committed parts live outside ``.rag-pipeline/``, so that reading the directory with pyarrow, pandas, DuckDB
or datasets gives each record once (:mod:`pipeline.output.reading`).

Commit protocol (:meth:`OutputDir.commit_part`): the part is written to ``.part-NNNNN.parquet.tmp``, fsynced,
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
from pipeline.output.layout import (
    LOCK_FILE,
    MANIFEST_FILE,
    META_DIR,
    REJECTED_FILE,
    RUN_FILE,
    locate,
    meta_dir,
    retry_part_index,
    retry_part_path,
)
from pipeline.output.ledger import Ledger
from pipeline.output.reading import PART_RE, part_paths, read_part_footer, tmp_path
from pipeline.output.resume import COLUMNS as RETRY_COLUMNS
from pipeline.output.resume import (
    FINISH_REASON_COLUMN,
    LENGTH,
    RetrySelection,
    check_limit_change,
    retry_reasons,
)

log = logging.getLogger(__name__)

LIMIT_KEY = "run.limit"
"""The identity key a resume may raise (the run grows); every other identity key must stay."""


class OutputDir:
    """One run directory: committed Parquet parts, and ``.rag-pipeline/`` run file, manifest and rejected records.

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
        self._retry_ids: set[str] | None = None  # ids in retry parts (loaded on the first retry commit)

    def __repr__(self) -> str:
        return f"OutputDir({str(self.path)!r})"

    @property
    def run_file(self) -> Path:
        """Path of ``.rag-pipeline/run.json`` (:func:`pipeline.output.layout.locate`)."""
        return locate(self.path, RUN_FILE)

    @property
    def manifest_file(self) -> Path:
        """Path of ``.rag-pipeline/manifest.json``."""
        return locate(self.path, MANIFEST_FILE)

    @property
    def rejected_file(self) -> Path:
        """Path of ``.rag-pipeline/rejected.jsonl``."""
        return locate(self.path, REJECTED_FILE)

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
        identity: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        allow_config_change: bool = False,
    ) -> None:
        """Create (or reopen for resuming) the run directory and write ``.rag-pipeline/run.json``.

        A directory that already holds a ``run.json`` for the same input (absolute path and fingerprint),
        shard and identity is resumed: its committed parts stay, ``total_records`` and ``config`` are updated
        and ``created`` is kept. ``run.limit`` may differ when ``total_records`` stays or grows: the run is
        extended (:func:`pipeline.output.resume.check_limit_change`; the change is appended to
        ``config_changes``). Stale ``*.tmp`` files (a crash in the middle of a commit) are deleted.

        Args:
            input_path: the input (file or directory; stored as an absolute path).
            fingerprint: :func:`~pipeline.output.files.input_fingerprint` of the input.
            shard: ``"I/N"`` or ``None`` for an unsharded run.
            total_records: records this directory is expected to hold rows for.
            config: ``Config.to_dict()`` of the run (merge reads ``config["run"]``).
            overwrite: discard previous parts, manifest and rejected records first (see :meth:`_clear`).
            identity: ``{"run.id_field": ..., ...}``: what decides which rows the directory holds; a resume
                with any different value is refused (the message names the key).
            settings: ``{"rag.max_tokens": ..., "rag.prompt_file": <sha256>, ...}``: what decides the content
                of a row; a resume with a different value is refused unless ``allow_config_change`` (then the
                change is appended to ``config_changes`` in ``run.json``).
            allow_config_change: accept changed ``settings`` on resume.

        Raises:
            InputError: the directory belongs to another input, a changed input, another shard or another
                identity (a ``run.limit`` with fewer records included), a setting changed without
                ``allow_config_change``, an interrupted ``--overwrite`` (and ``overwrite`` is False), parts without
                ``run.json``, or an unreadable ``run.json``.
            OSError: the directory cannot be created or written.
        """
        input_abs = str(Path(input_path).expanduser().resolve())
        meta_dir(self.path).mkdir(parents=True, exist_ok=True)
        if overwrite:
            self._clear()
        created = now()
        identity = dict(identity or {})
        settings = dict(settings or {})
        changes: list[dict[str, Any]] = []
        if overwrite:
            pass  # a fresh start: _clear left at most the tombstone, replaced below
        elif self.run_file.exists():
            prev = read_json(self.run_file, "run file")
            if prev.get("state") == "overwriting":
                raise InputError(f"output dir {self.path}: an --overwrite was interrupted while discarding the "
                                 "old rows; run with --overwrite again, or use another --output")
            reason = None
            if prev.get("input") != input_abs:
                reason = f"belongs to input {prev.get('input')}"
            elif prev.get("fingerprint") != fingerprint:
                reason = f"belongs to input {prev.get('input')} (changed since the first run)"
            elif prev.get("shard") != shard:
                reason = f"belongs to shard {prev.get('shard')} of input {prev.get('input')}, not {shard}"
            if reason:
                raise InputError(f"output dir {self.path} {reason}; use --overwrite or another --output")
            old_identity = _previous(prev, "identity", identity)
            changes = list(prev.get("config_changes") or [])
            for key, value in identity.items():
                if key == LIMIT_KEY and key in old_identity:  # a run may grow (pipeline.output.resume)
                    grown = check_limit_change(self.path, old_identity[key], value,
                                               int(prev.get("total_records") or 0), int(total_records))
                    if grown:
                        log.warning("%s: %s", self.path, grown)
                    if old_identity[key] != value:
                        changes.append({"at": now(), "key": key, "old": old_identity[key], "new": value,
                                        "total_records": [prev.get("total_records"), int(total_records)]})
                elif key in old_identity and old_identity[key] != value:
                    raise InputError(
                        f"output dir {self.path} was started with {key}={old_identity[key]!r}, now {value!r}: "
                        f"a resume must keep {key} (it decides which rows the directory holds); use "
                        f"{key}={old_identity[key]!r}, --overwrite, or another --output")
            old_settings = _previous(prev, "settings", settings)
            changed = [k for k, v in settings.items() if k in old_settings and old_settings[k] != v]
            if changed and not allow_config_change:
                k = changed[0]
                more = f" (and {', '.join(changed[1:])})" if len(changed) > 1 else ""
                raise InputError(
                    f"output dir {self.path}: {k} changed since its rows were made ({old_settings[k]!r} -> "
                    f"{settings[k]!r}){more}; pass --allow-config-change to resume with the new settings, "
                    "or --overwrite to start afresh")
            changes += [{"at": now(), "key": k, "old": old_settings[k], "new": settings[k]} for k in changed]
            if changed:
                log.warning("%s: resuming with changed settings: %s", self.path, ", ".join(changed))
            created = prev.get("created", created)
        elif self.parts():
            raise InputError(f"output dir {self.path} holds committed parts but no {RUN_FILE}: they cannot be "
                             "resumed safely; use --overwrite or another --output")
        for tmp in [*self.path.glob("*.tmp"), *meta_dir(self.path).glob("*.tmp")]:
            log.info("removing stale temporary file %s", tmp)
            tmp.unlink(missing_ok=True)
        info = {
            "input": input_abs,
            "fingerprint": fingerprint,
            "shard": shard,
            "total_records": int(total_records),
            "identity": identity,
            "settings": settings,
            "config_changes": changes,
            "config": config,
            "created": created,
            "updated": now(),
        }
        atomic_write_json(self.run_file, info)
        self._ledger = None

    def _clear(self) -> None:
        """Discard what a previous run wrote (parts, tmp files, retry parts, manifest, rejected records).

        Ordered so that an interruption at any instant never leaves parts that a later resume would adopt:
        ``run.json`` is first replaced (atomically) by a tombstone ``{"state": "overwriting"}`` that every
        resume refuses, then the files are deleted; :meth:`prepare` writes the new ``run.json`` last. The lock,
        the logs, the live state and the report stay.
        """
        meta = meta_dir(self.path)
        top = [p for p in self.path.iterdir() if p.name != META_DIR]
        inside = list(meta.iterdir()) if meta.is_dir() else []
        if top or any(p.name != LOCK_FILE and not p.name.startswith("_lock.") for p in inside):
            atomic_write_json(meta / RUN_FILE, {"state": "overwriting", "since": now()})
        doomed = [p for p in top if PART_RE.match(p.name) or p.name.endswith(".tmp")]
        doomed += [p for p in inside if p.name in (MANIFEST_FILE, REJECTED_FILE) or retry_part_index(p.name) is not None
                   or p.name.endswith(".tmp")]
        for p in doomed:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        fsync_dir(meta)
        fsync_dir(self.path)

    def run_info(self) -> dict[str, Any]:
        """Contents of ``run.json``.

        Raises:
            InputError: missing or invalid.
        """
        return read_json(self.run_file, "run file")

    def manifest(self) -> dict[str, Any] | None:
        """Contents of ``manifest.json``, or ``None`` if the run has not written one.

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

        Writes ``.part-NNNNN.parquet.tmp``, fsyncs it, renames it with :func:`os.replace`, fsyncs the
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
            _write_atomic(table, dest)
            fsync_dir(self.path)
            ledger.add(ids)
        log.debug("committed %s (%d rows)", dest.name, len(ids))
        return dest

    # -- retry of failed rows (run --retry-failed) ---------------------------------------------

    def failed_ids(self) -> set[str]:
        """Ids of committed rows that ``--retry-failed`` re-processes: ``rag_status`` hard_fail, ``gen_status``
        failed or invalid_output (:meth:`retry_selection`).

        Raises:
            RunError: a committed part is unreadable.
        """
        return self.retry_selection(failed=True).ids

    def retry_selection(self, *, failed: bool = True, truncated: bool = False) -> RetrySelection:
        """The committed rows a retry re-processes, with the count per reason (the rules:
        :mod:`pipeline.output.resume`).

        One streamed scan of four columns (contexts and generations are never read); parts written without
        ``gen_finish_reason`` read it as null and are counted in ``rows_without_finish_reason`` (from their
        footers). Memory: the selected ids.

        Args:
            failed: select hard_fail, failed and invalid_output rows (``--retry-failed``).
            truncated: select ok rows whose generation hit max_tokens (``--retry-truncated``).

        Raises:
            RunError: a committed part is unreadable.
        """
        import pyarrow.compute as pc

        from pipeline.output.reading import scan_batches

        sel = RetrySelection(failed=failed, truncated=truncated)
        parts = self.parts()
        if not parts or not (failed or truncated):
            return sel
        if truncated:
            for part in parts:
                meta = read_part_footer(part)
                if FINISH_REASON_COLUMN not in meta.schema.to_arrow_schema().names:
                    sel.rows_without_finish_reason += meta.num_rows
        for batch in scan_batches(parts, list(RETRY_COLUMNS), {FINISH_REASON_COLUMN: pa.string()}):
            ids, rag, gen, finish = batch.columns
            sel.rows += batch.num_rows
            masks = []  # a cheap vectorised pre-filter; retry_reasons decides on the few candidates
            if failed:
                masks += [pc.equal(rag, "hard_fail"), pc.is_in(gen, value_set=pa.array(["failed", "invalid_output"]))]
            if truncated:
                masks.append(pc.equal(finish, LENGTH))
            cand = masks[0]
            for m in masks[1:]:
                cand = pc.or_kleene(cand, m)
            cand = pc.fill_null(cand, False)
            if not pc.any(cand).as_py():
                continue
            picked = [pc.filter(c, cand).to_pylist() for c in (ids, rag, gen, finish)]
            sel.rows -= len(picked[0])  # add() counts them again
            sel.add(picked[0], retry_reasons(picked[1], picked[2], picked[3], failed=failed, truncated=truncated))
        return sel

    def retry_parts(self) -> list[Path]:
        """Committed retry parts (``.rag-pipeline/retry-NNNNN.pending``: replacement rows not yet applied), in
        index order."""
        meta = meta_dir(self.path)
        found = [(k, p) for p in meta.iterdir() if (k := retry_part_index(p.name)) is not None] if meta.is_dir() else []
        return [p for _, p in sorted(found)]

    def commit_retry_part(self, table: pa.Table) -> Path:
        """Commit replacement rows (of ids that already have a committed row) as the next
        ``.rag-pipeline/retry-NNNNN.pending`` (a Parquet file no reader of the directory takes for rows).

        Same atomic protocol as :meth:`commit_part`. The rows replace the committed rows of the same ids when
        :meth:`apply_retries` runs (at the end of the retry, or at the start of the next run after a crash).

        Raises:
            RunError: an id without a committed row, duplicated within ``table``, or already in a retry part.
            OSError: the write failed; nothing is committed then.
        """
        ids = [str(i) for i in table.column("id").to_pylist()]
        ledger = self.ledger
        with self._lock:
            if self._retry_ids is None:
                self._retry_ids = set()
                for rp in self.retry_parts():
                    self._retry_ids.update(str(i) for i in pq.read_table(rp, columns=["id"]).column("id").to_pylist())
            bad = [i for i in ids if i not in ledger or i in self._retry_ids]
            if bad or len(set(ids)) != len(ids):
                raise RunError(f"retry commit to {self.path}: ids without a committed row, duplicated or already "
                               f"retried: {bad[:5] or ids[:5]}")
            found = [retry_part_index(p.name) or 0 for p in self.retry_parts()]
            dest = retry_part_path(self.path, max(found, default=-1) + 1)
            dest.parent.mkdir(exist_ok=True)
            _write_atomic(table, dest)
            fsync_dir(dest.parent)
            self._retry_ids.update(ids)
        return dest

    def apply_retries(self) -> int:
        """Replace committed rows by the rows of the retry parts with the same id; then delete the retry parts.

        Each part that holds a replaced id is rewritten whole (tmp + fsync + rename), keeping its row order:
        at every instant each id is in exactly one committed part, with either its old or its new row. The
        operation is idempotent, so a crash at any point is repaired by running it again (every run does so
        first). Memory: one committed part and one retry part at a time, plus the retried ids.

        Returns:
            Number of rows replaced.

        Raises:
            RunError: a part or retry part is unreadable, or their columns do not match.
            OSError: a write failed (nothing is lost: the retry parts stay until every part is rewritten).
        """
        import numpy as np
        import pyarrow.compute as pc

        retry = self.retry_parts()
        if not retry:
            return 0
        where: dict[str, int] = {}
        for k, rp in enumerate(retry):
            where.update(dict.fromkeys((str(i) for i in _read(rp, ["id"]).column("id").to_pylist()), k))
        value_set = pa.array(list(where), pa.string())
        cached: tuple[int, pa.Table] | None = None
        replaced = 0
        for part in self.parts():
            ids = _read(part, ["id"]).column("id")
            mask = pc.fill_null(pc.is_in(ids, value_set=value_set), False)
            if not pc.any(mask).as_py():
                continue
            table = _read(part)
            pos = np.nonzero(mask.to_numpy(zero_copy_only=False))[0]
            wanted = [str(i) for i in ids.take(pa.array(pos)).to_pylist()]
            pieces = []
            for k in sorted({where[i] for i in wanted}):
                if cached is None or cached[0] != k:
                    cached = (k, _read(retry[k]))
                rt = cached[1]
                pieces.append(rt.filter(pc.is_in(rt.column("id"), value_set=pa.array(wanted, pa.string()))))
            try:
                repl = pa.concat_tables(pieces).select(table.schema.names).cast(table.schema)
            except (KeyError, pa.ArrowException) as exc:
                raise RunError(f"{part}: retried rows do not match its columns: {exc}") from None
            order = {rid: n for n, rid in enumerate(repl.column("id").to_pylist())}
            repl = repl.take(pa.array([order[i] for i in wanted]))  # in the part's row order
            keep = np.nonzero(~mask.to_numpy(zero_copy_only=False))[0]
            merged = pa.concat_tables([table.take(pa.array(keep)), repl])
            merged = merged.take(pa.array(np.argsort(np.concatenate([keep, pos]), kind="stable")))
            _write_atomic(merged, part)
            replaced += len(wanted)
        fsync_dir(self.path)
        for rp in retry:
            rp.unlink(missing_ok=True)
        fsync_dir(meta_dir(self.path))
        with self._lock:
            self._retry_ids = None
        log.info("%s: %d retried rows applied from %d retry parts", self.path, replaced, len(retry))
        return replaced

    # -- bookkeeping files -------------------------------------------------------------------

    def write_manifest(self, manifest: dict[str, Any]) -> Path:
        """Write ``manifest.json`` atomically. ``status`` reads its ``"complete"`` (bool) key.

        Raises:
            OSError: the write failed.
        """
        meta_dir(self.path).mkdir(parents=True, exist_ok=True)
        return atomic_write_json(self.manifest_file, manifest)

    def write_rejected(self, lines: list[dict[str, Any]]) -> Path:
        """Write ``rejected.jsonl`` atomically, one JSON object per rejected record.

        Each object should carry ``"line"`` (1-based line number in a JSONL input, row number in a
        Parquet input) and ``"id"`` when known.

        Raises:
            OSError: the write failed.
        """
        data = "".join(json.dumps(obj, default=str) + "\n" for obj in lines).encode()
        meta_dir(self.path).mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(self.rejected_file, data)

    def rejected(self) -> list[dict[str, Any]]:
        """Rejected records of ``rejected.jsonl`` (empty if absent); unparseable lines are skipped."""
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
        """Number of lines of ``rejected.jsonl`` (0 if absent), streamed."""
        if not self.rejected_file.exists():
            return 0
        with self.rejected_file.open("rb") as fh:
            return sum(1 for line in fh if line.strip())


def _previous(prev: dict[str, Any], key: str, current: dict[str, Any]) -> dict[str, Any]:
    """``prev[key]``; for a ``run.json`` written before it was recorded, the values of the same dotted keys
    in ``prev["config"]`` (the keys that cannot be found there are not compared)."""
    if isinstance(prev.get(key), dict):
        return prev[key]
    config = prev.get("config") or {}
    out = {}
    for dotted in current:
        sec, _, name = dotted.partition(".")
        if isinstance(config.get(sec), dict) and name in config[sec]:
            out[dotted] = config[sec][name]
    return out


def _write_atomic(table: pa.Table, dest: Path) -> None:
    """Write ``table`` to ``dest`` through ``.NAME.tmp`` (:func:`pipeline.output.reading.tmp_path`) + fsync +
    :func:`os.replace` (the caller fsyncs the dir)."""
    tmp = tmp_path(dest)
    try:
        with tmp.open("wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise RunError(f"{path}: cannot read committed part: {exc}") from None
