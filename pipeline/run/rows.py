"""The row writer: a finished record becomes its output row, rows are committed as Parquet parts.

The one place a row is built (:meth:`RowWriter.finish`) from a record's work item and its RAG and generation
results; commits go through :class:`pipeline.output.OutputDir` (tmp + fsync + rename). Rows that replace
committed failed rows (``--retry-failed``) are committed as retry parts, applied to the parts at the end.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any

from pipeline.errors import OutputError, RunError
from pipeline.messages import GenResult, RagResult, WorkItem

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 30.0
"""Finished rows are committed at least this often (seconds), and whenever ``run.part_rows`` are waiting."""


class RowWriter:
    """Rows of one invocation, buffered and committed part by part.

    Args:
        od: the run's :class:`pipeline.output.OutputDir` (its ledger holds the ids committed so far).
        extra_types: passthrough column name -> type (``"json"`` columns are stored as JSON text).
        part_rows: rows per part (``run.part_rows``).
        retry_ids: ids of committed failed rows being re-processed (``--retry-failed``).
        lock: the output directory's :class:`pipeline.output.lock.DirLock` (commits stop if it was lost).
        on_row: called as ``on_row(item, rag, gen, row)`` for each row as it is finished (progress, metrics), or
            None.

    Attributes:
        schema: the rows' schema: the directory keeps the columns it started with
            (:func:`pipeline.output.schema.schema_of_run`; an older run resumed lacks the columns added since).
        tokens: ``{"<stage>_<prompt|completion>_tokens": sum}`` over the rows finished by this invocation.
    """

    def __init__(self, od: Any, extra_types: dict[str, Any], *, part_rows: int, retry_ids: set[str] | None = None,
                 lock: Any = None, on_row: Any = None) -> None:
        from pipeline.output.reading import read_part_schema
        from pipeline.output.schema import LATER_COLUMNS, schema_of_run

        self.od = od
        self.extra_types = extra_types
        parts = od.parts()
        self.schema = schema_of_run(extra_types, read_part_schema(parts[0]) if parts else None)
        lacking = [c for c in LATER_COLUMNS if c not in self.schema.names]
        if parts and lacking:
            log.warning("%s was started by an earlier version: its rows keep their columns, without %s "
                        "(--overwrite or a new --output to get them)", od.path, ", ".join(lacking))
        self.tokens: collections.Counter[str] = collections.Counter()
        self.part_rows = part_rows
        self.retry_ids: set[str] = set(retry_ids or ())
        self.lock = lock
        self.on_row = on_row
        self.pending: list[dict] = []
        self._pending_ids: set[str] = set()
        self.processed = 0
        self.last_commit = time.monotonic()

    def finish(self, item: WorkItem, rag: RagResult, gen: GenResult | None) -> dict:
        """Build the row of a finished record and buffer it; commits a part when ``part_rows`` are waiting.

        Args:
            item: the record; ``rag``: its RAG result; ``gen``: its generation result, or None when generation
                was skipped after a RAG hard failure.

        Returns:
            the row (column name -> value, as in :func:`pipeline.output.row_schema`).

        Raises:
            RunError: the record already has a row (a scheduling bug).
        """
        rid = item.id
        if rid in self._pending_ids or (rid in self.od.ledger and rid not in self.retry_ids):
            raise RunError(f"bug: record {rid!r} finished twice")
        self._pending_ids.add(rid)
        row: dict[str, Any] = {"id": rid, "query": item.query}
        for k, t in self.extra_types.items():
            v = item.extra.get(k)
            row[k] = json.dumps(v, ensure_ascii=False) if (t == "json" and v is not None) else v
        used = gen.contexts_used if gen is not None and gen.contexts_used is not None else rag.contexts_used
        row.update(contexts=rag.contexts, contexts_used=used, rag_answer=rag.rag_answer, rag_status=rag.rag_status,
                   rag_error=rag.rag_error,
                   retrieve_ms=rag.retrieve_ms, rag_llm_ms=rag.rag_llm_ms, rag_prompt_tokens=rag.prompt_tokens,
                   rag_completion_tokens=rag.completion_tokens, rag_finish_reason=rag.finish_reason,
                   gen_prompt_tokens=gen.prompt_tokens if gen else None,
                   gen_completion_tokens=gen.completion_tokens if gen else None,
                   gen_finish_reason=gen.finish_reason if gen else None,
                   input_index=item.index if item.index >= 0 else None)
        if gen is None:
            row.update(generation=None, gen_status="skipped", gen_error=rag.rag_error or "RAG hard failure",
                       generate_ms=None, attempts=rag.attempts, endpoint=rag.endpoint, model=rag.model)
        else:
            row.update(generation=gen.generation, generation_json=gen.generation_json, gen_status=gen.gen_status,
                       gen_error=gen.gen_error, generate_ms=gen.generate_ms, attempts=rag.attempts + gen.attempts,
                       endpoint=gen.endpoint or rag.endpoint, model=gen.model or rag.model)
        for key in ("rag_prompt_tokens", "rag_completion_tokens", "gen_prompt_tokens", "gen_completion_tokens"):
            if row[key]:
                self.tokens[key] += row[key]
        if self.on_row is not None:
            self.on_row(item, rag, gen, row)
        self.pending.append(row)
        if len(self.pending) >= self.part_rows:
            self.commit()
        return row

    def due(self, now: float) -> bool:
        """True when ``COMMIT_INTERVAL_S`` passed since the last commit."""
        return now - self.last_commit > COMMIT_INTERVAL_S

    def commit(self) -> None:
        """Commit the buffered rows as one Parquet part (atomic: tmp + fsync + rename).

        Raises:
            RunError: the directory's lock was taken by another process (nothing is committed).
            OutputError: the part cannot be written (disk full, read-only); committed rows are kept.
        """
        import pyarrow as pa

        self.last_commit = time.monotonic()
        if not self.pending:
            return
        if self.lock is not None and self.lock.lost.is_set():
            raise RunError(f"the lock of {self.od.path} was taken by another process: stopped without committing")
        retried = [r for r in self.pending if r["id"] in self.retry_ids]
        new = [r for r in self.pending if r["id"] not in self.retry_ids] if retried else self.pending
        try:
            if new:
                self.od.commit_part(pa.Table.from_pylist(new, schema=self.schema))
                self.pending = retried
            if retried:  # replacement rows, applied to the parts at the end (OutputDir.apply_retries)
                self.od.commit_retry_part(pa.Table.from_pylist(retried, schema=self.schema))
                self.retry_ids.difference_update(r["id"] for r in retried)
        except OSError as exc:
            raise OutputError(f"cannot write a part in {self.od.path}: {exc.strerror or exc}; committed rows are "
                              "kept: fix it and run the same command again to resume") from None
        self.processed += len(new) + len(retried)
        self.pending = []
        self._pending_ids.clear()
