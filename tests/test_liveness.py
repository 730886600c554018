"""Liveness, outages and stopping, with real components.

Real: the example Chroma store, the packaged embedding model, spawned RAG workers and generation processes, the
CPU llama.cpp server (managed tests). The benchmark server (bench/bench_server.py) stands in for a GPU server
where a fault must be injected on demand (``POST /fault``: a hang, closed connections); that is its only role.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest
import requests

from bench.bench_server import launch
from pipeline.servers.health import DOWN, RESTARTING, UP, EndpointMonitor
from tests.fixtures.llm import free_port_block, requires_llama
from tests.runtools import (
    processes_with_marker,
    read_ids,
    read_rows,
    run_args,
    start_run,
    store_args,
    wait_for_parts,
    wait_no_survivors,
    write_config,
    write_records,
)

FAST_LIVENESS = {"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 15.0}


class _Stderr:
    """Collects a subprocess's stderr lines in a thread, so a test can wait for a log line while the run goes on."""

    def __init__(self, proc) -> None:
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._t.start()

    def _read(self, proc) -> None:
        for line in proc.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, count: int = 1, timeout_s: float = 180.0, proc=None) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(text in ln for ln in self.lines) < count:
            if proc is not None and proc.poll() is not None:
                time.sleep(0.5)
                raise AssertionError(f"run exited ({proc.returncode}) before {text!r}:\n{self.text[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in time:\n{self.text[-3000:]}")
            time.sleep(0.1)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def finish(self, proc, timeout_s: float = 600.0) -> str:
        proc.wait(timeout=timeout_s)
        self._t.join(10)
        return self.text


def _workers(marker: str, run_pid: int) -> list[psutil.Process]:
    """The run's spawned workers, largest memory first (RAG workers hold torch: they come first)."""
    found = [p for p in processes_with_marker(marker) if "spawn_main" in " ".join(p.cmdline()) and p.pid != run_pid]
    return sorted(found, key=lambda p: p.memory_info().rss, reverse=True)


def _want(records) -> list[str]:
    return sorted(json.loads(x)["id"] for x in records.read_text().splitlines())


@pytest.fixture
def bench():
    servers = launch(2, service_ms=300, capacity=2)
    try:
        yield servers
    finally:
        servers.stop()


# ------------------------------------------------------------------------------------------------ item 1
@pytest.mark.parametrize("role", ["gen", "rag"])
def test_stopped_worker_is_killed_replaced_and_its_records_requeued(tmp_path, example_store, bench, role):
    """SIGSTOP a generation process or a RAG worker while it holds records: it sends no heartbeat, main declares it
    hung after run.heartbeat_timeout_s, kills it, starts a replacement and requeues its records; every record ends
    with one ok row."""
    records = write_records(tmp_path, 12)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"run": {**FAST_LIVENESS, "queue_size": 4}, "generation": {"num_processes": 1},
                                  "retrieval": {"query_batch_size": 2}, "llm": {"max_concurrency": 2}})
    proc, marker = start_run(run_args(records, out, cfg, "--endpoints", bench.urls[0], *store_args(example_store)))
    err = _Stderr(proc)
    wait_for_parts(out, 1, proc)
    workers = _workers(marker, proc.pid)
    assert len(workers) == 2, [w.cmdline() for w in workers]
    victim = workers[0] if role == "rag" else workers[-1]
    victim.suspend()
    try:
        text = err.finish(proc)
    finally:
        if victim.is_running():
            victim.kill()
    assert proc.returncode == 0, text[-3000:]
    assert f"{role}-0 is hung" in text and "no heartbeat" in text and "requeueing" in text
    assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE, "the hung process must be killed"
    assert sorted(read_ids(out)) == _want(records)
    assert all(r["rag_status"] == "ok" and r["gen_status"] == "ok" for r in read_rows(out))
    assert wait_no_survivors(marker) == []


def test_record_past_its_deadline_requeued_once_then_its_error_row(tmp_path, example_store, bench):
    """The generation endpoint hangs (alive, heartbeats fine, requests unanswered): after run.gen_deadline_s the
    process holding the records is killed and replaced, the records requeued; when they hang a second time they
    get their error row (as for a crash). Records after the hang are generated normally."""
    records = write_records(tmp_path, 10)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"run": {**FAST_LIVENESS, "gen_deadline_s": 5.0, "queue_size": 4},
                                  "generation": {"num_processes": 1, "endpoints": [bench.urls[1]]},
                                  "retrieval": {"query_batch_size": 2}, "llm": {"max_concurrency": 2}})
    bench.fault({"hang": True, "for_s": 3600}, index=1)
    proc, marker = start_run(run_args(records, out, cfg, "--endpoints", bench.urls[0], *store_args(example_store)))
    err = _Stderr(proc)
    err.wait_for("gen-0 is hung", count=2, proc=proc)
    bench.fault({}, index=1)
    text = err.finish(proc)
    assert proc.returncode == 0, text[-3000:]
    assert "gen_deadline_s" in text
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == _want(records)
    failed = [r for r in rows if r["gen_status"] != "ok"]
    assert 1 <= len(failed) <= 2, [(r["id"], r["gen_status"], r["gen_error"]) for r in rows]
    for r in failed:
        assert r["gen_status"] == "failed" and "twice" in r["gen_error"] and "gen_deadline_s" in r["gen_error"]
    assert wait_no_survivors(marker) == []


@requires_llama
def test_server_not_answering_health_is_restarted_in_background(llama_server_factory):
    """A managed server alive but not answering (SIGSTOP) is declared down after servers.health_timeout_s and
    restarted in the background: the pool's lock is free meanwhile (check_alive answers at once); the restart
    is never reported as a server joining the run (poll_startup, which the run polls for late SGLang servers
    and which would start a second RAG worker for it); a frozen monitor (the run is stopping) restarts nothing."""
    pool = llama_server_factory(1, health_interval_s=0.3, health_timeout_s=3.0)
    old_pid = pool.pids[0]
    mon = EndpointMonitor(pool.endpoints, pool.cfg.servers, pool)
    mon.start()
    try:
        assert mon.states() == {pool.endpoints[0]: UP}
        os.killpg(old_pid, signal.SIGSTOP)
        seen: set[str] = set()
        lock_waits: list[float] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            seen.add(mon.states()[pool.endpoints[0]])
            t0 = time.monotonic()
            pool.check_alive()
            pool.returncode(pool.specs[0].port)
            lock_waits.append(time.monotonic() - t0)
            joined = pool.poll_startup() if pool.starting() else []
            assert joined == [], "a restarted server was reported as joining the run"
            if RESTARTING in seen and mon.states()[pool.endpoints[0]] == UP:
                break
            time.sleep(0.05)
        assert RESTARTING in seen and mon.states()[pool.endpoints[0]] == UP, seen
        assert pool.pids and pool.pids[0] != old_pid and not psutil.pid_exists(old_pid) or \
            psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
        assert max(lock_waits) < 0.5, f"the pool lock was held {max(lock_waits):.1f} s during the restart"
        r = requests.post(pool.endpoints[0] + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 200
        mon.freeze()
        os.killpg(pool.pids[0], signal.SIGKILL)
        time.sleep(2.0)
        assert mon.states()[pool.endpoints[0]] == DOWN and pool.check_alive() == [pool.specs[0].port]
    finally:
        mon.stop()


# ------------------------------------------------------------------------------------------------ item 3
def test_outage_pauses_dispatch_and_resumes_without_failure_rows(tmp_path, example_store, bench):
    """Every endpoint closes its connections for a while (attach mode): dispatch pauses instead of turning the
    remaining records into failure rows, and resumes when an endpoint answers; every row is ok."""
    records = write_records(tmp_path, 16)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"run": {"queue_size": 4}, "retrieval": {"query_batch_size": 2},
                                  "servers": {"health_interval_s": 0.5},
                                  "llm": {"max_concurrency": 2, "breaker_cooldown_s": 2.0}})
    proc, marker = start_run(run_args(records, out, cfg, "--endpoints", ",".join(bench.urls),
                                      *store_args(example_store)))
    err = _Stderr(proc)
    wait_for_parts(out, 1, proc)
    bench.fault({"close": True, "for_s": 8})
    text = err.finish(proc)
    assert proc.returncode == 0, text[-3000:]
    assert "dispatch paused" in text and "dispatch resumed" in text
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == _want(records)
    assert [(r["id"], r["rag_error"], r["gen_error"]) for r in rows if r["gen_status"] != "ok"] == []
    assert wait_no_survivors(marker) == []


def test_endpoints_back_up_end_the_breaker_cooldown(tmp_path, example_store, bench):
    """With a 600 s circuit-breaker cool-down, an 8 s outage costs about 8 s, not 600: main's probe sees the
    endpoints answer again, ends the stages' hold and tells every worker's client to probe them at once."""
    records = write_records(tmp_path, 16)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"run": {"queue_size": 4, "max_outage_s": 900.0},
                                  "retrieval": {"query_batch_size": 2}, "servers": {"health_interval_s": 0.5},
                                  "llm": {"max_concurrency": 2, "breaker_failures": 1, "breaker_cooldown_s": 600.0}})
    proc, marker = start_run(run_args(records, out, cfg, "--endpoints", ",".join(bench.urls),
                                      *store_args(example_store)))
    err = _Stderr(proc)
    wait_for_parts(out, 1, proc)
    bench.fault({"close": True, "for_s": 8})
    err.wait_for("dispatch paused", proc=proc, timeout_s=60)
    text = err.finish(proc, timeout_s=240)  # far less than the cool-down: a stuck run fails here
    assert proc.returncode == 0, text[-3000:]
    assert "dispatch resumed" in text
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == _want(records)
    assert [(r["id"], r["rag_error"], r["gen_error"]) for r in rows if r["gen_status"] != "ok"] == []
    assert wait_no_survivors(marker) == []


def test_outage_longer_than_max_outage_stops_resumable_with_exit_75(tmp_path, example_store, bench):
    """An outage longer than run.max_outage_s stops the run cleanly: exit 75, committed rows kept, no failure row;
    the same command completes the job once the endpoints are back."""
    records = write_records(tmp_path, 16)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"run": {"queue_size": 4, "max_outage_s": 6.0},
                                  "retrieval": {"query_batch_size": 2}, "servers": {"health_interval_s": 0.5},
                                  "llm": {"max_concurrency": 2, "breaker_cooldown_s": 2.0}})
    args = run_args(records, out, cfg, "--endpoints", ",".join(bench.urls), *store_args(example_store))
    proc, marker = start_run(args)
    err = _Stderr(proc)
    wait_for_parts(out, 1, proc)
    bench.fault({"close": True, "for_s": 3600})
    text = err.finish(proc)
    assert proc.returncode == 75, text[-3000:]
    assert "run.max_outage_s" in text and "run the same command again to resume" in text
    assert "Traceback" not in text
    first = read_rows(out)
    assert 1 <= len(first) < 16
    assert all(r["rag_status"] == "ok" and r["gen_status"] == "ok" for r in first), [
        (r["id"], r["rag_status"], r["rag_error"], r["gen_status"], r["gen_error"]) for r in first
        if r["rag_status"] != "ok" or r["gen_status"] != "ok"]
    assert wait_no_survivors(marker) == []
    bench.fault({})
    proc, marker = start_run(args)
    _, text = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-3000:]
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == _want(records)
    assert all(r["rag_status"] == "ok" and r["gen_status"] == "ok" for r in rows)


# ------------------------------------------------------------------------------------------------ item 2
def test_sigterm_while_endpoints_go_down_leaves_failed_requests_uncommitted(tmp_path, example_store, bench):
    """Preemption as Slurm does it: the run gets SIGTERM and its servers go down at the same moment. Requests that
    fail because of it are left for the resume, never committed as failures; the resume completes every record."""
    records = write_records(tmp_path, 16)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"run": {"queue_size": 4}, "retrieval": {"query_batch_size": 2},
                                  "llm": {"max_concurrency": 2}})
    args = run_args(records, out, cfg, "--endpoints", ",".join(bench.urls), *store_args(example_store))
    proc, marker = start_run(args)
    err = _Stderr(proc)
    wait_for_parts(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    bench.fault({"close": True, "for_s": 3600})
    text = err.finish(proc)
    assert proc.returncode == 130, text[-3000:]
    first = read_rows(out)
    assert len(first) < 16
    assert [(r["id"], r["rag_error"], r["gen_error"]) for r in first if r["gen_status"] != "ok"] == []
    assert wait_no_survivors(marker) == []
    bench.fault({})
    proc, _ = start_run(args)
    _, text = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-3000:]
    rows = read_rows(out)
    assert sorted(r["id"] for r in rows) == _want(records)
    assert all(r["gen_status"] == "ok" for r in rows)


@requires_llama
def test_sigterm_with_managed_server_killed_no_restart_no_failure_rows(tmp_path, example_store):
    """SIGTERM to the run and SIGKILL to its managed llama.cpp server at once: no server is restarted during the
    shutdown, and no record is committed as a failure."""
    records = write_records(tmp_path, 12)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"llm": {"max_concurrency": 1}, "retrieval": {"query_batch_size": 2},
                                  "run": {"queue_size": 2}, "servers": {"health_interval_s": 0.3}})
    proc, marker = start_run(run_args(records, out, cfg, "--base-port", str(free_port_block(1)),
                                      *store_args(example_store)))
    err = _Stderr(proc)
    wait_for_parts(out, 1, proc)
    servers = [p for p in processes_with_marker(marker) if "pipeline.servers.cpu_server" in " ".join(p.cmdline())]
    assert len(servers) == 1
    proc.send_signal(signal.SIGTERM)
    servers[0].kill()
    text = err.finish(proc)
    assert proc.returncode == 130, text[-3000:]
    assert "restarting the server" not in text and "restarted" not in text
    rows = read_rows(out)
    assert rows and [(r["id"], r["rag_error"], r["gen_error"]) for r in rows if r["gen_status"] != "ok"] == []
    assert wait_no_survivors(marker) == []
