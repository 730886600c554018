"""`rag-pipeline report` in bounded memory: peak RSS and wall time on a million-row output.

Builds an output of ``--parts`` x ``--rows`` rows (default 1,000 x 1,000) through the run's own commit path
(bench/scale.py ``synthetic_run``: every row through ``RowWriter.finish``, every part through
``RowWriter.commit``), with one small context per row (the report never reads ``contexts``, so their size only
costs disk) and varied rows: 4 endpoints, lognormal latencies, 5 % RAG hard failures (generation skipped), 9 %
soft failures, 2 % failed generations, and 1 % of the rows with an error text unique to the row (the worst case
of the error grouping: ~10,000 distinct kinds, folded at its cap).

Then, each in a fresh process (bench/scale.py ``in_child``: ``VmHWM`` of the child from /proc, not the
``ru_maxrss`` that Linux carries over from the forking parent), ``rag-pipeline report`` of:

* the first tenth of the parts (hard links in a second run directory), and
* the whole output,

and prints each one's peak RSS, Arrow's allocation peak and wall time, the ratio of the two peaks (flat memory
= about 1), and the goal (peak RSS <= 1 GB). Baseline, measured the same way: the same report with the rows
read by ``pipeline.output.reading.scan_batches`` (one pyarrow.dataset scan over every part, as the manifest
reads them) instead of one part at a time. For scale it also prints the Arrow size of the projected columns
of every row: what reading them whole would hold.

Usage:
    .venv/bin/python bench/report_memory.py [--parts 1000] [--rows 1000] [--workdir DIR] [--keep]
        [--screenshot docs/report.png] [--skip-baseline]

``--screenshot`` also opens the million-row report in headless Chromium (selenium + chromium-driver) and saves a
full-page screenshot, downscaled to 1,000 px wide (docs/report.png). Measured on 2 shared cores (load 7-8):
~80 s to build the output (575 MB of Parquet), ~1 minute for the four reports (README, "Run report").
"""

from __future__ import annotations

import argparse
import json
import math
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

from bench.scale import in_child, synthetic_run, write_input  # noqa: E402

ENDPOINTS = [f"http://gpu-node-{i}:30000" for i in range(4)]
GOAL_MB = 1024.0


def vary(seed: int = 0) -> Any:
    """A ``synthetic_run`` hook that makes the rows look like a run's (module docstring)."""
    rng = random.Random(seed)

    def hook(idx: int, rag: Any, gen: Any) -> tuple[Any, Any]:
        ep = ENDPOINTS[idx % len(ENDPOINTS)]
        rag.endpoint = ep
        rag.retrieve_ms = round(math.exp(rng.gauss(3.2, 0.4)), 3)
        rag.rag_llm_ms = round(math.exp(rng.gauss(6.8, 0.6)), 3)
        rag.rag_status, rag.rag_error = "ok", None
        r = rng.random()
        if r < 0.05:
            rag.rag_status = "hard_fail"
            rag.rag_error = (f"LLM request failed on {ep}: read timeout after 120 s (record {idx})" if r < 0.01
                             else f"LLM request failed on {ep}: HTTP 503 after 3 attempts")
            return rag, None
        if r < 0.14:
            rag.rag_status, rag.rag_error = "soft_fail", "no passage above retrieval.min_score"
        gen.endpoint = ep
        gen.generate_ms = round(math.exp(rng.gauss(7.3, 0.5)), 3)
        if rng.random() < 0.02:
            gen.gen_status, gen.gen_error = "failed", f"HTTP 500 from {ep}: CUDA out of memory"
        return rag, gen

    return hook


def projected_bytes(out: Path) -> int:
    """Arrow bytes of the columns the report reads, over every part (each part read alone): what holding
    them in memory at once would take."""
    import pyarrow.parquet as pq

    from pipeline.report.aggregate import ReportStats

    cols = ReportStats().columns()
    return sum(pq.read_table(part, columns=cols).nbytes for part in sorted(out.glob("part-*.parquet")))


_DATASET_CHILD = r"""
import sys, time
sys.path.insert(0, {repo!r})
t0 = time.perf_counter()
import pipeline.report.aggregate as agg
from pipeline.output.reading import scan_batches
agg.iter_part_batches = scan_batches  # the baseline: one pyarrow.dataset scan over every part
from pipeline.report import write_report
res = write_report(sys.argv[1], sys.argv[2])
import pyarrow as pa
hwm = [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")][0]
print("CHILD", time.perf_counter() - t0, hwm / 1024, pa.default_memory_pool().max_memory() / 2**20, res["rows"])
"""


def dataset_baseline(out: Path, html: Path) -> dict[str, Any]:
    """The same report with the rows read by ``pipeline.output.reading.scan_batches`` (pyarrow.dataset over
    every part) instead of one part at a time, in a fresh process: ``{"wall_s", "peak_rss_mb", "arrow_peak_mb"}``.

    Raises:
        RuntimeError: the child failed.
    """
    proc = subprocess.run([sys.executable, "-c", _DATASET_CHILD.format(repo=str(REPO)), str(out), str(html)],
                          capture_output=True, text=True, cwd=REPO)
    line = [x for x in proc.stdout.splitlines() if x.startswith("CHILD ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"baseline failed ({proc.returncode}): {proc.stderr[-2000:]}")
    wall, rss, arrow, _rows = (float(x) for x in line[-1].split()[1:])
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(rss, 1), "arrow_peak_mb": round(arrow, 2)}


def tenth_of(out: Path, dest: Path, parts: int) -> Path:
    """A run directory holding hard links to the first tenth of ``out``'s parts (same ``run.json``)."""
    (dest / ".rag-pipeline").mkdir(parents=True)
    shutil.copy2(out / ".rag-pipeline/run.json", dest / ".rag-pipeline/run.json")
    for k in range(max(1, parts // 10)):
        os.link(out / f"part-{k:05d}.parquet", dest / f"part-{k:05d}.parquet")
    return dest


def screenshot(page: Path, png: Path, width_px: int = 1000) -> None:
    """Open ``page`` in headless Chromium and save all of it as a small PNG (``width_px`` wide, 128 colours)."""
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    profile = tempfile.mkdtemp(prefix="bench-chromium-")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
              "--window-size=1300,1000", f"--user-data-dir={profile}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver") or "chromedriver"))
    try:
        driver.get(page.resolve().as_uri())
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.set_window_size(1300, height + 50)
        raw = png.with_suffix(".full.png")
        driver.save_screenshot(str(raw))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    with Image.open(raw) as im:
        im = im.convert("RGB")
        im = im.resize((width_px, round(im.height * width_px / im.width)), Image.LANCZOS)
        im.quantize(colors=128).save(png, optimize=True)
    raw.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=1000, help="rows per part")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the output under --workdir")
    ap.add_argument("--screenshot", type=Path, default=None, help="save a screenshot of the full report here")
    ap.add_argument("--skip-baseline", action="store_true", help="do not run the pyarrow.dataset baseline")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-report-"))
    work.mkdir(parents=True, exist_ok=True)
    n = args.parts * args.rows
    res: dict[str, Any] = {"rows": n, "parts": args.parts}
    try:
        inp = write_input(work / "input.jsonl", n)
        out = work / "run"
        t0 = time.perf_counter()

        def progress(k: int) -> None:
            if k % max(1, args.parts // 10) == 0:
                print(f"  committed {k}/{args.parts} parts ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                      flush=True)

        synthetic_run(inp, out, args.parts, args.rows, contexts=1, context_chars=50, on_commit=progress,
                      vary=vary())
        res["build_s"] = round(time.perf_counter() - t0, 1)
        res["parquet_mb"] = round(sum(p.stat().st_size for p in out.glob("part-*.parquet")) / 2**20, 1)
        res["projected_columns_mb"] = round(projected_bytes(out) / 2**20, 1)
        small = tenth_of(out, work / "tenth", args.parts)
        for name, d in (("tenth", small), ("full", out)):
            r = in_child("cli", "report", str(d), "-o", str(work / f"report-{name}.html"))
            res[f"report_{name}"] = {"rows": n // 10 if name == "tenth" else n, "wall_s": r["wall_s"],
                                     "peak_rss_mb": r["maxrss_mb"], "arrow_peak_mb": r["arrow_peak_mb"],
                                     "stdout": r["stdout"].strip()}
        full, tenth = res["report_full"], res["report_tenth"]
        res["rss_ratio_full_over_tenth"] = round(full["peak_rss_mb"] / tenth["peak_rss_mb"], 3)
        if not args.skip_baseline:
            for name, d in (("tenth", small), ("full", out)):
                res[f"baseline_dataset_scan_{name}"] = dataset_baseline(d, work / f"baseline-{name}.html")
            base = res["baseline_dataset_scan_full"]
            res["rss_ratio_baseline_over_ours_full"] = round(base["peak_rss_mb"] / full["peak_rss_mb"], 3)
        res["html_mb"] = round((work / "report-full.html").stat().st_size / 2**20, 2)
        res["goal"] = f"peak RSS <= {GOAL_MB:.0f} MB: {'met' if full['peak_rss_mb'] <= GOAL_MB else 'NOT met'}"
        if args.screenshot:
            screenshot(work / "report-full.html", args.screenshot)
            res["screenshot"] = str(args.screenshot)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
