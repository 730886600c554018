"""Input records: validation of the whole JSONL file before any server starts, and streaming reads.

A record is one JSON object per line with a unique id (``run.id_field``) and a non-empty query
(``run.query_field``); every other field is passed through to the output row. Validation streams the file
(memory: the set of ids plus one type per extra field) and reports every problem as ``file:line: field ...``.
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

@dataclass(frozen=True)
class Record:
    """One valid input record.

    Attributes:
        index: 0-based position among the valid records of the file (the shard partition key).
        line: 1-based line number in the input file.
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
        path: the input file.
        n_valid: number of valid records.
        rejected: ``{"line": int, "error": str, "text": str}`` for each bad line (only with on_bad_record=skip).
        extra_types: output column name -> arrow type name ("string", "int64", "float64", "bool", "json").
    """

    path: Path
    n_valid: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    extra_types: dict[str, str] = field(default_factory=dict)
    rejected_lines: set[int] = field(default_factory=set)


def _json_type(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64"
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
    """Validate the whole input file (streaming) before any server starts.

    Args:
        path: input JSONL.
        on_bad_record: "fail" raises at the first bad line; "skip" collects bad lines in ``rejected``.

    Returns:
        InputScan with the count of valid records and the types of passthrough fields.

    Raises:
        InputError: missing/unreadable/empty file, or (on_bad_record="fail") the first bad line: malformed
            JSON, not an object, missing/empty id or query, duplicate id, non-UTF-8 bytes, a query longer
            than max_query_chars.
    """
    p = Path(path)
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
