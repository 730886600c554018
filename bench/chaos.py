"""Chaos run: one long `rag-pipeline run` hit by random faults, resumed after every stop until complete.

Setup (defaults): the example store (collection "bench"), M records cycling over the 40 example claims; the RAG
answers come from the real CPU llama.cpp server, managed by the run (so the run restarts it when it dies or
hangs); generation goes to 2 benchmark servers (bench/bench_server.py, standing in for GPU servers; they take
injected faults). Faults, drawn at random (seeded; the seed is printed), one every U(min_gap, max_gap) seconds:

    kill9_main      SIGKILL of the main process (no cleanup at all), then resume
    sigterm_main    SIGTERM of the main process (graceful stop, exit 130), then resume
    kill9_server    SIGKILL of the managed llama.cpp server (the run restarts it)
    sigstop_rag     SIGSTOP of a RAG worker past run.heartbeat_timeout_s, then SIGCONT
    sigstop_gen     SIGSTOP of a generation process past run.heartbeat_timeout_s, then SIGCONT
    kill9_worker    SIGKILL of a random worker (RAG or generation)
    http500         one generation endpoint answers HTTP 500 for 20 s
    all_down        every endpoint down for 30 s: both benchmark servers close every connection and the llama.cpp
                    server is SIGSTOPped (the run declares it down after servers.health_timeout_s and restarts it)

After the last fault the run is resumed until it completes. Then a fault-free run of the same input is made and
the report prints: faults injected (by kind), invocations and their exit codes, lost ids, duplicated ids, orphan
processes, failure rows caused by endpoint trouble or the run's own shutdown (retryable errors), failure rows
of records whose worker was hung/killed twice (the documented rule), and the final statuses compared with the
fault-free run.

Usage: python bench/chaos.py [--records 800] [--faults 30] [--seed N] [--workdir DIR]
(800 records last long enough for 30 faults: ~10 minutes on 2 shared cores; with fewer the run can complete
before every fault was injected, and the report says how many were.)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_server import launch  # noqa: E402
from bench.common import PipelineRun, ensure_store, write_config, write_records  # noqa: E402
from tests.runtools import MARKER_ENV, processes_with_marker, wait_no_survivors  # noqa: E402

FAULTS = ["kill9_main", "sigterm_main", "kill9_server", "sigstop_rag", "sigstop_gen", "kill9_worker", "http500",
          "all_down"]
RETRYABLE_MARKS = ("NoEndpointAvailable", "RequestFailed", "connection", "refused", "timeout", "http_5",
                   "StoreError")


def _config(workdir: Path, bench_urls: list[str]) -> Path:
    return write_config(workdir / "chaos.toml", {
        "servers": {"backend": "llamacpp", "cpu_servers": 1, "n_threads": 1, "health_interval_s": 1.0,
                    "health_timeout_s": 10.0, "startup_timeout_s": 120.0, "shutdown_timeout_s": 5.0},
        "llm": {"max_attempts": 3, "backoff_initial_s": 0.2, "backoff_max_s": 1.0, "breaker_failures": 3,
                "breaker_cooldown_s": 3.0, "read_timeout_s": 30.0},
        "retrieval": {"top_k": 1, "query_batch_size": 4},
        "rag": {"max_tokens": 4},
        "generation": {"num_processes": 2, "max_tokens": 8, "endpoints": bench_urls},
        "run": {"part_rows": 10, "grace_s": 20.0, "heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 10.0,
                "rag_deadline_s": 90.0, "gen_deadline_s": 60.0, "max_outage_s": 120.0, "queue_size": 32},
    })


def _read_rows(out: Path) -> list[dict]:
    rows: list[dict] = []
    for part in sorted(out.glob("part-*.parquet")):
        rows += pq.read_table(part, columns=["id", "rag_status", "gen_status", "rag_error", "gen_error"]).to_pylist()
    return rows


def _marked(marker: str) -> list[psutil.Process]:
    """Live processes started by the runs (they carry the marker in their environment); the benchmark servers,
    started by this script, are not the run's."""
    return processes_with_marker(marker, exclude="bench_server.py")


def _wait_orphans(marker: str, timeout_s: float = 30.0) -> list[psutil.Process]:
    return wait_no_survivors(marker, timeout_s, exclude="bench_server.py")


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rag-chaos-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.marker = uuid.uuid4().hex
        os.environ[MARKER_ENV] = self.marker
        self.injected: collections.Counter[str] = collections.Counter()
        self.exits: list[int] = []
        self.orphans_after_stop = 0
        self.run: PipelineRun | None = None
        self.invocation = 0

    def start(self, out: Path, cfg: Path, records: Path, store: Path, collection: str) -> PipelineRun:
        self.invocation += 1
        wd = self.workdir / f"inv{self.invocation:03d}"
        wd.mkdir(exist_ok=True)
        args = ["--input", str(records), "--output", str(out), "--config", str(cfg), "--store", str(store),
                "--collection", collection, "--base-port", str(self.args.base_port)]
        return PipelineRun(wd, args, torch_threads=1)

    def wait_working(self, out: Path, timeout_s: float = 600.0) -> None:
        """Block until the current invocation is processing: every worker it started logged READY (so a fault
        hits a working run, not its startup), or it exited."""
        assert self.run is not None
        deadline = time.monotonic() + timeout_s
        while self.run.proc.poll() is None and time.monotonic() < deadline:
            started = set(self.run.started_pids().values())
            ready = set(self.run.ready_times())
            if started and {"rag-0", "gen-0"} <= ready:
                return
            time.sleep(0.5)

    def pids(self) -> dict[str, list[int]]:
        """Live worker and server pids of the current invocation, by role."""
        assert self.run is not None
        started = self.run.started_pids()
        roles: dict[str, list[int]] = {"rag": [], "gen": [], "server": []}
        for pid, name in started.items():
            if psutil.pid_exists(pid):
                roles[name.split("-")[0]].append(pid)
        for p in _marked(self.marker):
            try:
                if "pipeline.servers.cpu_server" in " ".join(p.cmdline()):
                    roles["server"].append(p.pid)
            except psutil.Error:
                continue
        return roles

    def inject(self, kind: str, bench) -> bool:
        """Inject one fault; True if it stopped the run (the caller resumes)."""
        assert self.run is not None
        roles = self.pids()
        hb = 10.0
        print(f"  [{time.strftime('%H:%M:%S')}] fault {sum(self.injected.values()) + 1}: {kind}", flush=True)
        if kind == "kill9_main":
            os.kill(self.run.pid, signal.SIGKILL)
            self.run.wait(60)
            return True
        if kind == "sigterm_main":
            os.kill(self.run.pid, signal.SIGTERM)
            self.run.wait(120)
            return True
        if kind == "kill9_server":
            for pid in roles["server"][:1]:
                _signal(pid, signal.SIGKILL)
        elif kind in ("sigstop_rag", "sigstop_gen"):
            pool = roles["rag" if kind == "sigstop_rag" else "gen"]
            if pool:
                pid = self.rng.choice(pool)
                _signal(pid, signal.SIGSTOP)
                time.sleep(hb + 5.0)
                _signal(pid, signal.SIGCONT)
        elif kind == "kill9_worker":
            pool = roles["rag"] + roles["gen"]
            if pool:
                _signal(self.rng.choice(pool), signal.SIGKILL)
        elif kind == "http500":
            bench.fault({"status": 500, "for_s": 20}, index=self.rng.randrange(len(bench.urls)))
        elif kind == "all_down":
            bench.fault({"close": True, "for_s": 30})
            stopped = roles["server"][:1]
            for pid in stopped:
                _signal(pid, signal.SIGSTOP)
            time.sleep(30.0)
            for pid in stopped:
                _signal(pid, signal.SIGCONT)
        return self.run.proc.poll() is not None


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=800)
    ap.add_argument("--faults", type=int, default=30)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--min-gap-s", type=float, default=4.0)
    ap.add_argument("--max-gap-s", type=float, default=12.0)
    ap.add_argument("--base-port", type=int, default=31434)
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = int(time.time())
    print(f"chaos: seed {args.seed}, {args.records} records, {args.faults} faults", flush=True)
    store, collection = ensure_store()
    chaos = Chaos(args)
    wd = chaos.workdir
    records = write_records(wd / "records.jsonl", args.records)
    want = [json.loads(ln)["id"] for ln in records.read_text().splitlines()]
    out, ref_out = wd / "out", wd / "ref"
    for d in (out, ref_out):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.monotonic()
    with launch(2, service_ms=100, capacity=4) as bench:
        cfg = _config(wd, bench.urls)
        chaos.run = chaos.start(out, cfg, records, store, collection)
        while True:
            if sum(chaos.injected.values()) < args.faults:
                chaos.wait_working(out)
                time.sleep(chaos.rng.uniform(args.min_gap_s, args.max_gap_s))
                if chaos.run.proc.poll() is None:
                    kind = chaos.rng.choice(FAULTS)
                    stopped = chaos.inject(kind, bench)
                    chaos.injected[kind] += 1
                else:
                    stopped = True
            else:
                chaos.run.wait(3600)
                stopped = True
            if not stopped:
                continue
            code = chaos.run.wait(600)
            chaos.exits.append(code)
            left = _wait_orphans(chaos.marker)
            chaos.orphans_after_stop += len(left)
            if left:
                print(f"  ORPHANS after exit {code}: {[p.pid for p in left]}", flush=True)
                for p in left:
                    p.kill()
            n_rows = len(_read_rows(out))
            print(f"  [{time.strftime('%H:%M:%S')}] invocation {chaos.invocation} exit {code}; {n_rows} rows", flush=True)
            if code == 0 and n_rows >= len(want):
                break
            if code not in (0, -9, 130, 75):
                print(f"  unexpected exit {code}; log tail:\n{chaos.run.log_tail(15)}", flush=True)
            bench.fault({})
            chaos.run = chaos.start(out, cfg, records, store, collection)
        chaos_s = time.monotonic() - t0
        print(f"chaos run complete in {chaos_s:.0f} s; fault-free reference run ...", flush=True)
        ref = chaos.start(ref_out, cfg, records, store, collection)
        ref_code = ref.wait(3600)
    rows, ref_rows = _read_rows(out), _read_rows(ref_out)
    ids = [r["id"] for r in rows]
    lost = sorted(set(want) - set(ids))
    dup = len(ids) - len(set(ids))
    orphans = len(_wait_orphans(chaos.marker)) + chaos.orphans_after_stop

    def failed(r: dict) -> bool:
        return r["rag_status"] == "hard_fail" or r["gen_status"] == "failed"

    def err(r: dict) -> str:
        return f"{r['rag_error'] or ''} {r['gen_error'] or ''}"

    twice = [r for r in rows if failed(r) and "twice" in err(r)]
    trouble = [r for r in rows if failed(r) and r not in twice and any(m in err(r) for m in RETRYABLE_MARKS)]
    status = collections.Counter((r["rag_status"], r["gen_status"]) for r in rows)
    ref_status = collections.Counter((r["rag_status"], r["gen_status"]) for r in ref_rows)
    ref_by_id = {r["id"]: (r["rag_status"], r["gen_status"]) for r in ref_rows}
    differ = [(r["id"], (r["rag_status"], r["gen_status"]), ref_by_id.get(r["id"])) for r in rows
              if ref_by_id.get(r["id"]) != (r["rag_status"], r["gen_status"])]
    print("\n=== chaos report ===")
    print(f"seed                      {args.seed}")
    print(f"faults injected           {sum(chaos.injected.values())}: {dict(sorted(chaos.injected.items()))}")
    print(f"invocations               {chaos.invocation - 1} (exit codes: {chaos.exits}); reference exit {ref_code}")
    print(f"chaos wall time           {chaos_s:.0f} s")
    print(f"rows / input ids          {len(ids)} / {len(want)}")
    print(f"lost ids                  {len(lost)}")
    print(f"duplicated ids            {dup}")
    print(f"orphan processes          {orphans}")
    print(f"failure rows from endpoint trouble or the run's own shutdown  {len(trouble)}")
    for r in trouble[:5]:
        print(f"    {r['id']}: {err(r)[:200]}")
    print(f"failure rows of records whose worker died/hung twice (the rule)  {len(twice)}")
    print(f"final statuses (chaos)    {dict(status)}")
    print(f"final statuses (no fault) {dict(ref_status)}")
    print(f"records whose status differs from the fault-free run  {len(differ)}")
    for d in differ[:10]:
        print(f"    {d}")
    ok = not lost and not dup and not orphans and not trouble and ref_code == 0
    print("RESULT", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
