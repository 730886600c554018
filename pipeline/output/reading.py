"""Reading committed rows: part discovery and streamed, column-projected scans (pyarrow.dataset).

Only files matching ``part-NNNNN.parquet`` exactly are committed rows. Everything else a run, a retry or a merge
writes into an output directory lives in its hidden ``.rag-pipeline/`` folder (:mod:`pipeline.output.layout`), or
is a temporary file ``.NAME.tmp`` (:data:`TMP_PREFIX`), so that each record reads exactly once with
``pyarrow.parquet.read_table(D)``, ``pandas.read_parquet(D)``, ``duckdb.read_parquet('D/**/*.parquet')`` and
``datasets.load_dataset('parquet', data_dir=D)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.errors import InputError, RunError
from pipeline.output.layout import META_DIR, RUN_FILE, locate
from pipeline.output.schema import COLUMN_TYPES
from pipeline.output.sharding import shard_dirs

PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
#: prefix of a file being written (``.NAME.tmp``, renamed to ``NAME`` when complete): hidden from every reader.
TMP_PREFIX = "."


def tmp_path(dest: str | Path) -> Path:
    """Where ``dest`` is written before it is renamed into place: ``.NAME.tmp`` beside it (hidden from
    pyarrow, pandas, DuckDB and datasets alike: see the module docstring)."""
    d = Path(dest)
    return d.with_name(f"{TMP_PREFIX}{d.name}.tmp")
#: rows per scanned batch (bounded memory of a scan: about this many rows of the projected columns times the
#: scan's read-ahead).
SCAN_BATCH_ROWS = 65_536


def part_paths(path: str | Path) -> list[Path]:
    """Committed part files of one run directory, in index order (``.tmp`` files are never included)."""
    d = Path(path)
    if not d.is_dir():
        return []
    parts = [(int(m.group(1)), p) for p in d.iterdir() if (m := PART_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(parts)]


def is_run_dir(path: str | Path) -> bool:
    """True if ``path`` holds a ``.rag-pipeline/run.json`` (a run or shard directory; an earlier version's
    ``_run.json`` counts too: :func:`pipeline.output.layout.locate`)."""
    return locate(path, RUN_FILE).is_file()


def not_an_output(path: str | Path) -> InputError:
    """The error for a directory that is neither a run directory nor a root of shard directories."""
    return InputError(f"{path}: not a rag-pipeline output (no {META_DIR}/{RUN_FILE} and no shard-I-of-N directories)")


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
        raise not_an_output(p)
    return shards


def read_part_footer(part: Path) -> pq.FileMetaData:
    """The Parquet footer of one committed part (schema and row count, no data read).

    Raises:
        RunError: the part is unreadable.
    """
    try:
        return pq.read_metadata(part)
    except (OSError, pa.ArrowException) as exc:
        raise RunError(f"{part}: cannot read committed part: {exc}") from None


def read_part_schema(part: Path) -> pa.Schema:
    """Arrow schema of one committed part, with its metadata (from :func:`read_part_footer`).

    Raises:
        RunError: the part is unreadable.
    """
    return read_part_footer(part).schema.to_arrow_schema()


def _raise_unreadable(parts: list[Path], columns: list[str], exc: Exception) -> None:
    """Name the part a failed scan tripped on (reads parts one by one), else re-raise as RunError."""
    for part in parts:
        try:
            names = set(pq.read_schema(part).names)
            pq.read_table(part, columns=[c for c in columns if c in names])
        except (OSError, pa.ArrowException) as exc2:
            raise RunError(f"{part}: cannot read committed part: {exc2}") from None
    raise RunError(f"cannot scan committed parts: {exc}") from None


def scan_batches(
    parts: list[Path], columns: list[str], types: dict[str, pa.DataType] | None = None,
    *, batch_rows: int = SCAN_BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """Stream the given columns of committed parts, batch by batch (pyarrow.dataset scan, parts in order).

    Memory is bounded by the batch size and the scan's read-ahead, independent of the number of rows. A
    part lacking a column gives nulls for it.

    Args:
        parts: committed part files (e.g. :func:`part_paths`).
        columns: columns to project; a column that is not a fixed row column needs its type in ``types``.
        types: Arrow types of non-fixed (passthrough) columns.
        batch_rows: maximum rows per yielded batch.

    Yields:
        RecordBatch with exactly ``columns``.

    Raises:
        RunError: a part is unreadable (the message names it) or a column cannot be cast to its type.
    """
    if not parts:
        return
    all_types = {**COLUMN_TYPES, **(types or {})}
    schema = pa.schema([(c, all_types[c]) for c in columns])
    try:
        dataset = ds.dataset([str(p) for p in parts], schema=schema, format="parquet")
        yield from dataset.to_batches(columns=columns, batch_size=batch_rows)
    except (OSError, pa.ArrowException) as exc:
        _raise_unreadable(parts, columns, exc)


def iter_part_batches(
    parts: Iterable[Path], columns: list[str], types: dict[str, pa.DataType] | None = None,
    *, batch_rows: int = SCAN_BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """Stream the given columns of committed parts, batch by batch, one part open at a time.

    Same batches as :func:`scan_batches` (exactly ``columns``, cast to their types; a part lacking a column
    gives nulls for it), without pyarrow.dataset: a dataset scan keeps per-fragment state for every part it
    has read (~90 KB of RSS per part, measured by bench/report_memory.py) and its threaded read-ahead can
    buffer far ahead of a slow consumer. Here memory is one batch (at most ``batch_rows`` rows) of the
    projected columns, whatever the number of parts or rows; a batch never spans two parts.

    Args:
        parts: committed part files, read in this order.
        columns: columns to project; a column that is not a fixed row column needs its type in ``types``.
        types: Arrow types of non-fixed columns.
        batch_rows: maximum rows per yielded batch.

    Yields:
        RecordBatch with exactly ``columns``.

    Raises:
        RunError: a part is unreadable (the message names it) or a column cannot be cast to its type.
    """
    all_types = {**COLUMN_TYPES, **(types or {})}
    schema = pa.schema([(c, all_types[c]) for c in columns])
    for part in parts:
        try:
            pf = pq.ParquetFile(part)
        except (OSError, pa.ArrowException) as exc:
            raise RunError(f"{part}: cannot read committed part: {exc}") from None
        try:
            names = set(pf.schema_arrow.names)
            present = [c for c in columns if c in names]
            read = present or pf.schema_arrow.names[:1]  # nothing projected is there: read one column for counts
            for batch in pf.iter_batches(columns=read, batch_size=batch_rows, use_threads=False):
                arrays = []
                for field in schema:
                    if field.name in names:
                        col = batch.column(field.name)
                        arrays.append(col if col.type == field.type else col.cast(field.type))
                    else:
                        arrays.append(pa.nulls(batch.num_rows, field.type))
                yield pa.RecordBatch.from_arrays(arrays, schema=schema)
        except (OSError, pa.ArrowException) as exc:
            raise RunError(f"{part}: cannot read committed part: {exc}") from None
        finally:
            pf.close()


def iter_part_tables(path: str | Path, columns: list[str] | None = None) -> Iterator[tuple[Path, pa.Table]]:
    """Yield ``(part_path, table)`` for every committed part of a run dir or a sharded root, one at a time.

    Args:
        path: a run directory or a root holding ``shard-I-of-N`` directories.
        columns: read only these columns (those a part lacks are skipped, not an error).

    Raises:
        InputError: ``path`` is not an output directory.
        RunError: a committed part is unreadable.
    """
    yield from iter_tables_of_parts((p for d in run_dirs(path) for p in part_paths(d)), columns)


def iter_tables_of_parts(parts: Iterable[Path], columns: list[str] | None = None) -> Iterator[tuple[Path, pa.Table]]:
    """Yield ``(part_path, table)`` for the given part files, one part in memory at a time.

    Raises:
        RunError: a part is unreadable.
    """
    for part in parts:
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

    This materialises every row it reads: for tests, examples and small outputs. The pipeline itself
    (manifest, status, merge) streams with :func:`scan_batches`. Parts with slightly different schemas
    (e.g. a passthrough field all-null in one part) are unified with permissive type promotion.

    Args:
        path: a run directory or a root holding ``shard-I-of-N`` directories.
        columns: optional subset of columns to read.

    Returns:
        The rows; an empty table with a string ``id`` column if nothing is committed yet.

    Raises:
        InputError: ``path`` is not an output directory.
        RunError: a committed part is unreadable or the parts' schemas cannot be unified.
    """
    parts = [p for d in run_dirs(path) for p in part_paths(d)]
    tables = [t for _, t in iter_tables_of_parts(parts, columns)]
    if not tables:
        return pa.table({"id": pa.array([], pa.string())})
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as exc:
        raise RunError(f"{path}: committed parts have incompatible schemas: {exc}") from None
