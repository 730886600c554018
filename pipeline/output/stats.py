"""Statistics over committed rows, streamed: counts per status, latency percentiles, grouped errors.

Used by the run's manifest, ``status`` and ``merge``. Only the needed columns are read (never contexts or
generations), batch by batch (:func:`pipeline.output.reading.scan_batches`). Memory: the status and error
counters (bounded by :data:`MAX_ERROR_KINDS`) plus, for latency percentiles, 8 bytes per row and stage
(exact percentiles need every value: 24 MB per million rows).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.output.reading import scan_batches
from pipeline.output.schema import ERROR_COLUMNS, LATENCY_COLUMNS, STATUS_COLUMNS

#: distinct error messages kept by the manifest's error grouping; beyond it the rarest are folded into
#: ``"(other errors)"``.
MAX_ERROR_KINDS = 10_000
ERROR_CHARS = 200


def _add_value_counts(into: collections.Counter, col: pa.Array) -> None:
    for item in pc.value_counts(col).to_pylist():
        key = "null" if item["values"] is None else str(item["values"])
        into[key] += item["counts"]


def sorted_counts(counter: collections.Counter | dict) -> dict[str, int]:
    """A count mapping as a plain dict sorted by key."""
    return dict(sorted(counter.items()))


def percentiles(values: np.ndarray) -> dict[str, float | None]:
    """``{"p50", "p95", "p99", "n"}`` of ``values`` (float64 [n], NaN-free), rounded to 3 decimals.

    Percentiles by linear interpolation (numpy.percentile's default).
    """
    if values.size == 0:
        return {"p50": None, "p95": None, "p99": None, "n": 0}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "n": int(values.size)}


class ErrorGroups:
    """The manifest's error grouping, accumulated batch by batch in bounded memory.

    An error is ``"<column>: <first ERROR_CHARS characters>"`` of a non-empty ``rag_error`` / ``gen_error``
    value; identical keys are counted together. At most :data:`MAX_ERROR_KINDS` distinct keys are held: past
    it the rarest are folded into one ``"(other errors)"`` count (so a key's count is exact unless it was
    folded away once). Memory: at most ``MAX_ERROR_KINDS`` keys of up to ``ERROR_CHARS`` characters.
    """

    def __init__(self) -> None:
        self.errors: collections.Counter[str] = collections.Counter()
        self.other_errors = 0

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Count the errors of one batch holding the :data:`ERROR_COLUMNS` (a column it lacks is skipped)."""
        names = set(batch.column_names)
        for c in ERROR_COLUMNS:
            if c not in names:
                continue
            col = pc.drop_null(batch.column(c))
            if not len(col):
                continue
            col = pc.filter(col, pc.not_equal(col, ""))
            if len(col):
                short = pc.utf8_slice_codeunits(col, 0, ERROR_CHARS)
                for item in pc.value_counts(short).to_pylist():
                    self.errors[f"{c}: {item['values']}"] += item["counts"]
        if len(self.errors) > MAX_ERROR_KINDS:
            keep = self.errors.most_common(MAX_ERROR_KINDS // 2)
            self.other_errors += sum(self.errors.values()) - sum(n for _, n in keep)
            self.errors = collections.Counter(dict(keep))

    def total(self) -> int:
        """Rows-with-error counted (one per non-empty error value), the folded ones included."""
        return sum(self.errors.values()) + self.other_errors

    def groups(self, k: int = 50) -> list[dict[str, Any]]:
        """The ``k`` most frequent errors as ``{"error": "<column>: <first 200 chars>", "count": n}``, then
        ``{"error": "(other errors)", "count": n}`` if any were folded."""
        groups = [{"error": e, "count": c} for e, c in self.errors.most_common(k)]
        if self.other_errors:
            groups.append({"error": "(other errors)", "count": self.other_errors})
        return groups


class RowStats:
    """Accumulates statistics over record batches of committed rows.

    Args:
        detail: also collect latency values, grouped errors and model ids (the manifest); False = row and
            status counts only (status, merge).
    """

    def __init__(self, *, detail: bool = False) -> None:
        self.detail = detail
        self.rows = 0
        self.counts: dict[str, collections.Counter] = {c: collections.Counter() for c in STATUS_COLUMNS}
        self.grouped_errors = ErrorGroups()
        self.models: set[str] = set()
        self._latency: dict[str, list[np.ndarray]] = {k: [] for k in LATENCY_COLUMNS}

    @property
    def columns(self) -> list[str]:
        """Columns a scan must project for this accumulator."""
        cols = list(STATUS_COLUMNS)
        if self.detail:
            cols += list(LATENCY_COLUMNS.values()) + list(ERROR_COLUMNS) + ["model"]
        return cols

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Add one batch holding (at least) :attr:`columns`."""
        self.rows += batch.num_rows
        names = set(batch.column_names)
        for c in STATUS_COLUMNS:
            if c in names:
                _add_value_counts(self.counts[c], batch.column(c))
        if not self.detail:
            return
        for stage, c in LATENCY_COLUMNS.items():
            col = pc.drop_null(batch.column(c))
            if len(col):
                self._latency[stage].append(col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False))
        self.grouped_errors.add(batch)
        for m in pc.unique(pc.drop_null(batch.column("model"))).to_pylist():
            if m:
                self.models.add(m)

    def status_counts(self) -> dict[str, dict[str, int]]:
        """``{"rag_status": {value: rows}, "gen_status": {...}}`` sorted by value (``"null"`` = missing)."""
        return {c: sorted_counts(self.counts[c]) for c in STATUS_COLUMNS}

    def latency_ms(self) -> dict[str, dict[str, float | None]]:
        """Per stage (retrieve, rag_llm, generate): :func:`percentiles` of the non-null values, in ms."""
        out = {}
        for stage, chunks in self._latency.items():
            out[stage] = percentiles(np.concatenate(chunks) if chunks else np.empty(0))
        return out

    def error_groups(self, k: int = 50) -> list[dict[str, Any]]:
        """The ``k`` most frequent errors (:meth:`ErrorGroups.groups`)."""
        return self.grouped_errors.groups(k)


def scan_stats(parts: list[Path], *, detail: bool = False) -> RowStats:
    """:class:`RowStats` of the given committed parts, in one streamed, column-projected scan.

    Raises:
        RunError: a part is unreadable.
    """
    stats = RowStats(detail=detail)
    for batch in scan_batches(parts, stats.columns):
        stats.add(batch)
    return stats
