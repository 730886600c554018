"""Run progress a person can read anywhere.

On a terminal: two tqdm bars (retrieval, generation), as before. When stderr is not a terminal (a log file,
Slurm's output, CI): one plain line every ``interval_s`` seconds through :mod:`logging`-free ``stderr`` writes,
e.g.::

    [progress] 1200/40000 rows (3.0%) | retrieval 1260 | rag ok=1100 soft_fail=90 hard_fail=10 | gen ok=1190
    failed=0 skipped=10 | 21.4 records/s | ETA 30m13s

and a final line when the run ends. No carriage returns, so the file reads line by line.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any, TextIO


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
        enabled: False = no output at all (``--no-progress``).
        interval_s: seconds between plain lines (non-TTY only).
        stream: where to write (default ``sys.stderr``); its ``isatty()`` picks the mode.
        force_lines: plain lines even on a terminal (tests).
    """

    def __init__(self, total: int, done: int, *, enabled: bool = True, interval_s: float = 30.0,
                 stream: TextIO | None = None, force_lines: bool = False) -> None:
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
        isatty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lines = enabled and (force_lines or not isatty)
        if enabled and not self.lines:
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
        """The plain progress line (see the module docstring)."""
        elapsed = max(1e-9, time.monotonic() - self.t0)
        new = self.generated - self.done0
        rate = new / elapsed
        pct = 100.0 * self.generated / self.total if self.total else 100.0
        parts = [f"[progress] {self.generated}/{self.total} rows ({pct:.1f}%)", f"retrieval {self.retrieved}"]
        if self.rag_status:
            parts.append("rag " + " ".join(f"{k}={v}" for k, v in sorted(self.rag_status.items())))
        if self.gen_status:
            parts.append("gen " + " ".join(f"{k}={v}" for k, v in sorted(self.gen_status.items())))
        parts.append(f"{rate:.2f} records/s")
        left = self.total - self.generated
        parts.append(f"ETA {_fmt_eta(left / rate)}" if rate > 0 and left > 0 else "ETA -")
        return " | ".join(parts)

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

    def close(self) -> None:
        """Close the bars, or write the last plain line."""
        for bar in self.bars.values():
            bar.close()
        self.bars = {}
        if self.lines:
            self._write(self.line())
            self.lines = False
