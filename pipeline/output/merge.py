"""`rag-pipeline merge`: combine shards into one output after verifying exactly-once, in bounded memory.

Exactly-once without loading rows: every expected record (the input, validated and partitioned as the run
does) and every committed row is reduced to a 128-bit BLAKE2b digest of its id (16 bytes; plus record index
and line for expected records). Both arrays are sorted (numpy) and compared: equal arrays mean every valid
input record has exactly one row and no row has an unknown id. Only when they differ does a second streamed
pass look up the few offending ids to name them. Memory: ~32 bytes per expected record and ~20 bytes per
row (about 50 MB for a million), the ids of one scanned batch, and one part being copied. A digest collision
between two different ids (probability ~ n^2 / 2^129, ~1e-27 for a million) could hide one error.
"""

from __future__ import annotations

import array
import hashlib
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import InputError, RunError
from pipeline.output.files import input_fingerprint, now
from pipeline.output.layout import META_DIR, RUN_FILE
from pipeline.output.migrate import migrate
from pipeline.output.reading import (
    is_run_dir,
    iter_tables_of_parts,
    not_an_output,
    part_paths,
    read_part_schema,
    scan_batches,
)
from pipeline.output.rundir import OutputDir
from pipeline.output.schema import INDEX_COLUMN
from pipeline.output.sharding import default_merge_dir, shard_dirs
from pipeline.output.stats import RowStats
from pipeline.output.status import single_n

log = logging.getLogger(__name__)

_FEW = 5


def _digest(rid: str) -> bytes:
    return hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class _Digests:
    """Growable columns: 128-bit id digest (two uint64) and int64 tags, sorted by digest on :meth:`sorted`."""

    def __init__(self, n_tags: int) -> None:
        self.buf = bytearray()
        self.tags = [array.array("q") for _ in range(n_tags)]

    def add(self, rid: str, *tags: int) -> None:
        self.buf += _digest(rid)
        for t, v in zip(self.tags, tags, strict=True):
            t.append(v)

    def add_many(self, ids: Iterable[str], tag: int) -> None:
        n = 0
        for rid in ids:
            self.buf += _digest(rid)
            n += 1
        self.tags[0].extend([tag] * n)

    def sorted(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """``(hi, lo, [tag...])`` sorted by (hi, lo); the raw buffers are released."""
        d = np.frombuffer(bytes(self.buf), dtype=np.dtype([("hi", ">u8"), ("lo", ">u8")]))
        self.buf = bytearray()
        hi, lo = d["hi"].astype(np.uint64), d["lo"].astype(np.uint64)
        del d
        order = np.lexsort((lo, hi))
        tags = [np.frombuffer(t, dtype=np.int64)[order] if len(t) else np.empty(0, np.int64) for t in self.tags]
        self.tags = []
        return hi[order], lo[order], tags


def _member(ah: np.ndarray, al: np.ndarray, bh: np.ndarray, bl: np.ndarray) -> np.ndarray:
    """For each (ah, al), whether it occurs in (bh, bl) (sorted by (hi, lo)); bool [len(ah)]."""
    start = np.searchsorted(bh, ah, side="left")
    stop = np.searchsorted(bh, ah, side="right")
    found = np.zeros(len(ah), dtype=bool)
    single = stop - start == 1
    idx = start[single]
    found[single] = bl[idx] == al[single]
    for k in np.nonzero(stop - start > 1)[0]:  # equal high halves: compare the low halves one by one
        found[k] = bool((bl[start[k]:stop[k]] == al[k]).any())
    return found


def _key_set(h: np.ndarray, lo: np.ndarray) -> set[bytes]:
    return {int(a).to_bytes(8, "big") + int(b).to_bytes(8, "big") for a, b in zip(h, lo, strict=True)}


def _few_raw(items: list[str], total: int) -> str:
    return ", ".join(items[:_FEW]) + (f" ... ({total} in all)" if total > _FEW else "")


def _resolve_shards(root_p: Path) -> tuple[int, dict[int, Path]]:
    if shard_dirs(root_p):
        n, by_index = single_n(root_p)
        present = {i: p for i, p in by_index.items() if is_run_dir(p)}
    elif is_run_dir(root_p):
        n, present = 1, {0: root_p}
    else:
        raise not_an_output(root_p)
    if not present:
        raise InputError(f"{root_p}: no shard has started yet (no shard-I-of-{n}/{META_DIR}/{RUN_FILE})")
    return n, present


LEGACY_MERGED = "merged"
"""Where earlier versions wrote the merge output: ``ROOT/merged``, inside the root (its rows then read twice)."""
ORDERED_MEMORY_LIMIT_MB = 1024
"""Default memory limit of ``merge --ordered``'s sort (DuckDB ``memory_limit``; it spills to disk beyond)."""
ORDERED_THREADS = 2
"""Threads of ``merge --ordered``'s sort (DuckDB ``threads``); each thread adds its own buffers."""


def legacy_merge_dir(root: str | Path) -> Path | None:
    """``ROOT/merged`` when it holds a merge output written there by an earlier version, else None."""
    p = Path(root) / LEGACY_MERGED
    if not is_run_dir(p):
        return None
    return p if "merged_from" in (OutputDir(p).manifest() or {}) else None


def merge_shards(root: str | Path, output: str | Path | None = None, *, part_rows: int = 0, ordered: bool = False,
                 memory_limit_mb: int = ORDERED_MEMORY_LIMIT_MB) -> dict[str, Any]:
    """Combine the shards of ``root`` into ``output`` (default ``ROOT.merged``) after verifying exactly-once.

    Reads the input named in the shards' ``run.json`` (which must agree and be unchanged since), validates
    it like the run does (:func:`pipeline.dataset.records.scan_input`, bad records rejected, with the shards'
    ``config["run"]`` id_field / query_field / max_query_chars / limit) and checks, by sorted id digests
    (module docstring), that every valid record has exactly one row across the shards. A root that is itself
    a run directory is treated as one shard. Rows are copied part by part (shard order, then part order),
    re-chunked to ``part_rows``, with schemas unified; the rejected records go to the merged
    ``rejected.jsonl``. With ``ordered`` the rows are written in input order (by ``input_index``): DuckDB sorts
    them out of core under ``memory_limit_mb`` (spilling to a hidden directory inside ``output``) into one
    temporary file, which is then cut into parts of ``part_rows`` rows.

    Args:
        root: the output root holding ``shard-I-of-N`` directories.
        output: merged directory, outside ``root``; an existing merge output there is replaced.
        part_rows: rows per merged part; 0 = ``config["run"]["part_rows"]`` of the shards (default 1000).
        ordered: write the rows sorted by ``input_index`` (the input's order).
        memory_limit_mb: DuckDB's ``memory_limit`` for the ordered sort, MiB.

    Returns:
        The merged ``manifest.json`` content: ``complete``, ``total_records``, ``rows``, ``rejected``,
        ``counts`` (rag_status / gen_status), ``n_shards``, ``merged_from``, ``misplaced``, ``created``.

    Raises:
        InputError: not an output root, mixed shard counts, shards of different inputs or limits, the input
            changed since the run, ``output`` inside ``root`` or a run directory that is not a merge output;
            with ``ordered``, a part without ``input_index`` (written by an earlier version) or with a null one.
        RunError: duplicate ids, missing records, ids not in the input (a few of each are listed), or an
            unreadable part; nothing is written then.
    """
    root_p = Path(root)
    if not root_p.is_dir():
        raise InputError(f"{root_p}: output directory not found")
    n, present = _resolve_shards(root_p)
    out = Path(output) if output is not None else default_merge_dir(root_p)
    if out.resolve() == root_p.resolve() or out.resolve().is_relative_to(root_p.resolve()):
        raise InputError(f"--output {out}: must be outside {root_p} (its rows would be read twice with the "
                         f"root's); e.g. the default {default_merge_dir(root_p)}")
    legacy = legacy_merge_dir(root_p)
    if legacy is not None:
        log.warning("%s holds a merge output written inside the root by an earlier version: readers of %s count "
                    "its rows twice; delete it or move it out (the merge now writes to %s)", legacy, root_p, out)
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

    # expected records: the run's own validation and partition (pipeline.dataset.records), bad records rejected
    from pipeline.dataset.records import iter_records, scan_input

    fields = {
        "id_field": id_field,
        "query_field": str(run_cfg.get("query_field") or "query"),
        "max_query_chars": int(run_cfg.get("max_query_chars") or 8000),
    }
    scan = scan_input(input_path, on_bad_record="skip", **fields)
    exp = _Digests(2)
    for rec in iter_records(scan, limit=limit, **fields):
        exp.add(rec.id, rec.index, rec.line)
    eh, el, (e_index, e_line) = exp.sorted()
    del exp

    # committed rows: only the id column, streamed
    shard_parts = {i: part_paths(p) for i, p in sorted(present.items())}
    got = _Digests(1)
    for i, parts in shard_parts.items():
        for batch in scan_batches(parts, ["id"]):
            got.add_many(batch.column(0).to_pylist(), i)
    sh, sl, (s_shard,) = got.sorted()
    del got
    rows = len(sh)

    if rows == len(eh) and np.array_equal(sh, eh) and np.array_equal(sl, el):
        misplaced = int(np.count_nonzero(e_index % n != s_shard))
    else:
        _raise_mismatch(root_p, n, present, shard_parts, scan, fields, limit, (eh, el, e_index, e_line),
                        (sh, sl, s_shard))
    total_records = len(eh)
    del eh, el, e_index, e_line, sh, sl, s_shard
    if misplaced:
        log.warning("%d rows are in another shard than index %% %d predicts", misplaced, n)

    # write
    rows_per_part = part_rows or int(run_cfg.get("part_rows") or 1000)
    all_parts = [p for parts in shard_parts.values() for p in parts]
    schema: pa.Schema | None = None
    if ordered:
        _require_duckdb()
    for part in all_parts:
        s = read_part_schema(part)
        if ordered:
            _require_index(part, s)
        if schema is None:
            schema = s
        elif not s.equals(schema):
            schema = pa.unify_schemas([schema, s], promote_options="permissive")
    migrate(out)  # a merge output of an earlier version: its names into .rag-pipeline/ before it is replaced
    dest = OutputDir(out, track_ids=False)
    dest.prepare(
        input_path=input_path,
        fingerprint=first["fingerprint"],
        shard=None,
        total_records=total_records,
        config=first.get("config") or {},
        overwrite=True,
    )
    merged_from = [str(p) for _, p in sorted(present.items())]
    # marks the directory as a merge output at once, so that a merge killed midway can be re-run over it
    dest.write_manifest({"complete": False, "merged_from": merged_from})
    buffer: list[pa.Table] = []
    buffered = 0
    stats = RowStats()
    if ordered:
        tables: Iterable[pa.Table] = _sorted_tables(all_parts, out, rows_per_part, memory_limit_mb)
    else:
        tables = (table for _, table in iter_tables_of_parts(all_parts))
    for table in tables:
        stats.add(table)
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
        "total_records": total_records,
        "rows": rows,
        "rejected": len(scan.rejected),
        "counts": stats.status_counts(),
        "n_shards": n,
        "merged_from": merged_from,
        "misplaced": misplaced,
        "ordered": ordered,
        "created": now(),
    }
    dest.write_manifest(manifest)
    return manifest


def _raise_mismatch(
    root_p: Path, n: int, present: dict[int, Path], shard_parts: dict[int, list[Path]], scan: Any,
    fields: dict[str, Any], limit: int, expected: tuple[np.ndarray, ...], got: tuple[np.ndarray, ...],
) -> None:
    """Name a few duplicate, missing and unknown ids (a second streamed pass over the ids), then raise."""
    from pipeline.dataset.records import iter_records

    eh, el, e_index, e_line = expected
    sh, sl, s_shard = got
    # duplicates: adjacent equal digests among the sorted rows
    rep = np.nonzero((sh[1:] == sh[:-1]) & (sl[1:] == sl[:-1]))[0] + 1
    n_dups = len(rep)
    dup_keys = _key_set(sh[rep], sl[rep])
    unknown_mask = ~_member(sh, sl, eh, el)
    unknown_keys = _key_set(sh[unknown_mask], sl[unknown_mask])
    missing_mask = ~_member(eh, el, sh, sl)
    n_missing = int(np.count_nonzero(missing_mask))
    first_missing = np.sort(e_line[missing_mask])[:_FEW]
    missing_lines = {int(x) for x in first_missing}

    dups: list[str] = []
    unknown: list[str] = []
    first_shard: dict[bytes, int] = {}
    reported_unknown: set[bytes] = set()
    for i, parts in shard_parts.items():
        for batch in scan_batches(parts, ["id"]):
            for rid in batch.column(0).to_pylist():
                key = _digest(rid)
                if key in dup_keys:
                    if key in first_shard:
                        if len(dups) < _FEW:
                            dups.append(f"{rid!r} (shard-{first_shard[key]}-of-{n} and shard-{i}-of-{n})")
                    else:
                        first_shard[key] = i
                if key in unknown_keys and key not in reported_unknown and len(unknown) < _FEW:
                    reported_unknown.add(key)
                    unknown.append(f"{rid!r} (shard-{i}-of-{n})")
    missing: list[str] = []
    if missing_lines:
        for rec in iter_records(scan, limit=limit, **fields):
            if rec.line in missing_lines:
                missing.append(f"{rec.id!r} (line {rec.line}, shard {rec.index % n}/{n})")
                if len(missing) == len(missing_lines):
                    break
    problems = []
    if n_dups:
        problems.append(f"{n_dups} duplicate ids: {_few_raw(dups, n_dups)}")
    if n_missing:
        absent = [f"shard-{i}-of-{n}" for i in range(n) if i not in present]
        note = f" [no output dir for {', '.join(absent)}]" if absent else ""
        problems.append(f"{n_missing} input records have no row{note}: {_few_raw(missing, n_missing)}")
    if unknown_keys:
        problems.append(f"{len(unknown_keys)} ids are not in the input: {_few_raw(unknown, len(unknown_keys))}")
    raise RunError(f"merge of {root_p} failed: " + "; ".join(problems or ["row ids differ from the input's"]))


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


def _require_duckdb() -> None:
    """Raises RunError (one line) when DuckDB, which ``merge --ordered`` sorts with, is not installed."""
    try:
        import duckdb  # noqa: F401
    except ImportError:
        raise RunError("merge --ordered needs DuckDB, a dependency of rag-pipeline: pip install duckdb") from None


def _require_index(part: Path, schema: pa.Schema) -> None:
    """``merge --ordered`` needs every row's ``input_index``: refuse (before anything is written) a part without
    the column or with a null in it (read alone: 8 bytes a row of one part).

    Raises:
        InputError: the part was written by a version without ``input_index``.
        RunError: the part is unreadable.
    """
    import pyarrow.parquet as pq

    hint = "merge without --ordered, or run again with --overwrite to get it"
    if INDEX_COLUMN not in schema.names:
        raise InputError(f"--ordered: {part} has no {INDEX_COLUMN} column (written by an earlier version); {hint}")
    try:
        nulls = pq.read_table(part, columns=[INDEX_COLUMN]).column(0).null_count
    except (OSError, pa.ArrowException) as exc:
        raise RunError(f"{part}: cannot read committed part: {exc}") from None
    if nulls:
        raise InputError(f"--ordered: {part} has {nulls} rows without {INDEX_COLUMN} (written by an earlier "
                         f"version); {hint}")


def _sorted_tables(parts: list[Path], out: Path, rows_per_part: int, memory_limit_mb: int) -> Iterator[pa.Table]:
    """The rows of ``parts`` in ``input_index`` order, as tables of at most ``rows_per_part`` rows.

    DuckDB sorts out of core (``COPY (SELECT ... ORDER BY input_index) TO`` one Parquet file, under
    ``memory_limit`` with spill files in a hidden directory of ``out``); the sorted file is then read back one
    batch at a time, and deleted with the spill directory at the end. Disk: about the size of the rows twice.

    Raises:
        RunError: DuckDB failed (an unreadable part, the disk full).
    """
    import duckdb
    import pyarrow.parquet as pq

    from pipeline.output.reading import tmp_path

    work = out / ".ordered.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sorted_file = tmp_path(work / "sorted.parquet")
    files = [str(p) for p in parts]
    try:
        con = duckdb.connect(config={"memory_limit": f"{int(memory_limit_mb)}MB", "threads": ORDERED_THREADS,
                                     "temp_directory": str(work / "spill"), "preserve_insertion_order": True})
        try:
            src = "read_parquet($files, union_by_name = true)"
            target = str(sorted_file).replace("'", "''")
            con.execute(f"COPY (SELECT * FROM {src} ORDER BY {INDEX_COLUMN}) TO '{target}' "
                        f"(FORMAT parquet, ROW_GROUP_SIZE {max(1, int(rows_per_part))})", {"files": files})
        except duckdb.Error as exc:
            raise RunError(f"merge --ordered: the sort failed: {str(exc).splitlines()[0]}") from None
        finally:
            con.close()
        pf = pq.ParquetFile(sorted_file)
        try:
            for batch in pf.iter_batches(batch_size=max(1, int(rows_per_part))):
                yield pa.Table.from_batches([batch])
        finally:
            pf.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
