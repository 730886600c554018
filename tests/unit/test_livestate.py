"""Live state and logs without processes: the recent-rate window and its ETA, log aggregation and verbosity,
the forwarded log line's format, the state snapshot from a real scheduler, and how a reader judges a state file
by the lock (running / died / stopped / complete)."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
from types import SimpleNamespace

import pytest

from pipeline import logs
from pipeline.output.files import atomic_write_json
from pipeline.output.layout import LOCK_FILE, STATE_FILE, meta_path
from pipeline.output.livestate import live_counts, read_state, run_liveness
from pipeline.output.lock import DirLock
from pipeline.run.scheduler import RAG
from pipeline.run.state import LiveState, RateWindow
from tests.unit.scheduling import A, held, inc, make, rag_fail, rag_ok


# ---------------------------------------------------------------- recent rate and ETA
def test_rate_is_over_the_recent_window_not_the_lifetime():
    w = RateWindow(window_s=300.0)
    n = 0
    for t in range(0, 601):  # 10 records/s for 10 minutes
        w.add(float(t), n)
        n += 10
    assert w.rate(600.0) == pytest.approx(10.0, rel=0.01)
    for t in range(601, 1201):  # then 1 record/s for 10 minutes: a slowdown
        w.add(float(t), n)
        n += 1
    lifetime = n / 1200.0
    assert lifetime > 5.0  # the lifetime average still says > 5 records/s
    assert w.rate(1200.0) == pytest.approx(1.0, rel=0.02)  # the window knows the run is at 1 record/s
    assert w.eta_s(1200.0, 600) == pytest.approx(600.0, rel=0.02)  # not the ~110 s the lifetime rate gives


def test_rate_falls_during_a_stall_and_the_eta_becomes_unknown():
    w = RateWindow(window_s=60.0)
    for t in range(0, 61):
        w.add(float(t), 2 * t)
    assert w.rate(60.0) == pytest.approx(2.0)
    for t in range(61, 91):  # no record finishes for 30 s
        w.add(float(t), 120)
    assert w.rate(90.0) == pytest.approx(1.0, rel=0.05)  # half the window stalled: half the rate
    assert w.idle_s(90.0) == pytest.approx(30.0)
    for t in range(91, 200):
        w.add(float(t), 120)
    assert w.rate(199.0) == 0.0
    assert w.eta_s(199.0, 10) is None  # a whole window without a record: no honest ETA
    assert w.eta_s(199.0, 0) == 0.0


def test_rate_window_memory_is_bounded_by_its_resolution():
    w = RateWindow(window_s=10.0, resolution_s=1.0)
    for k in range(10_000):
        w.add(k * 0.01, k)  # 100 samples a second
    assert len(w._samples) <= 13
    assert w.rate(99.99) == pytest.approx(100.0, rel=0.02)


def test_rate_is_unknown_before_time_passes():
    w = RateWindow()
    assert w.rate(5.0) is None
    w.add(5.0, 0)
    assert w.rate(5.0) is None and w.eta_s(5.0, 3) is None


# ---------------------------------------------------------------- logs: aggregation, verbosity, format
class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _record(msg: str, key: str | None, role: str, name: str = "pipeline.llm.client") -> logging.LogRecord:
    rec = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)
    rec.role = role
    if key:
        rec.repeat_key = key
    return rec


def _capture(window_s: float = 30.0) -> tuple[logging.Handler, list[str], _Clock]:
    out: list[str] = []
    clock = _Clock()

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out.append(f"{getattr(record, 'role', '?')} {record.getMessage()}")

    h = H()
    agg = logs.RepeatAggregator(window_s, clock)
    agg.handler = h
    h.addFilter(agg)
    h.agg = agg  # type: ignore[attr-defined]
    return h, out, clock


def test_repeated_breaker_messages_of_four_processes_become_two_lines():
    """The outage seen by a user: 22 lines from 4 processes in 30 s -> the first one, then one summary."""
    h, out, clock = _capture()
    key = "endpoint http://x:1 skipped after failures"
    roles = ["gen-0", "gen-1", "gen-2", "rag-0"]
    for k in range(22):
        clock.t = k * 1.3
        h.handle(_record(f"endpoint http://x:1: {k + 7} failures in a row: skipped until 14:05:{k:02d}", key,
                         roles[k % 4]))
    h.handle(_record("something else", None, "main"))
    assert out == ["gen-0 endpoint http://x:1: 7 failures in a row: skipped until 14:05:00", "main something else"]
    clock.t = 29.0
    assert h.agg.flush() == 0  # the window is not over
    clock.t = 31.0
    assert h.agg.flush() == 1
    assert out[-1] == ("main endpoint http://x:1 skipped after failures: 21 more times in 30 s (gen-0, gen-1, "
                       "gen-2, rag-0); last: endpoint http://x:1: 28 failures in a row: skipped until 14:05:21")
    clock.t = 40.0  # a new window: shown again
    h.handle(_record("endpoint http://x:1: 2 failures in a row", key, "gen-3"))
    assert out[-1] == "gen-3 endpoint http://x:1: 2 failures in a row"


def test_a_single_event_has_no_summary_and_keys_are_independent():
    h, out, clock = _capture(window_s=10.0)
    h.handle(_record("a down", "a", "gen-0"))
    h.handle(_record("b down", "b", "gen-0"))
    h.handle(_record("b down again", "b", "gen-1"))
    clock.t = 11.0
    h.handle(_record("a down once more", "a", "gen-2"))  # the window of "a" closed with nothing counted
    assert out == ["gen-0 a down", "gen-0 b down", "gen-2 a down once more"]
    h.agg.flush(all_groups=True)
    assert out[-1].startswith("main b: 1 more time in 10 s (gen-1); last: b down again")


@pytest.mark.parametrize("verbosity, project, other", [
    (-1, {"WARNING"}, {"WARNING"}),
    (0, {"INFO", "WARNING"}, {"WARNING"}),
    (1, {"DEBUG", "INFO", "WARNING"}, {"WARNING"}),
    (2, {"DEBUG", "INFO", "WARNING"}, {"DEBUG", "INFO", "WARNING"}),
])
def test_verbosity_filter_project_info_third_party_warning(verbosity, project, other):
    """bm25s sets its own logger to DEBUG at import: its DEBUG lines are still filtered out below -vv."""
    f = logs.VerbosityFilter(verbosity)
    for name in ("pipeline.llm.client", "workers.generation", "urllib3.connectionpool", "bm25s"):
        want = project if logs.is_project(name) else other
        got = {logging.getLevelName(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING)
               if f.filter(logging.LogRecord(name, level, __file__, 1, "m", None, None))}
        assert got == want, name


def test_a_worker_line_reaches_main_with_its_role_time_and_logger():
    """ForwardHandler (worker side) -> LogLine -> emit_forwarded (main side) -> the one format."""
    sent: list = []
    fwd = logs.ForwardHandler(sent.append)
    rec = logging.LogRecord("pipeline.llm.client", logging.WARNING, __file__, 1, "endpoint %s: %d failures",
                            ("http://x:1", 7), None)
    rec.role = "gen-2"
    rec.created = 1_800_000_000.0
    rec.repeat_key = "k"
    fwd.handle(rec)
    (line,) = sent
    assert (line.role, line.text, line.repeat_key, line.name) == ("gen-2", "endpoint http://x:1: 7 failures", "k",
                                                                  "pipeline.llm.client")
    stream = io.StringIO()
    h = logging.StreamHandler(stream)
    h.setFormatter(logging.Formatter(logs.FORMAT, logs.DATEFMT))
    target = logging.getLogger("pipeline.llm.client")
    target.addHandler(h)
    try:
        logs.emit_forwarded(line)
    finally:
        target.removeHandler(h)
    stamp = logging.Formatter(datefmt=logs.DATEFMT).formatTime(rec, logs.DATEFMT)
    assert stream.getvalue() == f"{stamp} WARNING gen-2 pipeline.llm.client: endpoint http://x:1: 7 failures\n"


def test_forwarding_never_recurses():
    """A record logged while the handler sends (by the send itself) is dropped, not sent in a loop."""
    sent: list = []
    lg = logging.getLogger("pipeline.test_forwarding")

    def send(msg):
        sent.append(msg)
        lg.warning("logged inside send")

    fwd = logs.ForwardHandler(send)
    lg.addHandler(fwd)
    lg.propagate = False
    try:
        lg.warning("outer")
    finally:
        lg.removeHandler(fwd)
        lg.propagate = True
    assert [m.text for m in sent] == ["outer"]


# ---------------------------------------------------------------- the hold message
def test_a_hold_after_failures_is_not_called_unavailable(caplog):
    """Records failed on every endpoint while every probe says up: 'held for N s', never 'unavailable'."""
    s = make(2, inflight=4)
    s.health.observe_probes({A: "up"})
    s.dispatch(0.5)
    a = held(s, "rag-0")[0]
    s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(a, unavailable=True)], 1.0)
    with caplog.at_level(logging.WARNING, logger="pipeline.run.scheduler"):
        s.dispatch(1.1)
    text = caplog.text
    assert "rag dispatch paused: held for 30 s after records failed on every endpoint (probes: all up)" in text
    assert "unavailable" not in text
    assert s.paused(RAG, 1.1) == "held 30 s"
    s.health.observe_probes({A: "down"})
    assert s.paused(RAG, 1.2) == "endpoints down"


# ---------------------------------------------------------------- the state file and its reader
class _Writer:
    """The parts of RowWriter the live state reads: pending rows, retry ids, the ledger of committed ids."""

    class _OD:
        def __init__(self) -> None:
            self.ledger: set[str] = set()

    def __init__(self) -> None:
        self.pending: list[dict] = []
        self.retry_ids: set[str] = set()
        self.od = self._OD()


def _live(tmp_path, s=None, clock=None, total=10, done_before=0):
    writer = _Writer()
    parts = SimpleNamespace(scheduler=s, signals=None)
    return LiveState(tmp_path, total=total, done_before=done_before, interval_s=5.0, writer=writer, parts=parts,
                     clock=clock or _Clock()), writer


def test_state_snapshot_counts_in_flight_per_endpoint_pending_rows_and_errors(tmp_path):
    s = make(10, inflight=4)
    clock = _Clock()
    live, writer = _live(tmp_path, s, clock, total=12, done_before=2)
    live.set_phase("running")
    s.dispatch(0.0)
    items = held(s, "rag-0")
    s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_ok(items[0])], 0.5)
    s.dispatch(0.6)  # its generation goes out: 3 RAG answers + 1 generation in flight on A
    for rid, rs, gs, err in [("r0", "ok", "ok", None), ("r1", "hard_fail", "skipped", "StoreError: gone"),
                             ("r2", "ok", "failed", None)]:
        row = {"id": rid, "rag_status": rs, "gen_status": gs, "rag_error": err,
               "gen_error": "RequestFailed: 500" if gs == "failed" else None}
        live.row(row)
        writer.pending.append(row)
    writer.od.ledger = {"old-1", "old-2", "r0"}
    writer.pending.pop(0)  # r0 was committed
    clock.t = 10.0
    snap = live.snapshot()
    assert snap["phase"] == "running" and snap["host"] == socket.gethostname() and snap["pid"] == os.getpid()
    assert snap["rows"] == 5 and snap["committed_rows"] == 3
    assert snap["pending"] == {"rows": 2, "rag_status": {"hard_fail": 1, "ok": 1},
                               "gen_status": {"failed": 1, "skipped": 1}}
    assert snap["counts"]["gen_status"] == {"failed": 1, "ok": 1, "skipped": 1}
    assert {"error": "rag_error: StoreError: gone", "count": 1} in snap["errors"]
    assert snap["endpoints"] == {A: {"in_flight": 4, "limit": 4, "probe": None}}
    assert snap["outstanding"] == 4 and snap["waiting_generation"] == 0
    assert snap["paused"] == {"rag": None, "gen": None}
    assert snap["rate"]["records_per_s"] == pytest.approx(0.3) and snap["rate"]["eta_s"] == pytest.approx(23.3, 0.01)
    json.dumps(snap)  # serialisable as it is


def test_state_is_rewritten_every_interval_and_after_a_commit_without_records(tmp_path):
    clock = _Clock()
    live, writer = _live(tmp_path, clock=clock)
    live.set_phase("running")
    first = read_state(tmp_path)["updated_unix"]
    written = []
    orig = live.write

    def spy(now=None):
        written.append(clock.t)
        orig(now)

    live.write = spy  # type: ignore[method-assign]
    for k in range(1, 61):  # 12 s of ticks every 0.2 s, no record finishes
        clock.t = k * 0.2
        live.tick()
    assert written == pytest.approx([5.0, 10.0])
    writer.od.ledger = {"r9"}  # a part was committed: written at the next tick a second after the last write
    clock.t = 10.4
    live.tick()
    assert written[-1] == pytest.approx(10.0)
    clock.t = 11.0
    live.tick()
    assert written[-1] == pytest.approx(11.0)
    assert read_state(tmp_path)["updated_unix"] >= first


def test_reader_running_while_the_lock_is_held_then_died_then_stopped_or_complete(tmp_path):
    live, _ = _live(tmp_path)
    live.set_phase("running")
    lock = DirLock(tmp_path, refresh_s=0.05)
    lock.acquire()
    try:
        run = run_liveness(tmp_path, complete=False)
        assert run["state"] == "running" and run["pid"] == os.getpid() and run["live"]["phase"] == "running"
        assert run["heartbeat_age_s"] is not None and run["heartbeat_age_s"] < 5
        assert live_counts(run["live"], 0) == {"rows": 0, "rag_status": {}, "gen_status": {}}
        assert live_counts(run["live"], 7) is None  # a part committed after the state: read again
    finally:
        lock.release()
    # a run killed -9: its lock file stays, with a pid that no longer exists on this machine
    info = json.loads(json.dumps({**lock._identity(), "pid": _dead_pid(), "pid_started": 1.0}))
    meta_path(tmp_path, LOCK_FILE).write_text(json.dumps(info))
    state = read_state(tmp_path)
    atomic_write_json(meta_path(tmp_path, STATE_FILE), {**state, "pid": info["pid"]})
    run = run_liveness(tmp_path, complete=False)
    assert run["state"] == "stopped" and run["live"] is None
    assert run["reason"].startswith("the run died: process") and "is gone" in run["reason"]
    meta_path(tmp_path, LOCK_FILE).unlink()
    run = run_liveness(tmp_path, complete=False)  # no lock, the state still says running: died as well
    assert run["state"] == "stopped" and "died" in run["reason"]
    live.finish(complete=False, reason="SIGTERM")
    assert run_liveness(tmp_path, complete=False)["reason"] == "SIGTERM"
    live.finish(complete=True, reason=None)
    assert run_liveness(tmp_path, complete=True)["state"] == "complete"


def _dead_pid() -> int:
    import psutil

    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid += 1
    return pid


def test_a_stop_signal_turns_the_phase_to_draining_then_stopped(tmp_path):
    class _Signals:
        name = "SIGTERM"

    s = make(4, inflight=4)
    live, _ = _live(tmp_path, s)
    live.parts.signals = _Signals()
    live.set_phase("running")
    s.stop()
    live.tick()
    st = read_state(tmp_path)
    assert st["phase"] == "draining" and st["stop_reason"] == "SIGTERM received: in-flight records finish"
    live.finish(complete=False, reason="SIGTERM")
    st = read_state(tmp_path)
    assert (st["phase"], st["stop_reason"]) == ("stopped", "SIGTERM")


def test_status_text_of_a_running_run_says_heartbeat_rate_eta_and_uncommitted_rows():
    from pipeline.cli.results import format_status

    live = {"phase": "running", "rate": {"records_per_s": 0.42, "window_s": 300.0, "eta_s": 14.0, "idle_s": 2.0},
            "endpoints": {A: {"in_flight": 5, "limit": 5, "probe": "up"}}, "paused": {"rag": None, "gen": "held 30 s"}}
    st = {"path": "out", "total": 20, "done": 14, "committed": 12, "rejected": 0, "complete": False,
          "rag_status": {"ok": 14}, "gen_status": {"ok": 14},
          "run": {"state": "running", "host": "node17", "pid": 4242, "heartbeat_age_s": 3.2, "phase": "running",
                  "phase_since": "2026-12-03T14:02:11+0000", "updated_age_s": 1.0, "live": live, "reason": None}}
    text = format_status(st)
    assert text.splitlines()[0] == "out: 14/20 records done (70.0%), running"
    assert "running (host node17, pid 4242); phase running since 2026-12-03T14:02:11+0000; last heartbeat 3 s ago" in text
    assert "rate: 0.42 records/s over the last 5 min, ETA 14 s; last row 2 s ago" in text
    assert "12 rows committed, 2 finished and not committed yet" in text
    assert f"endpoint {A}: 5/5 in flight, probe up" in text and "gen dispatch paused: held 30 s" in text
    assert text.splitlines()[-1] == "  manifest out/.rag-pipeline/manifest.json  logs out/.rag-pipeline/logs/"
    dead = {**st, "done": 12, "committed": 12,
            "run": {**st["run"], "state": "stopped", "live": None, "reason": "the run died: process 4242 is gone"}}
    assert "run: stopped: the run died: process 4242 is gone; host node17, pid 4242; last heartbeat 3 s ago" in \
        format_status(dead)


def test_quiet_and_verbose_flags_set_the_verbosity():
    from click.testing import CliRunner

    from pipeline.cli import main

    try:
        for flags, want in ((["-q"], -1), ([], 0), (["-v"], 1), (["-vv"], 2), (["-vvv"], 2)):
            res = CliRunner().invoke(main, [*flags, "config"])
            assert res.exit_code == 0, res.output
            assert logs.verbosity() == want, flags
    finally:
        logs.setup(0)


def test_state_names_the_metrics_url_when_metrics_are_on(tmp_path):
    live, _ = _live(tmp_path)
    assert "metrics_url" not in live.snapshot(0.0)
    live.parts.metrics = SimpleNamespace(url="http://127.0.0.1:9400/metrics")
    assert live.snapshot(0.0)["metrics_url"] == "http://127.0.0.1:9400/metrics"
