"""Statistics over committed rows, streamed: counts per status, latency percentiles, grouped errors, token usage.

Used by the run's manifest, ``status`` and ``merge``. Only the needed columns are read (never the passage texts
or generations), batch by batch (:func:`pipeline.output.reading.scan_batches`). Memory: the status and error
counters (bounded by :data:`MAX_ERROR_KINDS`) plus, for latency percentiles, 8 bytes per row and stage
(exact percentiles need every value: 24 MB per million rows); token sums and finish-reason counts are a few
numbers per stage. Parts written before the token columns existed count as rows without usage.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.llm.usage import FINISH_LENGTH
from pipeline.output.reading import scan_batches
from pipeline.output.schema import (
    ERROR_COLUMNS,
    LATENCY_COLUMNS,
    STAGE_LATENCY_COLUMNS,
    STAGE_MAX_TOKENS_SETTING,
    STAGE_USAGE_COLUMNS,
    STATUS_COLUMNS,
    USAGE_COLUMNS,
)

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
        detail: also collect latency values, grouped errors, model ids and token usage (the manifest); False =
            row and status counts only (status, merge).
    """

    def __init__(self, *, detail: bool = False) -> None:
        self.detail = detail
        self.rows = 0
        self.counts: dict[str, collections.Counter] = {c: collections.Counter() for c in STATUS_COLUMNS}
        self.grouped_errors = ErrorGroups()
        self.models: set[str] = set()
        self._latency: dict[str, list[np.ndarray]] = {k: [] for k in LATENCY_COLUMNS}
        self._usage = {stage: _StageUsage() for stage in STAGE_USAGE_COLUMNS}

    @property
    def columns(self) -> list[str]:
        """Columns a scan must project for this accumulator."""
        cols = list(STATUS_COLUMNS)
        if self.detail:
            cols += list(LATENCY_COLUMNS.values()) + list(ERROR_COLUMNS) + ["model"] + list(USAGE_COLUMNS)
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
        for stage, (prompt, completion, finish) in STAGE_USAGE_COLUMNS.items():
            if completion in names:
                self._usage[stage].add(batch.column(prompt), batch.column(completion), batch.column(finish),
                                       batch.column(STAGE_LATENCY_COLUMNS[stage]))

    def status_counts(self) -> dict[str, dict[str, int]]:
        """``{"rag_status": {value: rows}, "gen_status": {...}}`` sorted by value (``"null"`` = missing)."""
        return {c: sorted_counts(self.counts[c]) for c in STATUS_COLUMNS}

    def latency_ms(self) -> dict[str, dict[str, float | None]]:
        """Per stage (retrieve, rag_llm, generate): :func:`percentiles` of the non-null values, in ms."""
        out = {}
        for stage, chunks in self._latency.items():
            out[stage] = percentiles(np.concatenate(chunks) if chunks else np.empty(0))
        return out

    def token_report(self) -> dict[str, dict[str, Any]]:
        """Per LLM stage (``rag``, ``gen``): token totals, tokens per second of request time, finish reasons.

        Returns:
            ``{stage: {"prompt_tokens": int, "completion_tokens": int, "rows_with_usage": int,
            "request_completion_tokens_per_s": float | None, "finish_reasons": {reason: rows},
            "hit_max_tokens": int, "max_tokens_setting": "rag.max_tokens" | "generation.max_tokens"}}``.
            ``request_completion_tokens_per_s`` = completion tokens / seconds of the stage's requests (the
            ``rag_llm_ms`` / ``generate_ms`` of the same rows: the speed one request sees, queueing and
            prefill included); ``hit_max_tokens`` = replies with finish_reason ``"length"``.
        """
        return {stage: u.report(STAGE_MAX_TOKENS_SETTING[stage]) for stage, u in self._usage.items()}

    def error_groups(self, k: int = 50) -> list[dict[str, Any]]:
        """The ``k`` most frequent errors (:meth:`ErrorGroups.groups`)."""
        return self.grouped_errors.groups(k)


class _StageUsage:
    """Token sums and finish-reason counts of one LLM stage over record batches."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.rows_with_usage = 0
        self.timed_tokens = 0  # completion tokens of rows that also have the stage's latency
        self.timed_ms = 0.0
        self.finish: collections.Counter[str] = collections.Counter()

    def add(self, prompt: pa.Array, completion: pa.Array, finish: pa.Array, latency_ms: pa.Array) -> None:
        self.prompt_tokens += int(pc.sum(prompt).as_py() or 0)
        self.completion_tokens += int(pc.sum(completion).as_py() or 0)
        self.rows_with_usage += len(completion) - completion.null_count
        timed = pc.and_(pc.is_valid(completion), pc.is_valid(latency_ms))
        self.timed_tokens += int(pc.sum(pc.filter(completion, timed)).as_py() or 0)
        self.timed_ms += float(pc.sum(pc.filter(latency_ms, timed)).as_py() or 0.0)
        reasons = pc.drop_null(finish)
        if len(reasons):
            _add_value_counts(self.finish, reasons)

    def report(self, setting: str) -> dict[str, Any]:
        per_s = self.timed_tokens / (self.timed_ms / 1000.0) if self.timed_ms > 0 else None
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "rows_with_usage": self.rows_with_usage,
            "request_completion_tokens_per_s": round(per_s, 3) if per_s is not None else None,
            "finish_reasons": sorted_counts(self.finish),
            "hit_max_tokens": self.finish.get(FINISH_LENGTH, 0),
            "max_tokens_setting": setting,
        }


CONTEXT_ADVICE = ("raise the model's context window (servers.n_ctx on the CPU default, per slot; the server's own "
                  "context length with --endpoints) or rag.context_chars if set, or retrieve fewer or smaller "
                  "passages (retrieval.top_k, ingest.chunk_chars)")
"""What to change when contexts were cut: the settings that decide how many passages fit a prompt."""


def context_report(parts: list[Path]) -> dict[str, Any]:
    """How many retrieved passages reached the model, over the rows that say it (``contexts_used`` not null).

    Reads only ``contexts_used`` and the smallest leaf of ``contexts`` (its ``score``: the list lengths), part by
    part, never the passage texts. Parts written before ``contexts_used`` existed count as rows without it.

    Returns:
        ``{"rows_with_contexts_used": int, "cut": int, "passages_retrieved": int, "passages_used": int,
        "advice": str}``: ``cut`` = rows whose ``contexts_used`` < the number of their ``contexts`` (the
        context was cut to fit the model's window or ``rag.context_chars``); ``passages_*`` summed over the rows
        that say it; ``advice``: :data:`CONTEXT_ADVICE`.

    Raises:
        RunError: a part is unreadable.
    """
    import pyarrow.parquet as pq

    from pipeline.errors import RunError

    rows = cut = retrieved = used = 0
    for part in parts:
        try:
            pf = pq.ParquetFile(part)
            try:
                if "contexts_used" not in pf.schema_arrow.names:
                    continue
                for batch in pf.iter_batches(columns=["contexts_used", "contexts.list.element.score"],
                                             use_threads=False):
                    n_used = batch.column("contexts_used")
                    n_ctx = pc.fill_null(pc.list_value_length(batch.column("contexts")), 0)
                    known = pc.is_valid(n_used)
                    n_used, n_ctx = pc.filter(n_used, known), pc.filter(n_ctx, known)
                    rows += len(n_used)
                    cut += int(pc.sum(pc.less(n_used, n_ctx)).as_py() or 0)
                    retrieved += int(pc.sum(n_ctx).as_py() or 0)
                    used += int(pc.sum(n_used).as_py() or 0)
            finally:
                pf.close()
        except (OSError, pa.ArrowException) as exc:
            raise RunError(f"{part}: cannot read committed part: {exc}") from None
    return {"rows_with_contexts_used": rows, "cut": cut, "passages_retrieved": retrieved, "passages_used": used,
            "advice": CONTEXT_ADVICE}


def scan_stats(parts: list[Path], *, detail: bool = False) -> RowStats:
    """:class:`RowStats` of the given committed parts, in one streamed, column-projected scan.

    Raises:
        RunError: a part is unreadable.
    """
    stats = RowStats(detail=detail)
    for batch in scan_batches(parts, stats.columns):
        stats.add(batch)
    return stats
