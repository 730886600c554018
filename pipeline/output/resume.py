"""What a resume may change in a run directory, and which committed rows it re-processes. Pure rules: no file
is read here (:class:`pipeline.output.rundir.OutputDir` reads the parts and ``run.json`` and applies them).

**A resume may extend a run** (``--limit 3`` then ``--limit 5``, or no limit): the records of a run are the
first ``run.limit`` valid records of the input (of its shard with ``--shard I/N``: the indices ``i % N == I``
among them), so the records of a larger limit include those of a smaller one, and the count of records
(``total_records`` of ``run.json``) says which set a directory holds. :func:`check_limit_change` accepts a
total that stays or grows and refuses one that shrinks: committed rows would fall outside the run.

**Which rows a retry re-processes** (:func:`retry_reasons`), one reason per row, first match in this order:

==================  ==================================================================  =====================
reason              row                                                                 flag
==================  ==================================================================  =====================
``hard_fail``       ``rag_status == "hard_fail"`` (its generation was skipped)          ``--retry-failed``
``failed``          ``gen_status == "failed"``                                          ``--retry-failed``
``invalid_output``  ``gen_status == "invalid_output"`` (never matched the schema)       ``--retry-failed``
``truncated``       ``gen_status == "ok"`` and ``gen_finish_reason == "length"``        ``--retry-truncated``
==================  ==================================================================  =====================

``gen_finish_reason`` is the server's ``finish_reason`` of the generation (``"length"``: it stopped at
``generation.max_tokens``). Rows written before that column existed cannot be found truncated; the selection
counts them (:attr:`RetrySelection.rows_without_finish_reason`) so the run can say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

FINISH_REASON_COLUMN = "gen_finish_reason"
"""Column with the generation's finish reason as the server gave it ("stop", "length", ...)."""

LENGTH = "length"
"""The finish reason of a generation that hit ``max_tokens``."""

FAILED_REASONS: tuple[str, ...] = ("hard_fail", "failed", "invalid_output")
"""Reasons selected by ``--retry-failed``, in the order they are matched and reported."""

TRUNCATED = "truncated"
"""Reason selected by ``--retry-truncated``."""

REASONS: tuple[str, ...] = (*FAILED_REASONS, TRUNCATED)
"""Every reason, in match and report order."""

COLUMNS: tuple[str, ...] = ("id", "rag_status", "gen_status", FINISH_REASON_COLUMN)
"""The columns :func:`retry_reasons` reads."""


def check_limit_change(path: str | Path, old_limit: Any, new_limit: Any, old_total: int, new_total: int) -> str | None:
    """Decide a resume's ``run.limit`` against the one the directory was started (or last extended) with.

    Args:
        path: the run directory (for messages).
        old_limit, new_limit: ``run.limit`` before and now (0 = all records).
        old_total, new_total: records of the run before and now (``total_records``: after the limit and the
            shard), which decide: the same input and shard, so a larger total is a superset.

    Returns:
        None when nothing changes, else the line to log when the run grows.

    Raises:
        InputError: the new limit holds fewer records than the directory was started with (one line, naming
            the limit to use).
    """
    if new_total < old_total:
        raise InputError(
            f"output dir {path} was started with run.limit={old_limit!r} ({old_total} records), now "
            f"{new_limit!r} ({new_total} records): a resume may extend a run, not shrink it (committed rows would "
            f"fall outside it); use --limit {old_limit} or more (0 = all), --overwrite, or another --output")
    if new_total > old_total:
        return (f"extending the run from {old_total} to {new_total} records (run.limit {old_limit!r} -> "
                f"{new_limit!r}); the {old_total} records' committed rows are kept")
    return None


def retry_reasons(rag_status: list[str | None], gen_status: list[str | None], finish_reason: list[str | None] | None,
                  *, failed: bool, truncated: bool) -> list[str | None]:
    """The retry reason of each row (see the module docstring), or None for a row that stays.

    Args:
        rag_status, gen_status: the rows' status columns (equal lengths).
        finish_reason: the rows' ``gen_finish_reason`` (None: the column is absent; a None value: not known).
        failed: select the ``--retry-failed`` reasons; truncated: select ``truncated``.

    Returns:
        One reason (an element of :data:`REASONS`) or None per row.
    """
    out: list[str | None] = []
    for k, (rag, gen) in enumerate(zip(rag_status, gen_status, strict=True)):
        reason = None
        if failed:
            if rag == "hard_fail":
                reason = "hard_fail"
            elif gen in ("failed", "invalid_output"):
                reason = gen
        if reason is None and truncated and finish_reason is not None and gen == "ok" and finish_reason[k] == LENGTH:
            reason = TRUNCATED
        out.append(reason)
    return out


@dataclass
class RetrySelection:
    """The committed rows a retry re-processes.

    Attributes:
        failed, truncated: the flags (``--retry-failed``, ``--retry-truncated``).
        ids: ids of the selected rows.
        counts: rows per reason, every reason of the flags given (zeros included), in :data:`REASONS` order.
        rows_without_finish_reason: rows in parts written without ``gen_finish_reason`` (not checked for
            truncation; counted only with ``truncated``).
        rows: committed rows examined.
    """

    failed: bool
    truncated: bool
    ids: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)
    rows_without_finish_reason: int = 0
    rows: int = 0

    def __post_init__(self) -> None:
        wanted = [r for r in REASONS if (r == TRUNCATED and self.truncated) or (r != TRUNCATED and self.failed)]
        self.counts = {r: int(self.counts.get(r, 0)) for r in wanted}

    def add(self, ids: list[str], reasons: list[str | None]) -> None:
        """Add a batch of rows with their :func:`retry_reasons`."""
        self.rows += len(ids)
        for rid, reason in zip(ids, reasons, strict=True):
            if reason is not None:
                self.ids.add(str(rid))
                self.counts[reason] = self.counts.get(reason, 0) + 1

    def describe(self) -> str:
        """One line for the log: what is retried, or why nothing is (e.g. ``retrying 3 hard_fail, 2 failed,
        5 invalid_output rows``)."""
        flags = " ".join(f for f, on in (("--retry-failed", self.failed), ("--retry-truncated", self.truncated)) if on)
        names = {**{r: r for r in FAILED_REASONS}, TRUNCATED: f"truncated ({FINISH_REASON_COLUMN} = {LENGTH})"}
        if self.ids:
            text = "retrying " + ", ".join(f"{n} {names[r]}" for r, n in self.counts.items() if n) + " rows"
        else:
            text = ("nothing to retry: no committed row is " + " or ".join(names[r] for r in self.counts)
                    + f" (of {self.rows})")
        text += f" ({flags})"
        if self.truncated and self.rows_without_finish_reason:
            if self.rows_without_finish_reason >= self.rows:
                text += (f"; the rows were written without {FINISH_REASON_COLUMN} (an older version): none can be "
                         "found truncated")
            else:
                text += (f"; {self.rows_without_finish_reason} rows written without {FINISH_REASON_COLUMN} (an "
                         "older version) were not checked for truncation")
        return text
