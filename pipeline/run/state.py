"""The run's live state: ``OUTPUT/.rag-pipeline/state.json``, rewritten by the main loop while the run runs.

:class:`LiveState` is fed by the orchestrator: the phase at each start-up step, every finished row (counts per
status, errors), and a :meth:`LiveState.tick` from the main loop (every ~0.2 s) that rewrites the file when
``run.progress_interval_s`` passed or a part was committed (at most once a second), whether or not records
complete. It is written from
the main loop, never from a thread of its own: a state that stops being rewritten means the loop is stuck,
while the lock's heartbeat thread (:mod:`pipeline.output.lock`, the one liveness signal) says whether the
process lives. Readers: :mod:`pipeline.output.livestate` (``rag-pipeline status``).

The file (``atomic_write_json``: readers never see half of it)::

    {"version": 1, "host", "pid", "started", "updated" (ISO 8601), "updated_unix" (s),
     "phase": "starting servers" | "starting workers" | "running" | "draining" | "stopped" | "complete",
     "phase_since", "stop_reason", "interval_s",
     "total", "rows" (finished: committed + pending), "committed_rows", "retrieved",
     "pending": {"rows", "rag_status": {value: n}, "gen_status": {...}} (finished, not committed yet),
     "counts": {"rag_status", "gen_status"} (rows finished by this invocation),
     "rate": {"records_per_s", "window_s", "eta_s", "idle_s", "lifetime_records_per_s"},
     "outstanding", "waiting_generation",
     "endpoints": {url: {"in_flight", "limit", "probe"}}, "paused": {"rag": why | null, "gen": ...},
     "servers": [{"url", "port", "status", "running", "attempts", "ready_after_s", "error"}] | null,
     "workers": {name: {"kind", "pid", "alive", "records", "silent_s"}},
     "errors": [{"error", "count"}] (this invocation's rows, most frequent first)}

The rate is over a recent window (:class:`RateWindow`, the last :data:`RATE_WINDOW_S` seconds or 5 intervals,
whichever is longer), so the ETA follows a slowdown instead of the run's lifetime average.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.output.layout import STATE_FILE, meta_path

log = logging.getLogger(__name__)

RATE_WINDOW_S = 300.0
"""Records/s and the ETA are measured over the last this many seconds (or 5 progress intervals if longer)."""
RATE_RESOLUTION_S = 1.0
"""Samples of the finished-row count closer together than this are merged (bounded memory: window / this)."""
COMMIT_WRITE_MIN_S = 1.0
"""After a commit the file is rewritten at the next tick, but at most once per this many seconds (a run committing
a part per row would otherwise write it for every row)."""
MAX_ERROR_KINDS = 1000
"""Distinct error texts counted in the state; beyond it the rarest are folded into ``(other errors)``."""
ERROR_CHARS = 200


class RateWindow:
    """Rate of a growing count over a recent time window (pure: the caller passes the time).

    Args:
        window_s: the window, seconds.
        resolution_s: samples closer together than this are merged.

    Example::

        w = RateWindow(300.0)
        w.add(0.0, 0); w.add(60.0, 120)
        w.rate(60.0)          # 2.0 per second
        w.eta_s(60.0, 600)    # 300.0 seconds
    """

    def __init__(self, window_s: float = RATE_WINDOW_S, resolution_s: float = RATE_RESOLUTION_S) -> None:
        self.window_s = float(window_s)
        self.resolution_s = float(resolution_s)
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self.last_change: float | None = None

    def add(self, now: float, count: int) -> None:
        """Record the count at time ``now`` (seconds, non-decreasing)."""
        s = self._samples
        if s and count != s[-1][1]:
            self.last_change = now
        elif not s:
            self.last_change = now
        if len(s) >= 2 and now - s[-2][0] < self.resolution_s:
            s[-1] = (now, count)
        else:
            s.append((now, count))
        while len(s) >= 2 and s[1][0] <= now - self.window_s:
            s.popleft()  # s[0] stays the newest sample at or before the window's start

    def rate(self, now: float) -> float | None:
        """Count per second from the window's first sample to the latest count, over ``now`` minus that sample's
        time; None before any time has passed."""
        if not self._samples:
            return None
        t0, n0 = self._samples[0]
        span_s = now - t0
        if span_s <= 0:
            return None
        return max(0, self._samples[-1][1] - n0) / span_s

    def eta_s(self, now: float, left: int) -> float | None:
        """Seconds to count ``left`` more at the recent rate; 0 when nothing is left, None while the rate is 0
        or unknown (a stall: no honest estimate)."""
        if left <= 0:
            return 0.0
        r = self.rate(now)
        return left / r if r else None

    def idle_s(self, now: float) -> float | None:
        """Seconds since the count last changed (or since the first sample)."""
        return None if self.last_change is None else max(0.0, now - self.last_change)


def _iso(wall_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(wall_s))


class LiveState:
    """The live state of one invocation of ``run`` and its ``state.json`` (see the module docstring).

    Args:
        out_dir: the run directory.
        total: records of the run's partition; ``done_before``: rows committed by earlier invocations.
        interval_s: ``run.progress_interval_s``: the file is rewritten at least this often.
        writer: the :class:`pipeline.run.rows.RowWriter` (pending rows, the ledger of committed ids).
        parts: the orchestrator's start-up results, read as they appear: ``servers``
            (:class:`pipeline.run.orchestrator.Servers`), ``scheduler``, ``workers``, ``signals``, ``progress``.
        progress: the :class:`pipeline.run.progress.RunProgress` ticked with the loop, or None.
        clock: monotonic clock (seconds).
    """

    def __init__(self, out_dir: str | Path, *, total: int, done_before: int, interval_s: float, writer: Any,
                 parts: Any = None, progress: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = meta_path(out_dir, STATE_FILE)
        self.total = total
        self.done_before = done_before
        self.interval_s = float(interval_s)
        self.writer = writer
        self.parts = parts
        self.progress = progress
        self.clock = clock
        self.rate = RateWindow(max(RATE_WINDOW_S, 5 * self.interval_s))
        self.rows = 0  # rows finished by this invocation
        self.counts: dict[str, collections.Counter[str]] = {"rag_status": collections.Counter(),
                                                             "gen_status": collections.Counter()}
        self.errors: collections.Counter[str] = collections.Counter()
        self.other_errors = 0
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started_wall = time.time()
        self.phase = ""  # set_phase names the first one
        self.phase_since = self.started_wall
        self.stop_reason: str | None = None
        self.running_since: float | None = None
        self.last_write = float("-inf")
        self._written_commits = -1
        self._write_failed = False

    # -- what the orchestrator tells it -----------------------------------------------------------------
    def set_phase(self, phase: str, reason: str | None = None) -> None:
        """Enter ``phase`` (see :data:`pipeline.output.livestate.LIVE_PHASES`) and write the file now."""
        if phase != self.phase:
            self.phase, self.phase_since = phase, time.time()
            # a stop's reason is the command's own error line: logged here at DEBUG only (one line per error)
            log.log(logging.DEBUG if phase == "stopped" else logging.INFO, "run phase: %s%s", phase,
                    f" ({reason})" if reason else "")
        if reason:
            self.stop_reason = reason
        if phase in ("running", "draining") and self.running_since is None:
            self.running_since = self.clock()
            self.rate.add(self.running_since, self.rows)
        self.write()

    def row(self, row: dict[str, Any]) -> None:
        """A record has its row (the dict :meth:`pipeline.run.rows.RowWriter.finish` built)."""
        self.rows += 1
        for col in ("rag_status", "gen_status"):
            if row.get(col):
                self.counts[col][str(row[col])] += 1
        for col in ("rag_error", "gen_error"):
            text = row.get(col)
            if text:
                self.errors[f"{col}: {str(text)[:ERROR_CHARS]}"] += 1
        if len(self.errors) > MAX_ERROR_KINDS:
            keep = self.errors.most_common(MAX_ERROR_KINDS // 2)
            self.other_errors += sum(self.errors.values()) - sum(n for _, n in keep)
            self.errors = collections.Counter(dict(keep))

    def tick(self, now: float | None = None) -> None:
        """Called by the main loop on every pass: aggregated log lines, the progress line, and the state file when
        ``interval_s`` passed or a part was committed since the last write."""
        from pipeline.logs import flush_repeats

        now = self.clock() if now is None else now
        flush_repeats()
        scheduler = getattr(self.parts, "scheduler", None)
        if self.phase == "running" and scheduler is not None and scheduler.stopping:
            signals = getattr(self.parts, "signals", None)
            name = getattr(signals, "name", "") if signals is not None else ""
            self.set_phase("draining", f"{name} received: in-flight records finish" if name else "stopping")
        if self.running_since is not None:
            self.rate.add(now, self.rows)
        progress = self.progress or getattr(self.parts, "progress", None)
        if progress is not None:
            progress.tick()
        since_s = now - self.last_write
        if since_s >= self.interval_s or (since_s >= COMMIT_WRITE_MIN_S and self._commits() != self._written_commits):
            self.write(now)

    def finish(self, *, complete: bool, reason: str | None) -> None:
        """The invocation ends: final phase ``complete`` or ``stopped`` (with ``reason``), written now."""
        from pipeline.logs import flush_repeats

        flush_repeats(all_groups=True)
        self.set_phase("complete" if complete else "stopped", None if complete else (reason or "stopped"))

    # -- the file -----------------------------------------------------------------------------------------
    def recent(self, now: float | None = None) -> dict[str, float | None]:
        """``{"records_per_s", "window_s", "eta_s", "idle_s", "lifetime_records_per_s"}`` now (None: unknown)."""
        now = self.clock() if now is None else now
        if self.running_since is None:
            return {"records_per_s": None, "window_s": self.rate.window_s, "eta_s": None, "idle_s": None,
                    "lifetime_records_per_s": None}
        self.rate.add(now, self.rows)
        rps = self.rate.rate(now)
        left = self.total - self.done_before - self.rows
        life_s = now - self.running_since
        return {"records_per_s": None if rps is None else round(rps, 4), "window_s": self.rate.window_s,
                "eta_s": _round(self.rate.eta_s(now, left)), "idle_s": _round(self.rate.idle_s(now)),
                "lifetime_records_per_s": round(self.rows / life_s, 4) if life_s > 0 else None}

    def _commits(self) -> int:
        od = getattr(self.writer, "od", None)
        try:
            return len(od.ledger) if od is not None else 0
        except Exception:  # noqa: BLE001 - the ledger of a directory being replaced: no count now
            return self._written_commits

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The state as written to the file (see the module docstring)."""
        now = self.clock() if now is None else now
        wall = time.time()
        pending_rows = 0
        pending = {"rag_status": collections.Counter(), "gen_status": collections.Counter()}
        retry_ids = getattr(self.writer, "retry_ids", set())
        for row in list(getattr(self.writer, "pending", [])):
            if row.get("id") not in retry_ids:
                pending_rows += 1
                for col in pending:
                    pending[col][str(row.get(col) if row.get(col) is not None else "null")] += 1
        groups = [{"error": e, "count": c} for e, c in self.errors.most_common(10)]
        if self.other_errors:
            groups.append({"error": "(other errors)", "count": self.other_errors})
        state: dict[str, Any] = {
            "version": 1,
            "host": self.host,
            "pid": self.pid,
            "started": _iso(self.started_wall),
            "updated": _iso(wall),
            "updated_unix": round(wall, 3),
            "phase": self.phase,
            "phase_since": _iso(self.phase_since),
            "stop_reason": self.stop_reason,
            "interval_s": self.interval_s,
            "total": self.total,
            "rows": self.done_before + self.rows,
            "committed_rows": self._commits(),
            "pending": {"rows": pending_rows, **{c: dict(sorted(v.items())) for c, v in pending.items()}},
            "counts": {c: dict(sorted(v.items())) for c, v in self.counts.items()},
            "rate": self.recent(now),
            "errors": groups,
        }
        state.update(self._run_parts(now))
        return state

    def _run_parts(self, now: float) -> dict[str, Any]:
        """What the scheduler, the servers and the workers say now (empty before they exist)."""
        out: dict[str, Any] = {}
        scheduler = getattr(self.parts, "scheduler", None)
        servers = getattr(self.parts, "servers", None)
        workers = getattr(self.parts, "workers", None)
        metrics = getattr(self.parts, "metrics", None)
        probes = servers.monitor.states() if servers is not None and servers.monitor is not None else {}
        if metrics is not None and metrics.url:
            out["metrics_url"] = metrics.url
        if scheduler is not None:
            out["retrieved"] = self.done_before + scheduler.retrieved
            out["outstanding"] = scheduler.outstanding()
            out["waiting_generation"] = scheduler.gen_waiting
            out["endpoints"] = {url: {"in_flight": n, "limit": scheduler.inflight.get(url), "probe": probes.get(url)}
                                for url, n in scheduler.in_flight().items()}
            out["paused"] = {stage: scheduler.paused(stage, now) for stage in ("rag", "gen")}
        elif probes:
            out["endpoints"] = {url: {"in_flight": 0, "limit": None, "probe": p} for url, p in probes.items()}
        if servers is not None and servers.pool is not None:
            keys = ("url", "port", "status", "running", "attempts", "ready_after_s", "error")
            out["servers"] = [{k: s.get(k) for k in keys} for s in servers.pool.report()]
        if workers is not None:
            out["workers"] = {}
            for name, w in list(workers.procs.items()):
                if w.stopping and not w.process.is_alive():
                    continue
                slot = scheduler.workers.get(name) if scheduler is not None else None
                out["workers"][name] = {"kind": w.kind, "pid": w.process.pid, "alive": w.process.is_alive(),
                                        "records": len(slot.assigned) if slot is not None else 0,
                                        "silent_s": round(max(0.0, now - w.reader.last_seen), 1)}
        return out

    def write(self, now: float | None = None) -> None:
        """Write the file now (atomically). A failure (disk full) is logged once; the run goes on."""
        from pipeline.output.files import atomic_write_json

        now = self.clock() if now is None else now
        self.last_write = now
        try:
            snap = self.snapshot(now)
            self._written_commits = snap["committed_rows"]
            self.path.parent.mkdir(exist_ok=True)
            atomic_write_json(self.path, snap)
        except OSError as exc:
            if not self._write_failed:
                log.warning("cannot write %s: %s (the run goes on)", self.path, exc.strerror or exc)
            self._write_failed = True
        else:
            self._write_failed = False


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


__all__ = ["RATE_WINDOW_S", "LiveState", "RateWindow"]
