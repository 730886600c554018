"""Progress output: plain lines (no carriage returns) when stderr is not a terminal, bars on a terminal."""

from __future__ import annotations

import io
import re
import time

from pipeline.run.progress import RunProgress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal_with_counts_rate_and_eta():
    out = io.StringIO()
    p = RunProgress(10, 2, interval_s=0.0, stream=out)
    for rag, gen in [("ok", "ok"), ("soft_fail", "ok"), ("hard_fail", "skipped")]:
        p.retrieved_one()
        p.finished_one(rag, gen)
    p.close()
    text = out.getvalue()
    assert "\r" not in text
    last = text.strip().splitlines()[-1]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[progress\] 5/10 rows \(50\.0%\)", last), last
    assert "retrieval 5" in last
    assert "rag hard_fail=1 ok=1 soft_fail=1" in last and "gen ok=2 skipped=1" in last
    assert "records/s" in last and "ETA" in last


def test_lines_are_rate_limited():
    out = io.StringIO()
    p = RunProgress(1000, 0, interval_s=3600.0, stream=out)
    for _ in range(100):
        p.finished_one("ok", "ok")
    assert out.getvalue() == ""  # nothing before the interval
    p.close()
    assert out.getvalue().count("[progress]") == 1  # the final line only


def test_terminal_gets_bars_and_no_plain_lines():
    out = _Tty()
    p = RunProgress(4, 0, interval_s=0.0, stream=out)
    p.finished_one("ok", "ok")
    p.close()
    assert "[progress]" not in out.getvalue() and "generation" in out.getvalue()


def test_no_progress_turns_off_the_bars_only():
    """--no-progress: no bars, but the plain lines stay (on a terminal too): a log must never go silent."""
    for out in (io.StringIO(), _Tty()):
        p = RunProgress(4, 0, enabled=False, interval_s=0.0, stream=out)
        p.finished_one("ok", "ok")
        p.close()
        assert "[progress] 1/4 rows" in out.getvalue() and "generation" not in out.getvalue()


def test_lines_keep_coming_from_the_tick_during_a_stall_with_the_recent_rate():
    """No record finishes: the loop's tick still writes a line every interval, with the window's rate, its ETA
    and how long no row came."""
    out = io.StringIO()
    recent = {"records_per_s": 0.5, "window_s": 300.0, "eta_s": 90.0, "idle_s": 75.0}
    p = RunProgress(100, 55, interval_s=0.05, stream=out, rate_source=lambda: recent)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        p.tick()
        time.sleep(0.01)
    lines = out.getvalue().strip().splitlines()
    assert 5 <= len(lines) <= 11, lines
    assert all("55/100 rows" in ln for ln in lines)
    assert lines[-1].endswith("| 0.50 records/s (last 5 min) | ETA 1m30s | no row for 75 s"), lines[-1]
