"""What `rag-pipeline report` shows, aggregated from committed rows in one streamed scan, in fixed-size memory.

Only the columns the report needs are projected (statuses, errors, endpoint, the three latencies, model and, when
the parts have them, the token columns): ``contexts``, ``generation`` and ``query`` are never read. Every
structure has a size independent of the number of rows:

* latencies and token counts: :class:`LogHistogram` (fixed log-spaced bins; percentiles within 0.05 % of the
  exact value), one per column;
* statuses: counts per ``(rag_status, gen_status)`` pair; endpoints: counts per ``(endpoint, gen_status)``,
  at most :data:`MAX_ENDPOINTS` endpoints (the rarest folded into ``"(other endpoints)"``);
* errors: the manifest's grouping (:class:`pipeline.output.stats.ErrorGroups`, at most 10,000 kinds);
* throughput: rows per second of commit, from the parts' footers and mtimes (one entry per second in which a
  part was committed: at most one per part, ~1,000 for a million rows).

Commit time of a row = its part file's mtime. A row carries no time stamp of its own (its ``*_ms`` columns are
durations), and the run commits a part at least every 30 s (``RowWriter``), so the resolution is about 30 s;
a part rewritten by ``run --retry-failed`` counts at the time of that rewrite.
"""

from __future__ import annotations

import collections
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import RunError
from pipeline.output.reading import iter_part_batches, part_paths, read_part_footer, run_dirs
from pipeline.output.rundir import OutputDir
from pipeline.output.schema import ERROR_COLUMNS, LATENCY_COLUMNS, STATUS_COLUMNS
from pipeline.output.stats import ErrorGroups

#: token count columns (drawn when the parts have them), per stage.
TOKEN_COLUMNS = ("rag_prompt_tokens", "rag_completion_tokens", "gen_prompt_tokens", "gen_completion_tokens")
#: finish reason columns (drawn when the parts have them).
FINISH_COLUMNS = ("rag_finish_reason", "gen_finish_reason")
#: distinct endpoints kept; past it the rarest are folded into ``"(other endpoints)"``.
MAX_ENDPOINTS = 1_000
#: distinct finish reasons (per column) and model ids kept; past it new values are counted as ``"(other)"``.
MAX_VALUES = 100
OTHER_ENDPOINTS = "(other endpoints)"
#: candidate widths of a throughput bin, seconds (then whole days).
THROUGHPUT_WIDTHS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
NULL = "null"


class LogHistogram:
    """Counts of non-negative values in fixed log-spaced bins, with exact n / sum / min / max.

    Bin ``k`` holds ``[lo * ratio**k, lo * ratio**(k+1))``; values ``<= 0`` are counted apart (``zero``), as
    are values below ``lo`` (``below``) and at or above ``hi`` (``above``); NaN and null are skipped. A
    percentile is read as the geometric middle of the bin that holds the value of that rank, clamped to the
    exact [min, max], so its relative error is at most ``sqrt(ratio) - 1`` (0.05 % by default) for values in
    [lo, hi). Memory: ``ceil(log(hi / lo) / log(ratio))`` int64 counts (25,340, 198 KiB, by default).

    Args:
        lo: lower edge of the first bin (> 0, same unit as the values).
        hi: upper edge of the last bin (> lo).
        ratio: width of a bin as upper / lower edge (> 1).

    Raises:
        ValueError: invalid bounds.
    """

    def __init__(self, lo: float = 1e-3, hi: float = 1e8, ratio: float = 1.001) -> None:
        if not (lo > 0 and hi > lo and ratio > 1):
            raise ValueError(f"LogHistogram needs 0 < lo < hi and ratio > 1, got {lo}, {hi}, {ratio}")
        self.lo, self.hi, self.ratio = float(lo), float(hi), float(ratio)
        self._log_ratio = math.log(self.ratio)
        self.nbins = math.ceil(math.log(self.hi / self.lo) / self._log_ratio)
        self.counts = np.zeros(self.nbins, dtype=np.int64)
        self.zero = 0
        self.below = 0
        self.above = 0
        self.n = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, values: np.ndarray | pa.Array | pa.ChunkedArray) -> None:
        """Count ``values`` (numeric, any shape; NaN / null skipped)."""
        if isinstance(values, pa.Array | pa.ChunkedArray):
            values = pc.drop_null(values).to_numpy(zero_copy_only=False)
        v = np.asarray(values, dtype=np.float64).ravel()
        v = v[~np.isnan(v)]
        if not v.size:
            return
        self.n += int(v.size)
        self.sum += float(v.sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        pos = v[v > 0]
        self.zero += int(v.size - pos.size)
        inside = pos[(pos >= self.lo) & (pos < self.hi)]
        self.below += int((pos < self.lo).sum())
        self.above += int((pos >= self.hi).sum())
        if inside.size:
            idx = np.floor(np.log(inside / self.lo) / self._log_ratio).astype(np.int64)
            np.clip(idx, 0, self.nbins - 1, out=idx)
            self.counts += np.bincount(idx, minlength=self.nbins)

    @property
    def mean(self) -> float | None:
        """Exact mean, or None when empty."""
        return self.sum / self.n if self.n else None

    def _rep(self, k: int) -> float:
        """Representative value of bin ``k``: its geometric middle."""
        return self.lo * self.ratio ** (k + 0.5)

    def _value_at(self, rank: int, cum: np.ndarray) -> float:
        """Approximate value of the ``rank``-th smallest (0-based) counted value."""
        if rank < self.zero:
            rep = 0.0
        elif rank < self.zero + self.below:
            rep = self.lo / 2
        elif rank < self.zero + self.below + int(cum[-1]):
            k = int(np.searchsorted(cum, rank - self.zero - self.below, side="right"))
            rep = self._rep(k)
        else:
            rep = self.max  # above hi: only the largest value is known
        return min(max(rep, self.min), self.max)

    def percentiles(self, qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float | None]:
        """``{"p50": v, ...}`` for each q in ``qs`` (0-100), or None values when empty.

        Rank as numpy.percentile's default (linear): position ``q/100 * (n-1)`` in sorted order, interpolated
        between the two neighbouring ranks' values.
        """
        if not self.n:
            return {f"p{q:g}": None for q in qs}
        cum = np.cumsum(self.counts)
        out: dict[str, float | None] = {}
        for q in qs:
            pos = q / 100.0 * (self.n - 1)
            lo_r, frac = int(math.floor(pos)), pos - math.floor(pos)
            a = self._value_at(lo_r, cum)
            b = self._value_at(min(lo_r + 1, self.n - 1), cum) if frac else a
            out[f"p{q:g}"] = a + (b - a) * frac
        return out

    def summary(self) -> dict[str, float | int | None]:
        """``{"n", "min", "p50", "p95", "p99", "max", "mean", "sum"}`` (None values when empty)."""
        empty = not self.n
        return {"n": self.n, "min": None if empty else self.min, **self.percentiles(),
                "max": None if empty else self.max, "mean": self.mean, "sum": self.sum}

    def display_bins(self, nbins: int = 60) -> tuple[np.ndarray, np.ndarray, bool]:
        """The positive values re-binned for a plot: ``(edges [m+1], counts [m], log)`` over [min, max].

        Bins are log-spaced (``log`` True) when the positive values span more than a factor of 10, else
        evenly spaced. Values ``<= 0`` are not included (:attr:`zero` says how many). Empty arrays when
        there is no positive value.
        """
        centers = self.lo * self.ratio ** (np.arange(self.nbins) + 0.5)
        centers = np.concatenate([[self.lo / 2], centers, [self.max if self.above else self.hi]])
        weights = np.concatenate([[self.below], self.counts, [self.above]]).astype(np.float64)
        keep = weights > 0
        if not keep.any():
            return np.empty(0), np.empty(0), False
        lo_v = self.min if self.min > 0 else float(centers[keep].min())
        centers = np.clip(centers[keep], lo_v, self.max)
        weights = weights[keep]
        lo, hi = float(centers.min()), float(centers.max())
        log = hi > 10 * lo
        if hi <= lo * 1.0001:
            lo, hi = lo * 0.95, hi * 1.05
        edges = np.geomspace(lo, hi * 1.000001, nbins + 1) if log else np.linspace(lo, hi * 1.000001, nbins + 1)
        counts, _ = np.histogram(centers, bins=edges, weights=weights)
        return edges, counts, log


@dataclass
class RunInfo:
    """What the run directories say besides the rows: records expected, rejected lines, completeness."""

    dirs: int = 0
    total_records: int = 0
    rejected: int = 0
    complete_dirs: int = 0
    inputs: list[str] = field(default_factory=list)


class ReportStats:
    """Accumulates everything the report shows, batch by batch, in fixed-size structures (module doc).

    Feed it with :meth:`add_part` (one call per committed part: footer row count and mtime) and :meth:`add`
    (one call per record batch holding :meth:`columns`); :func:`scan_report` does both for an output
    directory.

    Args:
        token_columns: the token count columns (:data:`TOKEN_COLUMNS`) the parts have.
        finish_columns: the finish reason columns (:data:`FINISH_COLUMNS`) the parts have.
    """

    def __init__(self, token_columns: tuple[str, ...] = (), finish_columns: tuple[str, ...] = ()) -> None:
        self.rows = 0
        self.parts = 0
        self.status_pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        self.endpoint_status: collections.Counter[tuple[str, str]] = collections.Counter()
        self.latency = {stage: LogHistogram() for stage in LATENCY_COLUMNS}
        self.errors = ErrorGroups()
        self.models: collections.Counter[str] = collections.Counter()
        self.token_columns = tuple(token_columns)
        self.finish_columns = tuple(finish_columns)
        self.tokens = {c: LogHistogram(lo=0.5, hi=1e9, ratio=1.001) for c in self.token_columns}
        self.finish: dict[str, collections.Counter[str]] = {c: collections.Counter() for c in self.finish_columns}
        self.commits_per_second: collections.Counter[int] = collections.Counter()
        self.first_commit: float | None = None
        self.last_commit: float | None = None
        self.info = RunInfo()

    def columns(self) -> list[str]:
        """Columns a scan must project for :meth:`add` (never contexts, generation or query)."""
        return [*STATUS_COLUMNS, *ERROR_COLUMNS, "endpoint", *LATENCY_COLUMNS.values(), "model",
                *self.token_columns, *self.finish_columns]

    def add_part(self, mtime: float, rows: int) -> None:
        """Count one committed part: ``rows`` rows committed at ``mtime`` (seconds since the epoch)."""
        self.parts += 1
        if rows <= 0:
            return
        self.commits_per_second[int(mtime)] += rows
        self.first_commit = mtime if self.first_commit is None else min(self.first_commit, mtime)
        self.last_commit = mtime if self.last_commit is None else max(self.last_commit, mtime)

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Add one batch of committed rows holding (at least) :meth:`columns`."""
        self.rows += batch.num_rows
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        for (rag, gen), n in _group_counts(table, "rag_status", "gen_status"):
            self.status_pairs[(rag, gen)] += n
        for (ep, gen), n in _group_counts(table, "endpoint", "gen_status"):
            self.endpoint_status[(ep, gen)] += n
        self._fold_endpoints()
        for stage, col in LATENCY_COLUMNS.items():
            self.latency[stage].add(table.column(col))
        self.errors.add(table)
        _count_capped(self.models, table.column("model"), MAX_VALUES, skip_null=True)
        for c in self.token_columns:
            self.tokens[c].add(table.column(c))
        for c in self.finish_columns:
            _count_capped(self.finish[c], table.column(c), MAX_VALUES)

    def drop_empty_token_columns(self) -> None:
        """Forget token and finish-reason columns that hold no value in any row (columns of the row schema
        written by a run whose servers reported no usage): the report then says there are no token counts."""
        self.token_columns = tuple(c for c in self.token_columns if self.tokens[c].n)
        self.tokens = {c: self.tokens[c] for c in self.token_columns}
        self.finish_columns = tuple(c for c in self.finish_columns if set(self.finish[c]) - {NULL})
        self.finish = {c: self.finish[c] for c in self.finish_columns}

    def _fold_endpoints(self) -> None:
        totals: collections.Counter[str] = collections.Counter()
        for (ep, _), n in self.endpoint_status.items():
            totals[ep] += n
        if len(totals) <= MAX_ENDPOINTS:
            return
        keep = {ep for ep, _ in totals.most_common(MAX_ENDPOINTS // 2)}
        folded: collections.Counter[tuple[str, str]] = collections.Counter()
        for (ep, gen), n in self.endpoint_status.items():
            folded[(ep if ep in keep else OTHER_ENDPOINTS, gen)] += n
        self.endpoint_status = folded

    # -- views ---------------------------------------------------------------------------------

    def endpoint_rows(self) -> dict[str, int]:
        """Rows per endpoint, most first."""
        totals: collections.Counter[str] = collections.Counter()
        for (ep, _), n in self.endpoint_status.items():
            totals[ep] += n
        return dict(totals.most_common())

    def status_table(self) -> tuple[list[str], list[str], np.ndarray]:
        """``(rag values, gen values, counts [len(rag), len(gen)])``: rows per rag_status x gen_status.

        Values in a fixed order: the schema's known values first (ok first), then any others sorted.
        """
        rag = _ordered({r for r, _ in self.status_pairs}, ("ok", "soft_fail", "hard_fail"))
        gen = _ordered({g for _, g in self.status_pairs}, ("ok", "failed", "invalid_output", "skipped"))
        counts = np.zeros((len(rag), len(gen)), dtype=np.int64)
        for (r, g), n in self.status_pairs.items():
            counts[rag.index(r), gen.index(g)] += n
        return rag, gen, counts

    def commits(self) -> tuple[np.ndarray, np.ndarray]:
        """``(commit seconds [m] since the epoch, ascending; rows committed in that second [m])``."""
        if not self.commits_per_second:
            return np.empty(0), np.empty(0, dtype=np.int64)
        keys = sorted(self.commits_per_second)
        return (np.array(keys, dtype=np.float64),
                np.array([self.commits_per_second[k] for k in keys], dtype=np.int64))

    def throughput(self, max_bins: int = 120) -> tuple[np.ndarray, np.ndarray, int]:
        """Rows committed per time bin: ``(bin starts [m] in epoch seconds, rows [m], bin width in seconds)``.

        The width is the smallest of 1, 2, 5, 10, 15, 30 s, 1, 2, 5, 10, 15, 30 min, 1, 2, 3, 6, 12 h, then
        whole days, that gives at most ``max_bins`` bins from the first to the last commit and is at least
        twice the median time between commits (so a bin holds about two commits or more: parts come every
        ``run.part_rows`` rows or 30 s, and narrower bins would show the commit cadence, not the rate). Bins
        start at a multiple of the width. Empty arrays when nothing is committed.
        """
        if not self.commits_per_second:
            return np.empty(0), np.empty(0, dtype=np.int64), 1
        first, last = min(self.commits_per_second), max(self.commits_per_second)
        span = last - first + 1
        gap = 2 * float(np.median(np.diff(self.commits()[0]))) if len(self.commits_per_second) > 1 else 0.0
        width = next((w for w in THROUGHPUT_WIDTHS_S if span / w <= max_bins and w >= gap),
                     86_400 * math.ceil(max(span / max_bins, gap) / 86_400))
        start = first - first % width
        nb = (last - start) // width + 1
        rows = np.zeros(nb, dtype=np.int64)
        for second, n in self.commits_per_second.items():
            rows[(second - start) // width] += n
        starts = (start + width * np.arange(nb)).astype(np.float64)
        return starts, rows, width

    def mean_rate(self) -> float | None:
        """Rows committed per second after the first commit: (rows - rows of the first commit second) /
        (last - first commit second); None when the commits span less than 60 s (no meaningful rate)."""
        if not self.commits_per_second:
            return None
        first, last = min(self.commits_per_second), max(self.commits_per_second)
        if last - first < 60:
            return None
        return (sum(self.commits_per_second.values()) - self.commits_per_second[first]) / (last - first)


def _ordered(values: set[str], known: tuple[str, ...]) -> list[str]:
    return [v for v in known if v in values] + sorted(v for v in values if v not in known)


def _group_counts(table: pa.Table, a: str, b: str) -> list[tuple[tuple[str, str], int]]:
    """``[((a value, b value), rows)]`` of one table; null values as ``"null"``."""
    grouped = table.select([a, b]).group_by([a, b]).aggregate([([], "count_all")])
    keys_a, keys_b = grouped.column(a).to_pylist(), grouped.column(b).to_pylist()
    counts = grouped.column("count_all").to_pylist()
    return [((NULL if x is None else str(x), NULL if y is None else str(y)), n)
            for x, y, n in zip(keys_a, keys_b, counts, strict=True)]


def _count_capped(into: collections.Counter[str], col: pa.ChunkedArray | pa.Array, cap: int,
                  *, skip_null: bool = False) -> None:
    """Add the value counts of ``col`` into ``into``; a new value past ``cap`` distinct is counted as
    ``"(other)"``."""
    if skip_null:
        col = pc.drop_null(col)
    for item in pc.value_counts(col).to_pylist():
        key = NULL if item["values"] is None else str(item["values"])
        if key not in into and len(into) >= cap:
            key = "(other)"
        into[key] += item["counts"]


def scan_report(path: str | Path) -> ReportStats:
    """:class:`ReportStats` of every committed row of an output: a run directory or a sharded root.

    One footer read and one ``stat`` per part, then one streamed pass over the projected columns, one part
    open at a time (:func:`pipeline.output.reading.iter_part_batches`: memory independent of the number of
    parts). Token columns are read when at least one part has them (parts without them give nulls).

    Raises:
        InputError: ``path`` is not an output directory, or a ``run.json`` is invalid.
        RunError: a committed part is unreadable.
    """
    dirs = run_dirs(path)
    parts: list[Path] = []
    footers: list[tuple[float, int]] = []
    types: dict[str, pa.DataType] = {}
    info = RunInfo(dirs=len(dirs))
    for d in dirs:
        od = OutputDir(d)
        run = od.run_info()
        info.total_records += int(run.get("total_records") or 0)
        if run.get("input") and run["input"] not in info.inputs and len(info.inputs) < MAX_VALUES:
            info.inputs.append(str(run["input"]))
        info.rejected += od.rejected_count()
        manifest = od.manifest()
        info.complete_dirs += bool(manifest and manifest.get("complete") is True)
        for part in part_paths(d):
            meta = read_part_footer(part)
            try:
                mtime = os.stat(part).st_mtime
            except OSError as exc:
                raise RunError(f"{part}: cannot read committed part: {exc}") from None
            schema = meta.schema.to_arrow_schema()
            for c in (*TOKEN_COLUMNS, *FINISH_COLUMNS):
                if c not in types and c in schema.names:
                    types[c] = schema.field(c).type
            parts.append(part)
            footers.append((mtime, meta.num_rows))
    stats = ReportStats(token_columns=tuple(c for c in TOKEN_COLUMNS if c in types),
                        finish_columns=tuple(c for c in FINISH_COLUMNS if c in types))
    stats.info = info
    for mtime, rows in footers:
        stats.add_part(mtime, rows)
    for batch in iter_part_batches(parts, stats.columns(), types):
        stats.add(batch)
    stats.drop_empty_token_columns()
    return stats


__all__ = ["FINISH_COLUMNS", "TOKEN_COLUMNS", "LogHistogram", "ReportStats", "RunInfo", "scan_report"]
