"""Stand-in for `rag-pipeline run --shard I/N` in the Slurm tests (no retrieval, no LLM).

It exercises what Slurm interacts with, using the real pieces of the run: the input validation and the
record partition (pipeline.dataset.records, pipeline.output.in_shard), the output directory and its commit protocol
(pipeline.output.OutputDir), resuming from committed rows, and the run's signal contract: SIGTERM, SIGINT
or SIGUSR1 stop after the current record, commit, write the manifest and exit 130 (Interrupted).
Each record takes ``--delay-s`` seconds, so that a test can requeue or signal a task while it runs.

    python tests/slurm_standin_run.py --input IN --output OUT --shard I/N [--limit K] [--delay-s S]
        [--outage-after R]

``--fail-shard I``: task I stops at once with exit 4 (as `run` does when its collection is gone), writing nothing.

``--outage-after R``: on its first start (SLURM_RESTART_COUNT 0) the task stops after committing R rows with the
exit status of an endpoint outage (75, pipeline.errors.OutageError), as `run` does after ``run.max_outage_s``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import pyarrow as pa

from pipeline.config import Config
from pipeline.dataset.records import iter_records, scan_input
from pipeline.errors import OutageError
from pipeline.output import OutputDir, in_shard, input_fingerprint, parse_shard, shard_dir


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--shard", required=True)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--delay-s", type=float, default=0.5)
    ap.add_argument("--outage-after", type=int, default=0)
    ap.add_argument("--fail-shard", type=int, default=-1)
    args = ap.parse_args()

    stop: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signal.Signals(signum).name)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, on_signal)

    i, n = parse_shard(args.shard)
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    print(f"standin start shard={i}/{n} restart={restart} pid={os.getpid()} t={time.time():.3f}", flush=True)
    if i == args.fail_shard:  # as `run` does when its store is gone: one line, exit 4, nothing written
        print("Error: collection 'docs' not found", file=sys.stderr, flush=True)
        return 4
    scan = scan_input(args.input, on_bad_record="skip")
    recs = [r for r in iter_records(scan) if (not args.limit or r.index < args.limit) and in_shard(r.index, i, n)]
    cfg = Config().to_dict()
    cfg["run"]["limit"] = args.limit
    od = OutputDir(shard_dir(args.output, i, n))
    od.prepare(
        input_path=args.input,
        fingerprint=input_fingerprint(args.input),
        shard=args.shard,
        total_records=len(recs),
        config=cfg,
        overwrite=False,
    )
    done = od.committed_ids()
    print(f"standin resume committed={len(done)} of {len(recs)}", flush=True)
    committed_now = 0
    for rec in recs:
        if rec.id in done:
            continue
        if stop:
            break
        if args.outage_after and restart == "0" and committed_now >= args.outage_after:
            od.write_manifest({"complete": False, "rows": len(done), "total_records": len(recs)})
            print(f"standin exit outage rows={len(done)} t={time.time():.3f}", flush=True)
            return OutageError.exit_code
        time.sleep(args.delay_s)
        od.commit_part(
            pa.table(
                {
                    "id": [rec.id],
                    "query": [rec.query],
                    "rag_status": ["ok"],
                    "gen_status": ["ok"],
                    "attempt_restart": pa.array([int(restart)], pa.int32()),
                    "input_index": pa.array([rec.index], pa.int64()),
                }
            )
        )
        done.add(rec.id)
        committed_now += 1
    complete = len(done) == len(recs)
    od.write_manifest({"complete": complete, "rows": len(done), "total_records": len(recs)})
    print(f"standin exit signal={','.join(stop) or '-'} rows={len(done)} complete={complete} t={time.time():.3f}",
          flush=True)
    return 0 if complete else 130


if __name__ == "__main__":
    sys.exit(main())
