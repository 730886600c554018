"""Progress output: plain lines (no carriage returns) when stderr is not a terminal, bars on a terminal."""

from __future__ import annotations

import io

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
    assert last.startswith("[progress] 5/10 rows (50.0%)")
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


def test_disabled_writes_nothing():
    out = io.StringIO()
    p = RunProgress(4, 0, enabled=False, interval_s=0.0, stream=out)
    p.finished_one("ok", "ok")
    p.close()
    assert out.getvalue() == ""
