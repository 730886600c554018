"""Saturation benchmark: does `rag-pipeline run` with its defaults keep every endpoint's batch full?

For N = 1, 2, 4, 8 benchmark endpoints (bench/bench_server.py) of capacity C = 64 and 256, the real CLI runs with
only ``--input --output --endpoints URLS --num_processes 16`` (and ``--store/--collection`` to point at the
example corpus, ingested once): the capacities are unknown to the pipeline (the bench server answers neither
SGLang's /get_server_info nor llama.cpp's /props), so it uses its default in-flight total per endpoint. Every
record makes 2 LLM calls (RAG answer, then generation), so

    ideal records/s = N x C / (2 x service_s)

**Service time.** 2 s at least (a 64-token answer on a GPU server); longer where N x C / 4 s would exceed what
2 shared CPU cores can feed (``--target-ideal``, default 20 records/s: the pipeline spends ~15-30 ms of CPU per
record, retrieval included, and the bench servers run on the same cores), i.e. service_s = max(2, N x C /
(2 x target)). Only capacity / service matters for the ideal; a long service time with a large capacity is the
harder case for the pipeline (more requests in flight to keep).

**What is measured (steady state).** The run starts by sending every endpoint its default in-flight total (320)
of RAG answers; a server of capacity C queues what it cannot serve (as SGLang and vLLM do), so the first
generations complete only after that queue drained once, and the RAG/generation mix settles after about two
such cycles (a cycle = (ceil(320 / C) + 1) service times). After every worker logged READY, the bench waits
``--warm-cycles`` (2) cycles, at least 2 service times, then measures a window of ``--window-services`` (4)
service times (at least ``--min-window-s``): records/s = generation requests completed at the servers per
second in the window (one per record), ratio = that / ideal; printed beside it: server utilisation (busy
slot-seconds / (N x C x window)), the work ratio (RAG answers + generations completed in the window / 2, per
second, / ideal) and when the first generation completed (the start-up transient a short run pays). Then the run is
stopped (SIGTERM twice: committed rows are kept), and its committed rows are checked: no failure row. The
input is sized so that it is not exhausted before the window ends (checked: in the window's last quarter RAG
answers still complete at least half as often as generations).
CPU: the pipeline's own processes (main, RAG workers, generation pool) over the window, ms per record, and the
whole machine's busy cores (other programs included: noisy on a shared machine).

**Overload.** One endpoint of capacity 64 that answers 429 above capacity (no Retry-After), and one answering
503 with ``Retry-After: 1``: no failure row, ratio >= 0.80.

Usage:
    .venv/bin/python bench/saturation.py [--sizes 1,2,4,8] [--capacities 64,256] [--target-ideal 20]
        [--no-overload] [--store DIR] [--keep]
Runs ~15-25 minutes on 2 shared cores (RAG workers' startup and long service times dominate).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_server import launch  # noqa: E402
from bench.common import DEFAULT_STORE, PipelineRun, TreeSampler, ensure_store, write_records  # noqa: E402

NUM_PROCESSES = 16
CALLS_PER_RECORD = 2


def _kinds() -> dict[str, str]:
    """Bench-server label (last 40 prompt characters) -> "rag" or "gen"."""
    from pipeline.config import Config
    from pipeline.llm.prompts import load_templates

    t = load_templates(Config())
    return {t["rag"][-40:]: "rag", t["generate"][-40:]: "gen", t["no_context"][-40:]: "gen"}


def _stop(run: PipelineRun) -> int:
    """SIGTERM twice to the run's process group (stop now, committed rows kept); SIGKILL if it hangs."""
    for _ in range(2):
        try:
            os.killpg(run.pid, signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(1.0)
    try:
        return run.wait(60)
    except RuntimeError:
        return -9


def _statuses(out: Path) -> dict[str, int]:
    import pyarrow.parquet as pq

    counts: dict[str, int] = {}
    for part in sorted(out.glob("part-*.parquet")):
        t = pq.read_table(part, columns=["rag_status", "gen_status"]).to_pydict()
        for r, g in zip(t["rag_status"], t["gen_status"], strict=True):
            k = f"{r}/{g}"
            counts[k] = counts.get(k, 0) + 1
    return counts


def measure(n: int, cap: int, service_s: float, args: argparse.Namespace, store: Path, collection: str,
            work: Path, reject_status: int = 0, retry_after_s: float | None = None) -> dict[str, Any]:
    from pipeline.config import LLMConfig
    from pipeline.llm.client import inflight_per_endpoint

    ideal = n * cap / (CALLS_PER_RECORD * service_s)
    window = max(args.min_window_s, args.window_services * service_s)
    per_endpoint = inflight_per_endpoint(LLMConfig(), None)
    # Steady state: the run starts by sending each endpoint its whole in-flight total of RAG answers, which the
    # server works through at cap per service time (queueing the rest, as SGLang/vLLM do); the first generations
    # complete only after that queue drained once, and the RAG/generation mix settles after about two such
    # cycles. Measuring earlier counts the start-up transient (ratios far below or above 1).
    cycle_s = (math.ceil(per_endpoint / cap) + 1) * service_s
    warm = max(2 * service_s, args.warm_cycles * cycle_s) + 2.0
    in_flight = n * per_endpoint
    startup_est = 20 + 10 * n
    m = int(math.ceil(ideal * (startup_est + warm + window + 30) + in_flight + 500))
    tag = f"n{n}-c{cap}" + (f"-r{reject_status}" if reject_status else "")
    d = work / tag
    d.mkdir(parents=True)
    records = write_records(d / "records.jsonl", m)
    with launch(n, service_s * 1000, cap, reject_status=reject_status, retry_after_s=retry_after_s) as servers:
        run = PipelineRun(d, ["--input", str(records), "--output", str(d / "out"), "--endpoints",
                              ",".join(servers.urls), "--num_processes", str(NUM_PROCESSES),
                              "--store", str(store), "--collection", collection], 0)
        sampler = TreeSampler(run.pid, interval_s=1.0, extra={servers.proc.pid: "servers"}).start()
        want = {f"rag-{i}" for i in range(n)} | {f"gen-{i}" for i in range(NUM_PROCESSES)}
        deadline = time.time() + args.startup_timeout_s
        while True:
            ready = run.ready_times()
            if want <= set(ready):
                break
            if run.proc.poll() is not None or time.time() > deadline:
                sampler.stop()
                _stop(run)
                raise RuntimeError(f"{tag}: workers not READY (exit {run.proc.poll()}); log:\n{run.log_tail()}")
            time.sleep(1.0)
        t_ready = max(ready[w] for w in want)
        t0 = t_ready + warm
        t1 = t0 + window
        time.sleep(max(0.0, t1 + 1.0 - time.time()))
        exhausted_early = run.proc.poll() is not None
        sampler.stop()
        rc = _stop(run)
        stats = servers.stats(services=True)
    kinds = _kinds()
    gen_done = rag_done = busy = 0.0
    first_gen = math.inf
    tail = {"rag": 0, "gen": 0}  # completions in the last quarter of the window
    t_tail = t1 - window / 4
    rejected = sum(st["rejected"] for st in stats)
    for st in stats:
        for _arrive, s0, s1, label in st["services"]:
            busy += max(0.0, min(s1, t1) - max(s0, t0))
            kind = kinds.get(label, "other")
            if kind == "gen" and t0 < s1 <= t1:
                gen_done += 1
            if kind == "rag" and t0 < s1 <= t1:
                rag_done += 1
            if kind == "gen":
                first_gen = min(first_gen, s1)
            if kind in tail and t_tail < s1 <= t1:
                tail[kind] += 1
    rate = gen_done / window
    cpu = sampler.cpu_cores(t0, t1)
    own = sum(v for k, v in cpu.items() if k in ("main", "rag", "gen"))
    statuses = _statuses(d / "out")
    failures = sum(v for k, v in statuses.items() if k != "ok/ok")
    return {
        "tag": tag, "n": n, "cap": cap, "service_s": service_s, "ideal": ideal, "rate": rate, "ratio": rate / ideal,
        # both stages' completions in the window, in records (2 calls each): the servers' useful work
        "work_ratio": (rag_done + gen_done) / CALLS_PER_RECORD / window / ideal,
        "first_gen_s": first_gen - t_ready, "warm_s": warm,
        "util": busy / (n * cap * window), "window_s": window, "startup_s": t_ready - run.t_launch,
        "cpu_ms_per_record": own / rate * 1000 if rate else float("nan"), "cpu": cpu,
        "rows": sum(statuses.values()), "failures": failures, "statuses": statuses, "rejected": rejected,
        # the input still fed RAG answers at the window's end (not drained): RAG completions kept up with generations
        "input_ok": tail["rag"] >= 0.5 * tail["gen"] and not exhausted_early, "rc": rc, "reject": reject_status,
    }


def _row(r: dict[str, Any]) -> str:
    machine = r["cpu"].get("machine", float("nan"))
    return (f"{r['n']:>3} {r['cap']:>5} {r['service_s']:>8.1f} {r['ideal']:>7.2f} {r['rate']:>7.2f} {r['ratio']:>6.3f} "
            f"{r['util']:>6.3f} {r['cpu_ms_per_record']:>9.1f} {machine:>8.2f} {r['rows']:>6} {r['failures']:>5} "
            f"{r['rejected']:>8} {'yes' if r['input_ok'] else 'NO':>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2,4,8", help="numbers of benchmark endpoints")
    ap.add_argument("--capacities", default="64,256", help="capacity of each endpoint (requests in service)")
    ap.add_argument("--target-ideal", type=float, default=20.0, help="records/s the service time is sized for")
    ap.add_argument("--min-service-s", type=float, default=2.0)
    ap.add_argument("--window-services", type=float, default=4.0, help="measured window, in service times")
    ap.add_argument("--warm-cycles", type=float, default=2.0,
                    help="wait before the window, in queue cycles ((in flight per endpoint / capacity + 1) x service)")
    ap.add_argument("--min-window-s", type=float, default=30.0)
    ap.add_argument("--startup-timeout-s", type=float, default=600.0)
    ap.add_argument("--no-overload", action="store_true", help="skip the 429/503 runs")
    ap.add_argument("--only-overload", action="store_true", help="only the 429/503 runs")
    ap.add_argument("--store", type=Path, default=DEFAULT_STORE)
    ap.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    caps = [int(x) for x in args.capacities.split(",") if x.strip()]
    store, collection = ensure_store(args.store)
    work = Path(tempfile.mkdtemp(prefix="rag-bench-sat-"))
    results: list[dict[str, Any]] = []
    overload: list[dict[str, Any]] = []
    print(f"rag-pipeline run --endpoints ... --num_processes {NUM_PROCESSES} (defaults otherwise); "
          f"work dir {work}", flush=True)
    try:
        if not args.only_overload:
            for cap in caps:
                for n in sizes:
                    s = max(args.min_service_s, n * cap / (CALLS_PER_RECORD * args.target_ideal))
                    r = measure(n, cap, s, args, store, collection, work)
                    results.append(r)
                    print(f"{r['tag']}: {r['rate']:.2f} rec/s of {r['ideal']:.2f} (ratio {r['ratio']:.3f}, util "
                          f"{r['util']:.3f}, work {r['work_ratio']:.3f}); first generation {r['first_gen_s']:.0f} s "
                          f"after READY, window from {r['warm_s']:.0f} s for {r['window_s']:.0f} s; "
                          f"CPU {r['cpu_ms_per_record']:.1f} ms/record; cores {_fmt(r['cpu'])}; "
                          f"startup {r['startup_s']:.0f} s; rows {r['statuses']}", flush=True)
        if not args.no_overload:
            for status, retry_after in ((429, None), (503, 1.0)):
                r = measure(1, 64, args.min_service_s, args, store, collection, work, status, retry_after)
                overload.append(r)
                print(f"{r['tag']} (Retry-After {retry_after}): {r['rate']:.2f} rec/s of {r['ideal']:.2f} "
                      f"(ratio {r['ratio']:.3f}); rejected {r['rejected']}; rows {r['statuses']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    head = (f"{'N':>3} {'cap':>5} {'service':>8} {'ideal':>7} {'rec/s':>7} {'ratio':>6} {'util':>6} "
            f"{'CPU ms/rec':>9} {'machine':>8} {'rows':>6} {'fail':>5} {'rejected':>8} {'input':>6}")
    print()
    print("Saturation, defaults (ratio = records/s in the steady window / ideal; CPU = the pipeline's own processes; "
          "machine = busy cores of the whole machine)")
    print(head)
    for r in results:
        print(_row(r))
    if results:
        ok = all(r["ratio"] >= 0.90 and r["failures"] == 0 and r["input_ok"] for r in results)
        print(f"ratio >= 0.90 at every size and capacity, no failure row: {'yes' if ok else 'NO'} "
              f"(min {min(r['ratio'] for r in results):.3f})")
    if overload:
        print("\nOverload: 1 endpoint, capacity 64, answering 429 (no Retry-After) / 503 (Retry-After 1 s) above it")
        print(head)
        for r in overload:
            print(_row(r))
        ok = all(r["ratio"] >= 0.80 and r["failures"] == 0 for r in overload)
        print(f"ratio >= 0.80, no failure row: {'yes' if ok else 'NO'} (min {min(r['ratio'] for r in overload):.3f})")
    if args.keep:
        print(f"run directories kept in {work}")


def _fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(d.items())) or "-"


if __name__ == "__main__":
    main()
