"""Memory benchmark: `rag-pipeline run --num_processes 16` against bench LLM servers; peak RSS per process.

Runs the pipeline in attach mode (``--endpoints``: N bench servers from bench/bench_server.py, one RAG worker
each) with 16 generation processes, and samples the run's process tree with psutil every ``--interval-s``:

- per generation process: peak RSS (the largest sample) and the kernel's VmHWM (its true peak RSS, read from
  /proc while it lives); goal < 100 MB each;
- per RAG worker and for the main process, the same;
- the whole run: the peak over time of the sum of the RSS of every process of the tree (main + RAG workers +
  generation processes + multiprocessing's resource tracker), sampled at the same instant. RSS counts shared
  pages (libraries, torch) once per process, so this sum is an upper bound of the physical memory used.
The bench servers are not part of the run (they stand in for GPU servers); their RSS is printed apart.

Process roles come from main's "started rag-i / gen-i (pid N)" log lines (-v); the "torch loaded" column
checks the design rule that generation processes never import torch (libtorch in /proc/PID/maps).

Usage:
    .venv/bin/python bench/memory.py [--num_processes 16] [--servers 2] [--records 400] [--service-ms 500]
        [--capacity 8] [--torch-threads 0] [--store DIR]
About 1-2 minutes on 2 cores (most of it the RAG workers' startup).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_server import launch  # noqa: E402
from bench.common import (  # noqa: E402
    DEFAULT_STORE,
    PipelineRun,
    TreeSampler,
    ensure_store,
    write_config,
    write_records,
)

MB = 1024 * 1024
GOAL_GEN_MB = 100.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_processes", "--num-processes", dest="num_processes", type=int, default=16)
    ap.add_argument("--servers", type=int, default=2, help="bench servers (= RAG workers)")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--service-ms", type=float, default=500.0)
    ap.add_argument("--capacity", type=int, default=8)
    ap.add_argument("--interval-s", type=float, default=0.2, help="psutil sampling interval")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="OMP_NUM_THREADS of the run (0 = unset: the pipeline sizes torch threads itself)")
    ap.add_argument("--store", type=Path, default=DEFAULT_STORE)
    ap.add_argument("--run-timeout-s", type=float, default=600.0)
    ap.add_argument("--gpus", type=int, default=None,
                    help="pass --gpus N to the run (0: main does not import torch to count GPUs)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory (log, Parquet) and print it")
    args = ap.parse_args()

    store, collection = ensure_store(args.store)
    work = Path(tempfile.mkdtemp(prefix="rag-bench-mem-"))
    try:
        records = write_records(work / "records.jsonl", args.records)
        cfg = write_config(work / "bench.toml", {
            "retrieval": {"min_score": -1.0},
            "rag": {"mode": "retrieve+answer", "max_tokens": 64},
            "llm": {"max_concurrency": args.capacity},
            "generation": {"max_tokens": 64},
            "run": {"part_rows": 50},
        })
        with launch(args.servers, args.service_ms, args.capacity) as servers:
            run = PipelineRun(work, ["--input", str(records), "--output", str(work / "out"), "--config", str(cfg),
                                     "--endpoints", ",".join(servers.urls), "--store", str(store),
                                     "--collection", collection, "--num_processes", str(args.num_processes),
                                     *(["--gpus", str(args.gpus)] if args.gpus is not None else [])],
                              args.torch_threads)
            sampler = TreeSampler(run.pid, interval_s=args.interval_s, extra={servers.proc.pid: "servers"}).start()
            try:
                rc = run.wait(args.run_timeout_s)
            finally:
                sampler.stop()
        if rc != 0:
            raise SystemExit(f"rag-pipeline run exited with {rc}; log tail:\n{run.log_tail()}")
        manifest = json.loads((work / "out" / ".rag-pipeline/manifest.json").read_text())
        names = run.started_pids()
    finally:
        if args.keep:
            print(f"run directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    # roles from main's "started rag-i / gen-i (pid N)" log lines; the sampler's guess for the others
    for pid, name in names.items():
        sampler.roles[pid] = name.split("-")[0]

    peak_rss: dict[int, int] = {}
    peak_total = 0
    peak_total_at = 0.0
    peak_by_role_at_total: dict[str, int] = {}
    for t, snap, _ in sampler.samples:
        total = 0
        by_role: dict[str, int] = {}
        for pid, (rss, _cpu) in snap.items():
            peak_rss[pid] = max(peak_rss.get(pid, 0), rss)
            role = sampler.roles.get(pid, "gen")
            if role == "servers":
                continue
            total += rss
            by_role[role] = by_role.get(role, 0) + rss
        if total > peak_total:
            peak_total, peak_total_at, peak_by_role_at_total = total, t, by_role
    roles: dict[str, list[int]] = {}
    for pid in peak_rss:
        roles.setdefault(sampler.roles.get(pid, "gen"), []).append(pid)

    def hwm(pid: int) -> float:
        return sampler.hwm_kb.get(pid, 0) / 1024

    print(f"rag-pipeline run --num_processes {args.num_processes}: {manifest['rows']} records, "
          f"{args.servers} bench servers ({args.service_ms:.0f} ms, capacity {args.capacity}) = {args.servers} RAG "
          f"workers; statuses {manifest['counts']}; {len(sampler.samples)} samples every {args.interval_s} s")
    print(f"{'process':<10} {'pid':>8} {'peak RSS MB':>12} {'VmHWM MB':>10} {'torch loaded':>13}")
    order = ["main", "rag", "gen", "tracker", "servers"]
    for role in order + sorted(set(roles) - set(order)):
        for pid in sorted(roles.get(role, [])):
            print(f"{names.get(pid, role):<10} {pid:>8} {peak_rss[pid] / MB:>12.1f} {hwm(pid):>10.1f} "
                  f"{'yes' if pid in sampler.torch else 'no':>13}")
    torch_gen = [p for p in roles.get("gen", []) if p in sampler.torch]
    if torch_gen:
        print(f"WARNING: {len(torch_gen)} generation process(es) loaded torch: {torch_gen}")
    gen = roles.get("gen", [])
    if len(gen) != args.num_processes:
        print(f"WARNING: {len(gen)} generation processes seen, expected {args.num_processes}")
    if gen:
        worst = max(max(peak_rss[p] / MB, hwm(p)) for p in gen)
        med = statistics.median(hwm(p) or peak_rss[p] / MB for p in gen)
        print(f"generation processes: {len(gen)}; peak RSS median {med:.1f} MB, max {worst:.1f} MB "
              f"(goal < {GOAL_GEN_MB:.0f} MB each): {'yes' if worst < GOAL_GEN_MB else 'NO'}")
    split = ", ".join(f"{k} {v / MB:.0f} MB" for k, v in sorted(peak_by_role_at_total.items()))
    print(f"whole run (main + RAG workers + generation + tracker): peak of the summed RSS {peak_total / MB:.0f} MB "
          f"at t+{peak_total_at - sampler.samples[0][0]:.1f} s ({split})")
    if "servers" in roles:
        print(f"bench servers (not part of the run): peak RSS {max(peak_rss[p] for p in roles['servers']) / MB:.0f} MB")


if __name__ == "__main__":
    main()
