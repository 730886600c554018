"""Input records: validation of the whole input before any server starts, and streaming reads.

Two formats, same rules:

* **JSONL** (any other path): one JSON object per line.
* **Parquet** (a ``*.parquet`` file, or a directory of ``*.parquet`` parts read in sorted path order, e.g. a
  Hugging Face dataset or a Spark output): one record per row, streamed in record batches
  (:data:`PARQUET_BATCH_ROWS`); passthrough columns keep their Arrow types.

A record has a unique id (``run.id_field``, string or integer) and a non-empty query (``run.query_field``);
every other field is passed through to the output row. Validation streams the input (memory: the set of ids
plus one type per extra field) and reports every problem as ``file:line: field ...`` (``file:row N`` for
Parquet). A record's ``line`` is its 1-based line number (JSONL) or its 1-based row number over the whole
input (Parquet).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.output.schema import passthrough_name

log = logging.getLogger(__name__)

#: rows per record batch read from a Parquet input.
PARQUET_BATCH_ROWS = 4096

@dataclass(frozen=True)
class Record:
    """One valid input record.

    Attributes:
        index: 0-based position among the valid records of the input (the shard partition key).
        line: 1-based line number (JSONL) or row number over the whole input (Parquet).
        id: the record id as a string.
        query: the query text.
        extra: the other fields, under their output column names.
    """

    index: int
    line: int
    id: str
    query: str
    extra: dict[str, Any]


@dataclass
class InputScan:
    """Result of :func:`scan_input`.

    Attributes:
        path: the input file (or directory of Parquet parts).
        n_valid: number of valid records.
        rejected: ``{"line": int, "error": str, "text": str}`` for each bad line (only with on_bad_record=skip).
        extra_types: output column name -> JSONL type name ("string", "int64", "float64", "bool", "json") or,
            for Parquet, the column's Arrow type.
        rejected_lines: the ``line`` of every rejected record.
        format: "jsonl" or "parquet".
        files: the Parquet files, in read order (empty for JSONL).
    """

    path: Path
    n_valid: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    extra_types: dict[str, Any] = field(default_factory=dict)
    rejected_lines: set[int] = field(default_factory=set)
    format: str = "jsonl"
    files: list[Path] = field(default_factory=list)


def is_parquet_input(path: str | Path) -> bool:
    """True for a ``*.parquet`` file or a directory (of Parquet parts)."""
    p = Path(path)
    return p.is_dir() or p.suffix.lower() == ".parquet"


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _json_type(value: Any) -> str | None:
    """Column type name of a passthrough JSON value. An integer outside int64 makes the column "json" (stored as
    its JSON text, nothing lost) instead of failing the Parquet write."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64" if INT64_MIN <= value <= INT64_MAX else "json"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    return "json"


def _unify(a: str | None, b: str | None) -> str | None:
    if a is None or a == b:
        return b if a is None else a
    if b is None:
        return a
    if {a, b} == {"int64", "float64"}:
        return "float64"
    return "json"


def _parse_line(
    raw: bytes, lineno: int, path: Path, id_field: str, query_field: str, max_query_chars: int
) -> tuple[str, str, dict[str, Any]]:
    """Parse and check one line; raise InputError naming file:line and the field."""
    where = f"{path}:{lineno}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "\\u" in text:  # only JSON escapes can produce text that is not valid Unicode (lone surrogates)
        _check_unicode(obj, where)
    rid = obj.get(id_field)
    if rid is None or isinstance(rid, (dict, list, bool)) or (isinstance(rid, str) and not rid.strip()):
        raise InputError(f"{where}: field '{id_field}': missing or not a string/integer id")
    query = obj.get(query_field)
    if not isinstance(query, str) or not query.strip():
        raise InputError(f"{where}: field '{query_field}': missing or empty query")
    if len(query) > max_query_chars:
        raise InputError(
            f"{where}: field '{query_field}': query has {len(query)} characters (limit run.max_query_chars="
            f"{max_query_chars})"
        )
    extra = {passthrough_name(k): v for k, v in obj.items() if k not in (id_field, query_field)}
    return str(rid), query, extra


def _check_unicode(value: Any, where: str, field: str | None = None) -> None:
    """Raise InputError naming the field if a string (key or value, nested too) holds a lone surrogate
    (``"\\ud800"`` in JSON): valid JSON, but not Unicode, so it can be neither sent to a server nor stored."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"{where}: field '{field}': not valid Unicode (lone surrogate "
                             f"{value[exc.start]!r} at character {exc.start})") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, where, field or k)
            _check_unicode(v, where, field or k)
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v, where, field)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without newline) of every non-blank line."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise InputError(f"{path}: input file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read input: {exc.strerror}") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark (Windows editors write one)
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield lineno, raw


def scan_input(
    path: str | Path,
    *,
    id_field: str = "id",
    query_field: str = "query",
    max_query_chars: int = 8000,
    on_bad_record: str = "fail",
) -> InputScan:
    """Validate the whole input (streaming) before any server starts.

    Args:
        path: input JSONL, a ``*.parquet`` file or a directory of ``*.parquet`` parts.
        on_bad_record: "fail" raises at the first bad line; "skip" collects bad lines in ``rejected``.

    Returns:
        InputScan with the count of valid records and the types of passthrough fields.

    Raises:
        InputError: missing/unreadable/empty file, or (on_bad_record="fail") the first bad line: malformed
            JSON, not an object, missing/empty id or query, duplicate id, non-UTF-8 bytes, a query longer
            than max_query_chars; for Parquet also an unreadable file or a missing / mistyped id or query
            column (always fatal: no record could be valid).
    """
    p = Path(path)
    if is_parquet_input(p):
        return _scan_parquet(p, id_field, query_field, max_query_chars, on_bad_record)
    scan = InputScan(path=p)
    seen: dict[str, int] = {}
    for lineno, raw in _lines(p):
        try:
            rid, _query, extra = _parse_line(raw, lineno, p, id_field, query_field, max_query_chars)
            if rid in seen:
                raise InputError(f"{p}:{lineno}: field '{id_field}': duplicate id {rid!r} (first on line {seen[rid]})")
        except InputError as exc:
            if on_bad_record == "fail":
                raise
            scan.rejected.append({"line": lineno, "error": str(exc), "text": raw.decode("utf-8", "replace")})
            scan.rejected_lines.add(lineno)
            continue
        seen[rid] = lineno
        scan.n_valid += 1
        for k, v in extra.items():
            scan.extra_types[k] = _unify(scan.extra_types.get(k), _json_type(v))  # type: ignore[assignment]
    if scan.n_valid == 0:
        reason = f" ({len(scan.rejected)} bad lines)" if scan.rejected else ""
        raise InputError(f"{p}: no valid records{reason}")
    scan.extra_types = {k: (v or "string") for k, v in scan.extra_types.items()}
    return scan


def iter_records(
    scan: InputScan,
    *,
    id_field: str = "id",
    query_field: str = "query",
    max_query_chars: int = 8000,
    limit: int = 0,
    shard: tuple[int, int] | None = None,
) -> Iterator[Record]:
    """Stream the valid records of a scanned input, in input order (bounded memory).

    A record's ``index`` is known without parsing it (blank and rejected lines are skipped by number), so
    with ``shard`` the lines of other shards are read but never parsed.

    Args:
        scan: :func:`scan_input` of the input.
        limit: stop before index ``limit`` (0 = no limit).
        shard: ``(i, n)``: only records with ``index % n == i``.
    """
    if scan.format == "parquet":
        yield from _iter_parquet(scan, id_field, query_field, limit, shard)
        return
    index = 0
    for lineno, raw in _lines(scan.path):
        if lineno in scan.rejected_lines:
            continue
        if limit and index >= limit:
            return
        if shard is None or index % shard[1] == shard[0]:
            rid, query, extra = _parse_line(raw, lineno, scan.path, id_field, query_field, max_query_chars)
            yield Record(index=index, line=lineno, id=rid, query=query, extra=extra)
        index += 1


# ---------------------------------------------------------------------------------------------
# Parquet input


def _parquet_files(p: Path) -> list[Path]:
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
        if not files:
            raise InputError(f"{p}: directory holds no *.parquet files")
        return files
    if not p.exists():
        raise InputError(f"{p}: input file not found")
    return [p]


def _parquet_schema(files: list[Path], id_field: str, query_field: str) -> Any:
    """Unified schema of the files; checks the id and query columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = []
    for f in files:
        try:
            schemas.append(pq.read_schema(f))
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{f}: not a readable Parquet file: {exc}") from None
    try:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except pa.ArrowException as exc:
        raise InputError(f"{files[0].parent}: Parquet parts have incompatible schemas: {exc}") from None
    for name, ok, what in (
        (id_field, lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t),
         "a string or integer"),
        (query_field, lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "a string"),
    ):
        if name not in schema.names:
            raise InputError(f"{files[0]}: no column '{name}' (columns: {', '.join(schema.names)})")
        t = schema.field(name).type
        if not ok(t):
            raise InputError(f"{files[0]}: column '{name}': type {t}, expected {what}")
    return schema


def _parquet_batches(files: list[Path], schema: Any) -> Iterator[tuple[Path, int, Any]]:
    """(file, 1-based row number of the batch's first row in that file, RecordBatch conformed to ``schema``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        row = 1
        try:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                if not batch.schema.equals(schema, check_metadata=False):
                    cols = [batch.column(n).cast(t) if n in batch.schema.names else pa.nulls(batch.num_rows, t)
                            for n, t in zip(schema.names, schema.types, strict=True)]
                    batch = pa.RecordBatch.from_arrays(cols, schema=schema)
                yield f, row, batch
                row += batch.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{f}: cannot read Parquet input at row {row}: {exc}") from None


def _bad_rows(batch: Any, id_field: str, query_field: str, max_query_chars: int) -> dict[int, str]:
    """Row offset -> problem for the rows of ``batch`` that fail the per-row checks (vectorised)."""
    import numpy as np
    import pyarrow.compute as pc

    bad: dict[int, str] = {}
    invalid = _invalid_utf8_rows(batch)
    ids = _without_rows(batch.column(id_field), invalid)
    query = _without_rows(batch.column(query_field), invalid)
    id_str = ids.cast("string")
    id_blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(id_str)), 0), True)
    q_len = pc.utf8_length(query)
    q_blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(query)), 0), True)
    q_long = pc.fill_null(pc.greater(q_len, max_query_chars), False)
    for k in np.nonzero(q_long.to_numpy(zero_copy_only=False))[0]:
        bad[int(k)] = (f"field '{query_field}': query has {q_len[int(k)].as_py()} characters "
                       f"(limit run.max_query_chars={max_query_chars})")
    for k in np.nonzero(q_blank.to_numpy(zero_copy_only=False))[0]:
        bad[int(k)] = f"field '{query_field}': missing or empty query"
    for k in np.nonzero(id_blank.to_numpy(zero_copy_only=False))[0]:
        bad[int(k)] = f"field '{id_field}': missing or not a string/integer id"
    bad.update(invalid)
    return bad


def _without_rows(col: Any, rows: dict[int, str]) -> Any:
    """``col`` with the given rows set to null (so vectorised string kernels never see invalid UTF-8)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if not rows or not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return col
    mask = np.zeros(len(col), dtype=bool)
    mask[list(rows)] = True
    binary = pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary()
    return pc.if_else(pa.array(mask), pa.scalar(None, binary), col.cast(binary)).cast(col.type)


def _invalid_utf8_rows(batch: Any) -> dict[int, str]:
    """Row offset -> problem for string cells that are not valid UTF-8 (a Parquet writer need not check)."""
    import pyarrow as pa

    out: dict[int, str] = {}
    for name, col in zip(batch.schema.names, batch.columns, strict=True):
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            continue
        try:
            col.validate(full=True)
        except pa.ArrowInvalid:
            raw = col.cast(pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary()).to_pylist()
            for k, v in enumerate(raw):
                if v is not None:
                    try:
                        v.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        out.setdefault(k, f"field '{name}': not valid UTF-8 (byte {exc.start}: "
                                          f"{v[exc.start:exc.start + 1]!r})")
    return out


def _row_text(batch: Any, k: int) -> str:
    try:
        return json.dumps(batch.slice(k, 1).to_pylist()[0], default=str, ensure_ascii=False)
    except UnicodeDecodeError:  # a cell that is not UTF-8: show the bytes
        import pyarrow as pa

        row = {n: (c.cast(pa.binary())[k].as_py().decode("utf-8", "replace") if pa.types.is_string(c.type)
                   and c[k].is_valid else c[k].as_py()) for n, c in zip(batch.schema.names, batch.columns, strict=True)}
        return json.dumps(row, default=repr, ensure_ascii=False)


def _scan_parquet(p: Path, id_field: str, query_field: str, max_query_chars: int, on_bad_record: str) -> InputScan:
    files = _parquet_files(p)
    schema = _parquet_schema(files, id_field, query_field)
    scan = InputScan(path=p, format="parquet", files=files)
    scan.extra_types = {passthrough_name(f.name): f.type for f in schema if f.name not in (id_field, query_field)}
    seen: dict[str, int] = {}
    line = 0  # global 1-based row number of the previous row
    for f, first_row, batch in _parquet_batches(files, schema):
        bad = _bad_rows(batch, id_field, query_field, max_query_chars)
        ids = batch.column(id_field).cast("string").to_pylist()
        for k, rid in enumerate(ids):
            line += 1
            err = bad.get(k)
            if err is None and rid in seen:
                err = f"field '{id_field}': duplicate id {rid!r} (first at input row {seen[rid]})"
            if err is not None:
                msg = f"{f}:row {first_row + k}: {err}"
                if on_bad_record == "fail":
                    raise InputError(msg)
                scan.rejected.append({"line": line, "error": msg, "text": _row_text(batch, k)})
                scan.rejected_lines.add(line)
                continue
            seen[rid] = line
            scan.n_valid += 1
    if scan.n_valid == 0:
        reason = f" ({len(scan.rejected)} bad rows)" if scan.rejected else ""
        raise InputError(f"{p}: no valid records{reason}")
    return scan


def _iter_parquet(
    scan: InputScan, id_field: str, query_field: str, limit: int, shard: tuple[int, int] | None
) -> Iterator[Record]:
    """Records of a scanned Parquet input; rows of other shards are never converted to Python."""
    import numpy as np

    schema = _parquet_schema(scan.files, id_field, query_field)
    line = 0
    index = 0
    rejected = np.fromiter(sorted(scan.rejected_lines), dtype=np.int64)
    for _f, _first, batch in _parquet_batches(scan.files, schema):
        lines = np.arange(line + 1, line + 1 + batch.num_rows, dtype=np.int64)
        line += batch.num_rows
        valid = ~np.isin(lines, rejected) if len(rejected) else np.ones(batch.num_rows, dtype=bool)
        indices = index + np.cumsum(valid) - 1  # record index of each valid row
        index += int(valid.sum())
        keep = valid.copy()
        if limit:
            keep &= indices < limit
        if shard is not None:
            keep &= indices % shard[1] == shard[0]
        rows = np.nonzero(keep)[0]
        if len(rows):
            for k, row in zip(rows, batch.take(rows).to_pylist(), strict=True):
                rid = row.pop(id_field)
                query = row.pop(query_field)
                extra = {passthrough_name(name): v for name, v in row.items()}
                yield Record(index=int(indices[k]), line=int(lines[k]), id=str(rid), query=query, extra=extra)
        if limit and index >= limit:
            return


# ---------------------------------------------------------------------------------------------
# a scan shared by the shards of one input


def scan_input_cached(
    path: str | Path,
    cache_file: str | Path,
    fingerprint: dict[str, Any],
    *,
    id_field: str = "id",
    query_field: str = "query",
    max_query_chars: int = 8000,
    on_bad_record: str = "fail",
) -> InputScan:
    """:func:`scan_input`, reusing the result another shard of the same input already wrote to ``cache_file``.

    The shards of one input (``run --shard I/N``, array tasks) all need the same scan: the count of valid
    records, the rejected lines and the passthrough types. The first task to finish its scan writes it to
    ``cache_file`` (atomic); later tasks whose input fingerprint and record fields match load it instead of
    parsing the input again, so a task then parses only its own records (:func:`iter_records` with ``shard``).

    Args:
        cache_file: ``OUTPUT_ROOT/.rag-pipeline/input_scan.json``.
        fingerprint: :func:`pipeline.output.input_fingerprint` of ``path``.

    Raises:
        InputError: see :func:`scan_input`.
    """
    from pipeline.output.files import atomic_write_json

    p, cache = Path(path), Path(cache_file)
    key = {"input": str(p.expanduser().resolve()), "fingerprint": fingerprint, "id_field": id_field,
           "query_field": query_field, "max_query_chars": max_query_chars, "on_bad_record": on_bad_record}
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and data.get("key") == key:
        scan = InputScan(path=p, n_valid=int(data["n_valid"]), rejected=list(data["rejected"]),
                         rejected_lines={int(r["line"]) for r in data["rejected"]})
        if is_parquet_input(p):
            scan.format, scan.files = "parquet", _parquet_files(p)
            schema = _parquet_schema(scan.files, id_field, query_field)
            scan.extra_types = {passthrough_name(f.name): f.type for f in schema
                                if f.name not in (id_field, query_field)}
        else:
            scan.extra_types = dict(data["extra_types"])
        log.info("input scan of %s reused from %s", p, cache)
        return scan
    scan = scan_input(p, id_field=id_field, query_field=query_field, max_query_chars=max_query_chars,
                      on_bad_record=on_bad_record)
    types = {} if scan.format == "parquet" else scan.extra_types
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, {"key": key, "n_valid": scan.n_valid, "extra_types": types,
                                  "rejected": scan.rejected})
    except OSError as exc:
        log.warning("cannot write the input scan cache %s: %s", cache, exc)
    return scan
