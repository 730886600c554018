"""Scale benchmark: constant cost per record and bounded memory.

**(a) The output layer at 1,000,000 rows** (``--parts 1000 --rows 1000``; 5 contexts of 1,000 characters per
row, ~5 GB of Parquet), through the code paths a run uses: every row goes through the scheduler's
``RowWriter.finish`` and every part through ``RowWriter.commit`` (``pa.Table.from_pylist`` with the row schema, then
``OutputDir.commit_part``: tmp + fsync + rename + ledger update). Part ``k`` holds the records with
``index % parts == k``, so the same files are afterwards moved (renamed, not copied) into ``shard-k-of-P/``
directories: a sharded output of P shards. Measured:

* commit time of the last 10 % of parts / the first 10 % (target <= 1.5);
* ledger load for a resume (``OutputDir(out).ledger``: one streamed scan of the ``id`` column), time and RSS;
* peak RSS (``VmHWM``) of the run's manifest (``pipeline.run.manifest.build_manifest``), of ``rag-pipeline status`` on the run
  directory and on the sharded root, and of ``rag-pipeline merge`` of the P shards (target <= 1 GB each), each in
  a fresh process (``ru_maxrss``), with its wall time.

**(b) A real run of >= 100,000 records** (``--run-records``) against fast benchmark endpoints
(bench/bench_server.py): ``rag-pipeline run --input --output --endpoints <2 bench servers> --store ...
--collection bench`` with the defaults otherwise (``rag.mode`` retrieve+answer, ``run.part_rows`` 1000, the
default ``generation.num_processes``). The retrieval is real (the packaged embedding model on CPU, Chroma with
the example corpus) and is what limits the rate on 2 cores. Measured from the committed parts' mtimes:
committed rows/s in the last tenth / the first tenth (target >= 0.90); the main process's RSS at 10 % and at
100 % of the records (target growth <= 100 MB) and its CPU ms per record (psutil, sampled every 0.5 s).

Usage:
    .venv/bin/python bench/scale.py [--parts 1000] [--rows 1000] [--run-records 100000] [--skip-a] [--skip-b]
        [--workdir DIR] [--keep]
(a) needs ~11 GB of free disk in --workdir (the parts and the merged copy) and ~10 minutes (measured 9-10 min at
load average 10-25 on 2 cores); (b) is bound by the CPU embedding of the queries in the RAG workers: 100,000
records took 18 minutes at load average 2-5 on 2 cores (~93 rows/s; 20,000 took 23 minutes at load 18-28).
The "first tenth" is timed from the first commit (worker startup excluded); parts can be smaller than
run.part_rows (a commit every 30 s), so tenths are found by committed rows. Everything written under --workdir
is removed at the end unless --keep (so do not redirect the output into it).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# (a) synthetic run through the run's own commit path


def write_input(path: Path, n: int) -> Path:
    """n JSONL records ``{"id": "r0000000", "query": "question i", "topic": i % 7}``."""
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"r{i:07d}", "query": f"question {i}", "topic": i % 7}) + "\n")
    return path


class _Text:
    """Synthetic, poorly compressible text: slices of one random base64 pool at random offsets."""

    def __init__(self, seed: int = 0, pool_mb: int = 8) -> None:
        rng = random.Random(seed)
        self.pool = base64.b64encode(rng.randbytes(pool_mb * 3 // 4 * MB)).decode()
        self.rng = rng

    def __call__(self, n: int) -> str:
        off = self.rng.randrange(0, len(self.pool) - n)
        return self.pool[off:off + n]


def synthetic_run(
    input_path: Path, out: Path, parts: int, rows: int, *, contexts: int = 5, context_chars: int = 1000,
    on_commit: Any = None, vary: Any = None,
) -> list[float]:
    """Commit ``parts`` parts of ``rows`` rows through ``RowWriter.finish`` / ``RowWriter.commit`` (the run's path).

    Part k holds the records with ``index % parts == k``. ``vary(idx, rag, gen)``, if given, may change the
    record's :class:`~pipeline.messages.RagResult` and :class:`~pipeline.messages.GenResult` in place or return
    ``(rag, gen)`` to replace them (``gen`` None: generation skipped after a RAG hard failure). Returns the wall
    time of each commit (seconds).
    """
    from pipeline.config import Config
    from pipeline.messages import GenResult, RagResult, WorkItem
    from pipeline.output import OutputDir, input_fingerprint
    from pipeline.run.rows import RowWriter

    cfg = _with_part_rows(Config(), rows)
    n = parts * rows
    od = OutputDir(out)
    od.prepare(input_path=input_path, fingerprint=input_fingerprint(input_path), shard=None, total_records=n,
               config=cfg.to_dict(), overwrite=True)
    run = RowWriter(od, {"topic": "int64"}, part_rows=cfg.run.part_rows)
    commit_s: list[float] = []
    real_commit = run.commit

    def timed_commit() -> None:
        t0 = time.perf_counter()
        real_commit()
        commit_s.append(time.perf_counter() - t0)
        if on_commit is not None:
            on_commit(len(commit_s))

    run.commit = timed_commit  # type: ignore[method-assign]
    text = _Text()
    for k in range(parts):
        for j in range(rows):
            idx = k + parts * j
            rid = f"r{idx:07d}"
            ctx = [{"doc_id": f"d{idx % 5183}", "chunk_id": f"d{idx % 5183}#{c}", "text": text(context_chars),
                    "score": 0.9 - 0.1 * c} for c in range(contexts)]
            rag = RagResult(rid, contexts=ctx, rag_answer=text(200), rag_status="ok" if idx % 10 else "soft_fail",
                            rag_error=None if idx % 10 else "no passage above retrieval.min_score",
                            retrieve_ms=10.0 + idx % 7, rag_llm_ms=900.0 + idx % 101, attempts=1,
                            endpoint="http://127.0.0.1:1", model="bench-model")
            gen: GenResult | None = GenResult(
                rid, generation=text(300), generate_ms=950.0 + idx % 97, attempts=1,
                endpoint="http://127.0.0.1:1", model="bench-model")
            if vary is not None and (changed := vary(idx, rag, gen)) is not None:
                rag, gen = changed
            run.finish(WorkItem(rid, f"question {idx}", {"topic": idx % 7}, index=idx), rag, gen)
    run.commit()
    return commit_s[: parts]


def _with_part_rows(cfg: Any, rows: int) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, part_rows=rows))


def to_shards(input_path: Path, out: Path, root: Path, parts: int, rows: int) -> None:
    """Move part k of ``out`` to ``root/shard-k-of-parts/part-00000.parquet`` with its ``run.json`` and a
    complete manifest: the layout P array tasks of ``run --shard k/P`` leave."""
    from pipeline.config import Config
    from pipeline.output import OutputDir, input_fingerprint, shard_dir

    cfg = _with_part_rows(Config(), rows).to_dict()  # as the run recorded it: merge re-chunks to part_rows
    fp = input_fingerprint(input_path)
    for k in range(parts):
        od = OutputDir(shard_dir(root, k, parts))
        od.prepare(input_path=input_path, fingerprint=fp, shard=f"{k}/{parts}", total_records=rows, config=cfg,
                   overwrite=False)
        os.replace(out / f"part-{k:05d}.parquet", od.path / "part-00000.parquet")
        od.write_manifest({"complete": True, "rows": rows})


_CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r})


def hwm_kb():
    # peak RSS of this process image: VmHWM (ru_maxrss would include the forking parent's peak: Linux keeps
    # it across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


t0 = time.perf_counter()
what = sys.argv[1]
result = None
if what == "cli":
    from pipeline.cli import main
    try:
        main(sys.argv[2:], standalone_mode=False)
    except SystemExit:
        pass
elif what == "manifest":
    from pathlib import Path
    from pipeline.config import Config
    from pipeline.run.manifest import build_manifest
    m = build_manifest(Config(), Path(sys.argv[2]), int(sys.argv[3]), endpoints=[], wall_s=1.0, processed=0,
                       interrupted=None, backend="none")
    result = {{"rows": m["rows"], "complete": m["complete"], "counts": m["counts"], "p50_generate":
              m["latency_ms"]["generate"]["p50"], "errors": len(m["errors"])}}
elif what == "ledger":
    from pipeline.output import OutputDir
    led = OutputDir(sys.argv[2]).ledger
    result = {{"ids": len(led), "load_s": round(led.load_s, 3)}}
import pyarrow as pa
sys.stderr.write("\nSCALE_CHILD " + json.dumps({{"wall_s": round(time.perf_counter() - t0, 3),
    "arrow_peak_mb": round(pa.default_memory_pool().max_memory() / 2**20, 2),
    "maxrss_mb": round(hwm_kb() / 1024, 1), "result": result}}) + "\n")
"""


def in_child(*args: str) -> dict[str, Any]:
    """Run one measured step in a fresh Python process; returns ``{"wall_s", "maxrss_mb", "result", "stdout"}``.

    Raises:
        RuntimeError: the child failed.
    """
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(repo=str(REPO)), *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = [x for x in proc.stderr.splitlines() if x.startswith("SCALE_CHILD ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{args} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(line[-1][len("SCALE_CHILD "):])
    out["stdout"] = proc.stdout
    return out


def part_a(work: Path, parts: int, rows: int, contexts: int, context_chars: int) -> dict[str, Any]:
    n = parts * rows
    work.mkdir(parents=True, exist_ok=True)
    inp = write_input(work / "input.jsonl", n)
    out = work / "run"
    t0 = time.perf_counter()

    def progress(k: int) -> None:
        if k % max(1, parts // 10) == 0:
            print(f"  committed {k}/{parts} parts ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    commit_s = synthetic_run(inp, out, parts, rows, contexts=contexts, context_chars=context_chars,
                             on_commit=progress)
    tenth = max(1, parts // 10)
    first, last = sum(commit_s[:tenth]) / tenth, sum(commit_s[-tenth:]) / tenth
    size_gb = sum(p.stat().st_size for p in out.glob("part-*.parquet")) / 1e9
    res: dict[str, Any] = {
        "rows": n, "parts": parts, "parquet_gb": round(size_gb, 2), "synthesis_and_commit_s": round(time.perf_counter() - t0, 1),
        "commit_ms_first_tenth": round(1000 * first, 2), "commit_ms_last_tenth": round(1000 * last, 2),
        "commit_ratio_last_over_first": round(last / first, 3),
    }
    res["ledger"] = in_child("ledger", str(out))
    res["manifest"] = in_child("manifest", str(out), str(n))
    res["status_run_dir"] = in_child("cli", "status", str(out), "--json")
    root = work / "sharded"
    to_shards(inp, out, root, parts, rows)
    res["status_sharded_root"] = in_child("cli", "status", str(root))
    res["merge"] = in_child("cli", "merge", str(root))
    from pipeline.output import default_merge_dir

    merged = json.loads((default_merge_dir(root) / ".rag-pipeline/manifest.json").read_text())
    res["merged_ok"] = bool(merged["complete"] and merged["rows"] == n and merged["n_shards"] == parts)
    for k in ("ledger", "manifest", "status_run_dir", "status_sharded_root", "merge"):
        res[k].pop("stdout", None)
    return res


# ---------------------------------------------------------------------------------------------
# (b) a real run against fast benchmark endpoints


def part_b(work: Path, n_records: int, n_servers: int, service_ms: float, capacity: int) -> dict[str, Any]:
    import psutil

    from bench.bench_server import launch
    from bench.common import ensure_store

    store, collection = ensure_store()
    inp = work / "records.jsonl"
    base = [json.loads(x) for x in (REPO / "data" / "example" / "records.jsonl").read_text().splitlines()]
    with inp.open("w") as fh:
        for i in range(n_records):
            rec = dict(base[i % len(base)])
            rec["id"] = f"{rec['id']}-{i}"
            fh.write(json.dumps(rec) + "\n")
    out = work / "out"
    samples: list[tuple[float, float, float, int]] = []  # (time, rss MB, cpu s, committed rows)
    with launch(n_servers, service_ms, capacity) as servers:
        cmd = [str(Path(sys.executable).with_name("rag-pipeline")), "run", "--input", str(inp), "--output", str(out),
               "--endpoints", ",".join(servers.urls), "--store", str(store), "--collection", collection,
               "--no-progress"]
        log = (work / "run.log").open("w")
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        main = psutil.Process(proc.pid)
        try:
            while proc.poll() is None:
                try:
                    cpu = main.cpu_times()
                    rows = len(list(out.glob("part-*.parquet")))  # parts so far (rows: see below)
                    samples.append((time.time(), main.memory_info().rss / MB, cpu.user + cpu.system, rows))
                    with (work / "samples.jsonl").open("a") as fh:  # for a look at a run in progress
                        fh.write(json.dumps(samples[-1]) + "\n")
                except psutil.Error:
                    pass
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                proc.wait(60)
        log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}): {(work / 'run.log').read_text()[-3000:]}")
    import pyarrow.parquet as pq

    parts = sorted((p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows) for p in out.glob("part-*.parquet"))
    total = sum(r for _, r in parts)
    cum = [0]
    for _, r in parts:
        cum.append(cum[-1] + r)  # cum[i + 1] = rows committed by part i

    def rate(lo: int, hi: int) -> float:
        """Rows/s of parts lo+1..hi, timed from part lo's commit to part hi's (so startup is excluded)."""
        return (cum[hi + 1] - cum[lo + 1]) / max(1e-9, parts[hi][0] - parts[lo][0])

    def part_at(rows: float) -> int:
        return next(i for i in range(len(parts)) if cum[i + 1] >= rows)

    # first tenth: from the first commit to the part that reaches 10 % of the rows (more if that is the first part);
    # last tenth: from the part that reaches 90 % to the last part
    first = rate(0, max(1, part_at(total / 10)))
    last = rate(min(part_at(0.9 * total), len(parts) - 2), len(parts) - 1)
    tenth = total // 10

    cum, t_tenth = 0, parts[-1][0]
    for mtime, r in parts:  # when 10 % of the rows were committed
        cum += r
        if cum >= tenth:
            t_tenth = mtime
            break
    s10 = next((x for x in samples if x[0] >= t_tenth), samples[-1])
    s100 = samples[-1]
    manifest = json.loads((out / ".rag-pipeline/manifest.json").read_text())
    return {
        "records": n_records, "rows": total, "servers": n_servers, "service_ms": service_ms, "capacity": capacity,
        "wall_s": round(s100[0] - t0, 1), "complete": manifest["complete"],
        "rows_per_s_first_tenth": round(first, 2), "rows_per_s_last_tenth": round(last, 2),
        "rate_ratio_last_over_first": round(last / first, 3),
        "main_rss_mb_at_10pct": round(s10[1], 1), "main_rss_mb_at_100pct": round(s100[1], 1),
        "main_rss_growth_mb": round(s100[1] - s10[1], 1),
        "main_cpu_ms_per_record": round(1000 * s100[2] / max(1, total), 3),
        "counts": manifest["counts"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--contexts", type=int, default=5)
    ap.add_argument("--context-chars", type=int, default=1000)
    ap.add_argument("--run-records", type=int, default=100_000)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--service-ms", type=float, default=20.0)
    ap.add_argument("--capacity", type=int, default=64)
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rag-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"load_avg_at_start": os.getloadavg()}
    try:
        if not args.skip_a:
            a = part_a(work / "a", args.parts, args.rows, args.contexts, args.context_chars)
            report["a"] = a
            print(json.dumps({"a": a}, indent=2), flush=True)
            if not args.keep:
                shutil.rmtree(work / "a", ignore_errors=True)
        if not args.skip_b:
            (work / "b").mkdir(exist_ok=True)
            b = part_b(work / "b", args.run_records, args.servers, args.service_ms, args.capacity)
            report["b"] = b
            print(json.dumps({"b": b}, indent=2), flush=True)
    finally:
        report["load_avg_at_end"] = os.getloadavg()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\nsummary (targets: commit ratio <= 1.5, peak RSS <= 1024 MB, rate ratio >= 0.90, RSS growth <= 100 MB)")
    if "a" in report:
        a = report["a"]
        print(f"  (a) {a['rows']:,} rows in {a['parts']} parts ({a['parquet_gb']} GB): commit last/first tenth "
              f"{a['commit_ratio_last_over_first']} ({a['commit_ms_first_tenth']} -> {a['commit_ms_last_tenth']} ms)")
        print(f"      ledger load {a['ledger']['result']['load_s']} s ({a['ledger']['maxrss_mb']} MB); peak RSS MB: "
              f"manifest {a['manifest']['maxrss_mb']} ({a['manifest']['wall_s']} s), status {a['status_run_dir']['maxrss_mb']}"
              f" ({a['status_run_dir']['wall_s']} s), status of {a['parts']} shards {a['status_sharded_root']['maxrss_mb']}"
              f" ({a['status_sharded_root']['wall_s']} s), merge {a['merge']['maxrss_mb']} ({a['merge']['wall_s']} s),"
              f" merged exactly-once: {a['merged_ok']}")
    if "b" in report:
        b = report["b"]
        print(f"  (b) {b['rows']:,} records, {b['servers']} bench servers ({b['service_ms']} ms, capacity {b['capacity']}):"
              f" rows/s last/first tenth {b['rate_ratio_last_over_first']} ({b['rows_per_s_first_tenth']} -> "
              f"{b['rows_per_s_last_tenth']}); main RSS {b['main_rss_mb_at_10pct']} -> {b['main_rss_mb_at_100pct']} MB"
              f" (+{b['main_rss_growth_mb']}); main CPU {b['main_cpu_ms_per_record']} ms/record")
    print(f"  load average start {report['load_avg_at_start']}, end {report['load_avg_at_end']}")


if __name__ == "__main__":
    main()
