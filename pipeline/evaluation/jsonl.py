"""Reading small JSONL side files (queries, references) with errors that name the file and line.

The run's own input is read by :mod:`pipeline.dataset.records` (streaming, sharding, bad-record policy); this is for the
evaluation commands' files, each one JSON object a line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import InputError


def iter_json_objects(path: str | Path, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, object)`` for every non-blank line of a JSONL file, ``where`` = ``"<path>:<line>"``.

    A UTF-8 byte order mark on the first line is accepted. Streams the file (one line in memory).

    Args:
        path: the JSONL file.
        what: what the file holds, for the error of a missing file (e.g. "queries file").

    Raises:
        pipeline.errors.InputError: the file cannot be opened, a line is not UTF-8, not valid JSON or not a JSON
            object (message ``<path>:<line>: ...``).
    """
    p = Path(path)
    try:
        fh = p.open("rb")
    except OSError as exc:
        raise InputError(f"{p}: cannot read {what}: {exc.strerror or exc}") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{where}: expected a JSON object")
            yield where, rec
