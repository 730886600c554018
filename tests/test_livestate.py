"""Live state and logs of a real run: ``.rag-pipeline/state.json``, ``rag-pipeline status``, progress lines and worker log lines
through a stall, a kill -9 of the run and its resume.

Real: the example Chroma store, the packaged embedding model, spawned RAG workers and generation processes, the
CLI in subprocesses. The benchmark server (bench/bench_server.py) stands in for an LLM server only to make it
hang on demand (``POST /fault {"hang": true}``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.bench_server import launch
from tests.fixtures.llm import requires_llama
from tests.runtools import (
    REPO,
    committed_parts,
    read_ids,
    run_args,
    start_run,
    wait_for_parts,
    wait_no_survivors,
    write_config,
    write_records,
)

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
PROGRESS_RE = re.compile(rf"^({STAMP}) \[progress\] (\d+)/(\d+) rows")


class _Stderr:
    """A subprocess's stderr lines, collected in a thread with the time each arrived."""

    def __init__(self, proc) -> None:
        self.lines: list[tuple[float, str]] = []
        self._t = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._t.start()

    def _read(self, proc) -> None:
        for line in proc.stderr:
            self.lines.append((time.time(), line.rstrip("\n")))

    @property
    def text(self) -> str:
        return "\n".join(ln for _, ln in self.lines)

    def progress(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, int]]:
        """(time received, rows) of the [progress] lines received in [since, until]."""
        out = []
        for t, ln in self.lines:
            m = PROGRESS_RE.match(ln)
            if m and since <= t <= until:
                out.append((t, int(m.group(2))))
        return out

    def join(self) -> None:
        self._t.join(10)


def _status(out: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(out), *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res


def _state(out: Path) -> dict:
    return json.loads((out / ".rag-pipeline/state.json").read_text())


@pytest.fixture
def bench():
    servers = launch(1, service_ms=300, capacity=2)
    try:
        yield servers
    finally:
        servers.stop()


def test_state_status_progress_and_logs_through_a_stall_a_kill_and_a_resume(tmp_path, example_store, bench):
    """The endpoint hangs for 8 s mid-run: the state file keeps being rewritten with a fresh time, progress lines
    keep their 1 s interval, `status` says running with a heartbeat age and the run's counts; a worker's
    warning (its LLM client's breaker) reaches the run's stderr with timestamp and role, and its own log file;
    no DEBUG line at default verbosity. kill -9 of the run: `status` says stopped (the run died). The resume
    completes: `status` says complete."""
    records = write_records(tmp_path, 60)
    out = tmp_path / "out"
    store = tmp_path / "store"  # a copy without its BM25 index: rank0 builds it, and bm25s logs DEBUG lines then
    shutil.copytree(example_store.store_cfg.path, store)
    shutil.rmtree(store / "bm25")
    cfg = write_config(tmp_path, {
        "run": {"progress_interval_s": 1.0, "lock_refresh_s": 0.5, "heartbeat_interval_s": 0.5,
                "heartbeat_timeout_s": 30.0},
        "generation": {"num_processes": 1}, "retrieval": {"query_batch_size": 2},
        "llm": {"max_concurrency": 2, "read_timeout_s": 2.0},
    })
    args = run_args(records, out, cfg, "--endpoints", bench.urls[0], "--store", str(store), "--collection",
                    example_store.store_cfg.collection)
    proc, marker = start_run(args)
    err = _Stderr(proc)
    try:
        wait_for_parts(out, 2, proc)
        assert _state(out)["phase"] == "running"

        # ---- the stall: nothing answers for 8 s
        t_hang = time.time()
        bench.fault({"hang": True, "for_s": 8})
        samples = []
        for at in (1.5, 4.0, 6.5):
            time.sleep(max(0.0, t_hang + at - time.time()))
            st = _state(out)
            samples.append((time.time(), st["updated_unix"], st["phase"]))
        running = json.loads(_status(out, "--json").stdout)
        text = _status(out).stdout
        t_end = t_hang + 8.0
        time.sleep(max(0.0, t_end - time.time()))
        assert proc.poll() is None, err.text[-3000:]

        for seen_at, updated, phase in samples:  # rewritten every ~1 s although no row finished
            assert phase == "running" and seen_at - updated < 3.0, (samples, err.text[-2000:])
        assert len({u for _, u, _ in samples}) == 3
        stall = err.progress(t_hang + 1.0, t_end)
        assert len(stall) >= 4, (stall, err.text[-3000:])  # 1 line a second, during the stall too
        gaps = [b[0] - a[0] for a, b in zip(stall, stall[1:], strict=False)]
        assert max(gaps) < 2.5, gaps

        run = running["run"]
        assert run["state"] == "running" and run["heartbeat_age_s"] < 5.0 and run["live"]["phase"] == "running"
        assert running["done"] == run["live"]["rows"] >= running["committed"] >= 2
        assert running["total"] == 60
        assert "running (host" in text and "last heartbeat" in text and "records/s over the last" in text

        # ---- kill -9 of the run
        n_parts = len(committed_parts(out))
        wait_for_parts(out, n_parts + 2, proc)
        proc.kill()
        proc.wait(30)
        err.join()
        assert wait_no_survivors(marker) == []
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = err.text
    worker_warning = re.search(rf"^{STAMP} WARNING (gen|rag)-\d pipeline\.llm\.client: endpoint {bench.urls[0]}: "
                               r"\d+ failures in a row \(last: \w+: .+\): skipped until \d\d:\d\d:\d\d", stderr, re.M)
    assert worker_warning, stderr[-4000:]
    role = worker_warning.group(1) + "-0"
    assert "failures in a row" in (out / ".rag-pipeline/logs" / f"{role}.log").read_text()
    assert not [ln for ln in stderr.splitlines() if "DEBUG" in ln], "no DEBUG line at default verbosity"
    assert (store / "bm25").is_dir()  # rank0 built the index (bm25s logged at DEBUG meanwhile: not shown)
    log_lines = [ln for ln in stderr.splitlines() if re.match(rf"^{STAMP} (INFO|WARNING|ERROR) ", ln)]
    assert log_lines and all(re.match(rf"^{STAMP} \w+ (main|rag-\d+|gen-\d+) [\w.]+: ", ln) for ln in log_lines)
    assert "[progress]" in (out / ".rag-pipeline/logs" / "main.log").read_text()

    stopped = json.loads(_status(out, "--json").stdout)
    assert stopped["run"]["state"] == "stopped", stopped["run"]
    assert "died" in stopped["run"]["reason"] and "is gone" in stopped["run"]["reason"]
    assert stopped["done"] == stopped["committed"] == len(read_ids(out))
    assert "stopped: the run died" in _status(out).stdout

    # ---- resume to the end
    proc, marker = start_run(args)
    _, resumed_err = proc.communicate(timeout=600)
    assert proc.returncode == 0, resumed_err[-3000:]
    done = json.loads(_status(out, "--json").stdout)
    assert done["run"]["state"] == "complete" and done["complete"] is True
    assert done["done"] == 60 and _state(out)["phase"] == "complete"
    assert ", complete" in _status(out).stdout.splitlines()[0]
    assert sorted(read_ids(out)) == sorted(json.loads(x)["id"] for x in records.read_text().splitlines())
    main_log = (out / ".rag-pipeline/logs" / "main.log").read_text()
    assert main_log.count("run phase: running") == 2 and "run phase: complete" in main_log


def test_no_debug_line_at_default_verbosity_although_libraries_log_at_debug(tmp_path):
    """The libraries an ingest uses (chromadb, sentence-transformers, ...) log at DEBUG: shown with -vv (so such
    lines exist), never at the default verbosity, where rag-pipeline's INFO lines are shown in the one format."""
    from tests.fixtures.store import write_small_corpus

    src = write_small_corpus(tmp_path / "src")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    errs = {}
    for flags in ((), ("-vv",)):
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", *flags, "ingest", str(src), "--store",
                              str(tmp_path / f"store{len(flags)}"), "--collection", "small", "--no-progress"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        errs[flags] = res.stderr
    assert re.search(rf"^{STAMP} DEBUG main (?!pipeline\.)\S+: ", errs[("-vv",)], re.M), errs[("-vv",)][-3000:]
    default = errs[()]
    assert "DEBUG" not in default, default
    assert re.search(rf"^{STAMP} INFO main pipeline\.corpus\.ingest: ", default, re.M), default


@requires_llama
def test_server_start_up_milestones_are_info_lines(llama_server_factory, caplog, monkeypatch):
    """A real llama.cpp server: started (pid, log), still loading (here every 0.2 s instead of every minute),
    ready after N s: all at INFO, so the default verbosity shows a long start-up is alive."""
    from pipeline.servers import pool as pool_mod

    monkeypatch.setattr(pool_mod, "LOADING_NOTE_S", 0.2)
    with caplog.at_level(logging.INFO, logger="pipeline.servers.pool"):
        pool = llama_server_factory(1)
    port = pool.specs[0].port
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith(f"llamacpp server on port {port} started (pid") for m in infos), infos
    assert any(m.startswith(f"server on port {port} still loading after") and "last line" in m for m in infos), infos
    assert any(re.match(rf"server on port {port} is ready after \d+\.\d s", m) for m in infos), infos
