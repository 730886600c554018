"""Run progress a person can read anywhere.

On a terminal: two tqdm bars (retrieval, generation), as before. When stderr is not a terminal (a log file,
Slurm's output, CI), or with ``--no-progress`` (no bars): one plain line every ``interval_s`` seconds, written
to ``stderr`` directly (and to the run's ``.rag-pipeline/logs/main.log``), e.g.::

    2026-12-03 14:05:01 [progress] 1200/40000 rows (3.0%) | retrieval 1260 | rag ok=1100 soft_fail=90
    hard_fail=10 | gen ok=1190 failed=0 skipped=10 | 21.40 records/s (last 5 min) | ETA 30m13s

and a final line when the run ends. No carriage returns, so the file reads line by line. Lines are driven by
the main loop's tick (:meth:`RunProgress.tick`), not by finished records, so they keep coming during a stall
(then with ``| no row for 75 s``); the rate and ETA come from the run's recent window
(:class:`pipeline.run.state.RateWindow`) when a ``rate_source`` is given.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger(__name__)


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class RunProgress:
    """Progress of one run: ``tqdm`` bars on a TTY, periodic plain lines otherwise.

    Args:
        total: records the run will have a row for (already committed ones included).
        done: rows already committed before this invocation (a resume).
        enabled: False = no bars (``--no-progress``): plain lines instead, even on a terminal.
        interval_s: seconds between plain lines.
        stream: where to write (default ``sys.stderr``); its ``isatty()`` picks the mode.
        force_lines: plain lines even on a terminal (tests).
        rate_source: returns ``{"records_per_s", "window_s", "eta_s", "idle_s"}`` (None: unknown) for the
            lines (:meth:`pipeline.run.state.LiveState.recent`); None = the lifetime average of this invocation.
    """

    def __init__(self, total: int, done: int, *, enabled: bool = True, interval_s: float = 30.0,
                 stream: TextIO | None = None, force_lines: bool = False,
                 rate_source: Callable[[], dict[str, Any]] | None = None) -> None:
        self.total = total
        self.done0 = done
        self.enabled = enabled
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.retrieved = done
        self.generated = done
        self.rag_status: Counter[str] = Counter()
        self.gen_status: Counter[str] = Counter()
        self.t0 = time.monotonic()
        self.last_line = self.t0
        self.bars: dict[str, Any] = {}
        self.rate_source = rate_source
        isatty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lines = force_lines or not isatty or not enabled
        if not self.lines:
            from tqdm import tqdm

            for pos, name in enumerate(("retrieval", "generation")):
                self.bars[name] = tqdm(total=total, initial=done, desc=f"{name:<10}", unit="rec", position=pos,
                                       dynamic_ncols=True, file=self.stream)

    def retrieved_one(self) -> None:
        """A record finished its RAG stage."""
        self.retrieved += 1
        if "retrieval" in self.bars:
            self.bars["retrieval"].update(1)
        self._maybe_line()

    def finished_one(self, rag_status: str | None = None, gen_status: str | None = None) -> None:
        """A record has its row (statuses as written in the row)."""
        self.generated += 1
        if rag_status:
            self.rag_status[rag_status] += 1
        if gen_status:
            self.gen_status[gen_status] += 1
        if "generation" in self.bars:
            self.bars["generation"].update(1)
        self._maybe_line()

    def line(self) -> str:
        """The plain progress line, timestamped (see the module docstring)."""
        left = self.total - self.generated
        rec = self.rate_source() if self.rate_source is not None else None
        if rec is None:
            elapsed = max(1e-9, time.monotonic() - self.t0)
            rate: float | None = (self.generated - self.done0) / elapsed
            eta = left / rate if rate and left > 0 else None
            window, idle = "", None
        else:
            rate, eta, idle = rec.get("records_per_s"), rec.get("eta_s"), rec.get("idle_s")
            w = rec.get("window_s")
            window = (f" (last {w / 60:g} min)" if w and w >= 60 else f" (last {w:g} s)") if w else ""
        pct = 100.0 * self.generated / self.total if self.total else 100.0
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        parts = [f"{stamp} [progress] {self.generated}/{self.total} rows ({pct:.1f}%)", f"retrieval {self.retrieved}"]
        if self.rag_status:
            parts.append("rag " + " ".join(f"{k}={v}" for k, v in sorted(self.rag_status.items())))
        if self.gen_status:
            parts.append("gen " + " ".join(f"{k}={v}" for k, v in sorted(self.gen_status.items())))
        parts.append(f"{rate or 0:.2f} records/s{window}")
        parts.append(f"ETA {_fmt_eta(eta)}" if eta is not None and left > 0 else "ETA -")
        if idle is not None and left > 0 and idle >= max(self.interval_s, 10.0):
            parts.append(f"no row for {idle:.0f} s")
        return " | ".join(parts)

    def tick(self) -> None:
        """Called by the main loop on every pass: a plain line when ``interval_s`` passed, rows or not."""
        self._maybe_line()

    def _maybe_line(self) -> None:
        if not self.lines:
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval_s:
            self.last_line = now
            self._write(self.line())

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or full log must not stop the run
            pass
        log.info("%s", text.split(" ", 2)[-1], extra={"console": False})  # the run's log file: not stderr again

    def close(self) -> None:
        """Close the bars, or write the last plain line."""
        for bar in self.bars.values():
            bar.close()
        self.bars = {}
        if self.lines:
            self._write(self.line())
            self.lines = False
