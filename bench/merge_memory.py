"""`rag-pipeline merge --ordered` in bounded memory: peak RSS and wall time of the input-order merge.

Builds a sharded output of ``--parts`` shards x ``--rows`` rows (default 100 x 1,000, with 3 contexts of 500
characters a row: about 0.3 GB of poorly compressible Parquet) through the run's own commit path (bench/scale.py
``synthetic_run``, then ``to_shards``: shard k holds the records with ``index % parts == k``, so the shard order is
far from the input order). Then, each in a fresh process (bench/scale.py ``in_child``: the child's ``VmHWM``):

* ``merge ROOT`` (shard order, part by part: the baseline of the same command), and
* ``merge ROOT --ordered --memory-limit-mb M`` (DuckDB's out-of-core sort under ``memory_limit``),

over the first tenth of the shards and over all of them, and prints each one's peak RSS and wall time, the
ratio full / tenth of the ordered merge's peak (bounded memory = about 1, while the rows grow 10x), the Parquet
size for scale, and checks that the ordered output is in input order (``input_index`` 0, 1, 2, ... streamed).

Usage:
    .venv/bin/python bench/merge_memory.py [--parts 100] [--rows 1000] [--memory-limit-mb 256] [--workdir DIR]
        [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.scale import in_child, synthetic_run, to_shards, write_input  # noqa: E402


def in_input_order(merged: Path) -> bool:
    """True if the merged parts, read in part order one batch at a time, hold input_index 0, 1, 2, ..."""
    import numpy as np

    from pipeline.output import part_paths, scan_batches

    expected = 0
    for batch in scan_batches(part_paths(merged), ["input_index"]):
        col = batch.column(0).to_numpy()
        if not np.array_equal(col, np.arange(expected, expected + len(col))):
            return False
        expected += len(col)
    return True


def build(work: Path, parts: int, rows: int) -> tuple[Path, float, float]:
    """A sharded root of ``parts`` shards x ``rows`` rows; returns (root, build seconds, Parquet MB)."""
    work.mkdir(parents=True, exist_ok=True)
    inp = write_input(work / "input.jsonl", parts * rows)
    out = work / "run"
    t0 = time.perf_counter()
    synthetic_run(inp, out, parts, rows, contexts=3, context_chars=500)
    root = work / "root"
    to_shards(inp, out, root, parts, rows)
    build_s = time.perf_counter() - t0
    mb = sum(p.stat().st_size for p in root.rglob("part-*.parquet")) / 2**20
    return root, build_s, mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=100, help="shards")
    ap.add_argument("--rows", type=int, default=1000, help="rows per shard")
    ap.add_argument("--memory-limit-mb", type=int, default=256, help="merge --ordered --memory-limit-mb")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the outputs under --workdir")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    res: dict[str, Any] = {"memory_limit_mb": args.memory_limit_mb}
    try:
        for name, parts in (("tenth", max(1, args.parts // 10)), ("full", args.parts)):
            root, build_s, mb = build(work / name, parts, args.rows)
            r: dict[str, Any] = {"rows": parts * args.rows, "parquet_mb": round(mb, 1), "build_s": round(build_s, 1)}
            merged = work / name / "root.merged"
            plain = in_child("cli", "merge", str(root))
            r["merge"] = {"wall_s": plain["wall_s"], "peak_rss_mb": plain["maxrss_mb"]}
            ordered = in_child("cli", "merge", str(root), "--ordered", "--memory-limit-mb", str(args.memory_limit_mb))
            r["merge_ordered"] = {"wall_s": ordered["wall_s"], "peak_rss_mb": ordered["maxrss_mb"],
                                  "in_input_order": in_input_order(merged)}
            res[name] = r
            print(f"{name}: {json.dumps(r)}", file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(work / name)
        t, f = res["tenth"]["merge_ordered"], res["full"]["merge_ordered"]
        res["ordered_rss_ratio_full_over_tenth"] = round(f["peak_rss_mb"] / t["peak_rss_mb"], 3)
        res["ordered_over_plain_wall"] = round(f["wall_s"] / res["full"]["merge"]["wall_s"], 2)
        print(json.dumps(res, indent=2))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
