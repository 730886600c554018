"""What `run --deterministic` costs on the CPU default: records/s with and without it, same records, one run.

Both runs are the plain CPU default (`rag-pipeline run`, one managed llama.cpp server serving SmolLM2-135M-Instruct,
``rag.mode = "retrieve+answer"``: 2 LLM calls per record) on the same M records from the example claims; the only
difference is ``--deterministic`` (the server gets 1 slot instead of ``servers.n_parallel`` = 4, and computes
every prompt whole instead of reusing the cached prefix that a record's RAG answer and generation share).

**What is measured (steady state, not startup).** Loading the embedding model in the RAG worker takes tens of
seconds on 2 cores and is the same in both modes, so "records/s" is the rate at which rows are committed
(``run.part_rows`` = 1: one Parquet part per row, its mtime the commit time) from the first commit to the last
commit before the final ``--tail`` rows (the drain, when fewer requests are in flight). The manifest's
``records_per_s`` (startup included) is printed for reference. The modes alternate (``--rounds`` pairs) so that
load from other programs on the machine hits both alike; the ratio printed is deterministic / default of the
summed rows over the summed seconds.

Usage:
    .venv/bin/python bench/deterministic.py [--records 32] [--max-tokens 32] [--rounds 1] [--store DIR] [--keep]
The example corpus is ingested once into DIR (default: a temp dir, reused by later runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402 - bench helpers next to this file
    DEFAULT_STORE,
    PipelineRun,
    committed_parts,
    ensure_store,
    steady_rate,
    write_config,
    write_records,
)

MODES = ("default", "deterministic")


def one_run(work: Path, mode: str, records: Path, store: Path, collection: str, max_tokens: int, tail: int,
            timeout_s: float) -> tuple[float, float, int, float]:
    """One `rag-pipeline run` in ``mode``; returns (steady records/s, window s, rows in window, manifest
    records/s)."""
    run_dir = work / mode
    run_dir.mkdir()
    cfg = write_config(run_dir / "bench.toml", {
        "retrieval": {"min_score": -1.0},
        "rag": {"mode": "retrieve+answer", "max_tokens": max_tokens},
        "generation": {"max_tokens": max_tokens},
        "run": {"part_rows": 1},
    })
    out = run_dir / "out"
    args = ["--input", str(records), "--output", str(out), "--config", str(cfg), "--store", str(store),
            "--collection", collection, *(["--deterministic"] if mode == "deterministic" else [])]
    run = PipelineRun(run_dir, args, torch_threads=0)
    rc = run.wait(timeout_s)
    if rc != 0:
        raise SystemExit(f"{mode} run exited with {rc}; log tail:\n{run.log_tail()}")
    parts = committed_parts(out)
    total = sum(n for _, n in parts)
    rate = steady_rate(parts, parts[0][0], total, tail)
    if rate is None:
        raise SystemExit(f"{mode}: too few commits for a steady-state window (raise --records)")
    r, t0, t1, n = rate
    manifest = json.loads((out / ".rag-pipeline/manifest.json").read_text())
    return r, t1 - t0, n, manifest["this_invocation"]["records_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens of the RAG answer and the generation")
    ap.add_argument("--rounds", type=int, default=1, help="pairs of runs (default, deterministic), alternating")
    ap.add_argument("--tail", type=int, default=2, help="final rows left out of the steady-state window")
    ap.add_argument("--store", type=Path, default=DEFAULT_STORE)
    ap.add_argument("--run-timeout-s", type=float, default=1200.0)
    ap.add_argument("--keep", action="store_true", help="keep the run directories and print where")
    args = ap.parse_args()

    store, collection = ensure_store(args.store)
    work = Path(tempfile.mkdtemp(prefix="rag-bench-det-"))
    sums = {m: [0.0, 0] for m in MODES}  # seconds, rows
    try:
        records = write_records(work / "records.jsonl", args.records)
        for k in range(args.rounds):
            for mode in MODES:
                rdir = work / f"round{k}"
                rdir.mkdir(exist_ok=True)
                r, secs, n, whole = one_run(rdir, mode, records, store, collection, args.max_tokens, args.tail,
                                            args.run_timeout_s)
                sums[mode][0] += secs
                sums[mode][1] += n
                print(f"round {k} {mode:13s}: {r:6.3f} records/s steady ({n} rows in {secs:.1f} s); "
                      f"{whole:.3f} records/s with startup", flush=True)
    finally:
        if args.keep:
            print(f"run directories kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    rates = {m: sums[m][1] / sums[m][0] for m in MODES}
    print(f"records={args.records} max_tokens={args.max_tokens} rounds={args.rounds}")
    print(f"default       {rates['default']:.3f} records/s")
    print(f"deterministic {rates['deterministic']:.3f} records/s")
    print(f"ratio deterministic / default = {rates['deterministic'] / rates['default']:.2f}")


if __name__ == "__main__":
    main()
