"""What an operator sees during a long run with a stall: live state, progress lines, status, metrics, the report.

A run of ``--duration-s`` (default 600 s) against benchmark endpoints (bench/bench_server.py: each request takes
``--service-ms``, ``--capacity`` at a time per endpoint), sized so the endpoints' ideal rate would finish it in
``duration - stall``; ``--stall-s`` (default 120 s) into the middle, every endpoint hangs (completions and /health
wait: a stalled GPU server). While it runs, this script samples once a second, as an operator's tools would:

- ``OUTPUT/.rag-pipeline/state.json``: the gaps between rewrites (its ``updated_unix``), the phase, the rate and ETA;
- the plain progress lines on the run's stderr (timestamped): the gaps between them;
- ``rag-pipeline status --json OUTPUT`` every ``--status-every-s``: the run's liveness (running / stopped / complete;
  ``complete`` only when sampled as the run ends);
- a Prometheus scrape of the run's ``--metrics-port 0`` (the URL from the state file) every ``--scrape-every-s``,
  parsed with ``prometheus_client``'s text parser: ``rag_pipeline_records_total`` must never fall and must grow.

Afterwards it renders ``rag-pipeline report`` and prints every figure as a ratio to the interval the run was
given (``run.progress_interval_s``), measured in this one run. ``--screenshot PATH`` also saves a PNG of the report
from headless Chromium (README's screenshot).

    .venv/bin/python bench/long_run.py                     # 10 min, 2 min stall (defaults)
    .venv/bin/python bench/long_run.py --duration-s 180 --stall-s 40   # a quick look

Exit status 1 if a check fails (a gap longer than 2 intervals, a status other than running during the run, a
scrape that does not parse, counters that fall or never grow, a report that does not render, a failure row).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_server import launch  # noqa: E402
from bench.common import RAG_PIPELINE, REPO, bench_env, ensure_store, write_config, write_records  # noqa: E402

PROGRESS_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \[progress\] (\d+)/(\d+) rows")


class Sampler:
    """Samples the run's state file, status command and metrics endpoint from a thread (see the module docstring)."""

    def __init__(self, out: Path, status_every_s: float, scrape_every_s: float) -> None:
        self.out = out
        self.status_every_s = status_every_s
        self.scrape_every_s = scrape_every_s
        self.state_updates: list[tuple[float, str, int]] = []  # (updated_unix, phase, rows), distinct rewrites
        self.statuses: list[tuple[float, str]] = []  # (wall time, liveness state)
        self.scrapes: list[tuple[float, float, float]] = []  # (wall time, records_total, outage_seconds_total)
        self.scrape_errors: list[str] = []
        self.stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._t.start()

    def join(self) -> None:
        self.stop.set()
        self._t.join(60)

    def _loop(self) -> None:
        last_status = last_scrape = 0.0
        while not self.stop.wait(1.0):
            state = self._state()
            if state is None:
                continue
            if not self.state_updates or state["updated_unix"] != self.state_updates[-1][0]:
                self.state_updates.append((state["updated_unix"], state["phase"], state.get("rows", 0)))
            now = time.time()
            if state["phase"] == "running" and now - last_status >= self.status_every_s:
                last_status = now
                self.statuses.append((now, self._status()))
            url = state.get("metrics_url")
            if url and state["phase"] == "running" and now - last_scrape >= self.scrape_every_s:
                last_scrape = now
                self._scrape(url, now)

    def _state(self) -> dict | None:
        try:
            return json.loads((self.out / ".rag-pipeline/state.json").read_text())
        except (OSError, ValueError):
            return None

    def _status(self) -> str:
        res = subprocess.run([RAG_PIPELINE, "status", "--json", str(self.out)], capture_output=True, text=True,
                             env=bench_env(1), timeout=120)
        try:
            doc = json.loads(res.stdout)
            return ((doc.get("run") or {}).get("state")) or "?"
        except ValueError:
            return f"unreadable (exit {res.returncode})"

    def _scrape(self, url: str, now: float) -> None:
        try:
            text = requests.get(url, timeout=10).text
            records = outage = 0.0
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name == "rag_pipeline_records_total":
                        records += s.value
                    elif s.name == "rag_pipeline_outage_seconds_total":
                        outage += s.value
            self.scrapes.append((now, records, outage))
        except (requests.RequestException, ValueError) as exc:
            self.scrape_errors.append(f"{type(exc).__name__}: {exc}")


def gaps(times: list[float], a: float | None = None, b: float | None = None) -> list[float]:
    """Gaps between consecutive times (s), only those ending inside [a, b] when given."""
    return [t1 - t0 for t0, t1 in itertools.pairwise(times)
            if (a is None or t1 >= a) and (b is None or t1 <= b)]


def progress_times(stderr_text: str) -> list[float]:
    """Wall times (s since the epoch, local time as printed) of the plain progress lines."""
    out = []
    for line in stderr_text.splitlines():
        m = PROGRESS_RE.match(line)
        if m:
            out.append(dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration-s", type=float, default=600.0, help="planned length of the run, seconds")
    ap.add_argument("--stall-s", type=float, default=120.0, help="how long every endpoint hangs, seconds")
    ap.add_argument("--interval-s", type=float, default=10.0, help="run.progress_interval_s of the run")
    ap.add_argument("--endpoints", type=int, default=2)
    ap.add_argument("--service-ms", type=float, default=2000.0)
    ap.add_argument("--capacity", type=int, default=16)
    ap.add_argument("--status-every-s", type=float, default=15.0)
    ap.add_argument("--scrape-every-s", type=float, default=10.0)
    ap.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temporary directory)")
    ap.add_argument("--screenshot", type=Path, default=None, help="save a PNG of the report here")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="rag-long-run-"))
    work.mkdir(parents=True, exist_ok=True)
    store, collection = ensure_store()
    servers = launch(args.endpoints, args.service_ms, args.capacity)
    failures: list[str] = []
    try:
        per_record_s = 2  # retrieve+answer: two LLM requests per record
        n = max(10, int(servers.ideal_requests_per_s / per_record_s * (args.duration_s - args.stall_s)))
        records = write_records(work / "records.jsonl", n)
        out = work / "out"
        cfg = write_config(work / "config.toml", {"run": {"progress_interval_s": args.interval_s}})
        print(f"{n} records, {args.endpoints} endpoints x capacity {args.capacity}, service {args.service_ms:g} ms, "
              f"stall {args.stall_s:g} s, progress interval {args.interval_s:g} s; work dir {work}", flush=True)
        err_path = work / "stderr.log"
        cmd = [RAG_PIPELINE, "run", "--input", str(records), "--output", str(out), "--store", str(store),
               "--collection", collection, "--endpoints", ",".join(servers.urls), "--config", str(cfg),
               "--metrics-port", "0", "--no-progress"]
        sampler = Sampler(out, args.status_every_s, args.scrape_every_s)
        with err_path.open("w") as err:
            t_start = time.time()
            proc = subprocess.Popen(cmd, cwd=REPO, env=bench_env(1), stdout=subprocess.DEVNULL, stderr=err)
            sampler.start()
            running_since = None
            while running_since is None and proc.poll() is None:
                st = sampler._state()
                if st and st["phase"] == "running":
                    running_since = time.time()
                time.sleep(0.5)
            stall_at = (running_since or time.time()) + (args.duration_s - args.stall_s) / 2
            while proc.poll() is None and time.time() < stall_at:
                time.sleep(0.5)
            t_stall = time.time()
            servers.fault({"hang": True, "for_s": args.stall_s})
            print(f"stall: every endpoint hangs for {args.stall_s:g} s from "
                  f"{time.strftime('%H:%M:%S', time.localtime(t_stall))}", flush=True)
            rc = proc.wait(timeout=args.duration_s * 4 + 600)
            t_end = time.time()
            sampler.join()
        t_stall_end = t_stall + args.stall_s
        stderr_text = err_path.read_text(errors="replace")
        if rc != 0:
            failures.append(f"run exit {rc}")
        print(f"\nrun: exit {rc}, {t_end - t_start:.0f} s (servers ready -> end {t_end - (running_since or t_start):.0f} s)")

        # -- state file
        upd = [u for u, phase, _ in sampler.state_updates if phase == "running"]
        g_all, g_stall = gaps(upd), gaps(upd, t_stall, t_stall_end)
        rows_during = [r for u, _, r in sampler.state_updates if t_stall <= u <= t_stall_end]
        print(f"state.json: {len(upd)} rewrites while running; max gap {max(g_all, default=0):.1f} s "
              f"(ratio to interval {max(g_all, default=0) / args.interval_s:.2f}); during the stall "
              f"{len(g_stall)} rewrites, max gap {max(g_stall, default=0):.1f} s "
              f"(ratio {max(g_stall, default=0) / args.interval_s:.2f}); rows during the stall "
              f"{min(rows_during, default=0)} -> {max(rows_during, default=0)}")
        if not g_stall or max(g_all) > 2 * args.interval_s:
            failures.append("state file gap")

        # -- progress lines
        pt = progress_times(stderr_text)
        p_all, p_stall = gaps(pt), gaps(pt, t_stall, t_stall_end)
        print(f"progress lines: {len(pt)}; max gap {max(p_all, default=0):.0f} s (ratio "
              f"{max(p_all, default=0) / args.interval_s:.2f}); during the stall {len(p_stall)} lines, max gap "
              f"{max(p_stall, default=0):.0f} s; sample during the stall:")
        for line in stderr_text.splitlines():
            m = PROGRESS_RE.match(line)
            if m and t_stall + args.stall_s / 2 <= dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp():
                print("   ", line)
                break
        if not p_stall or max(p_all) > 2 * args.interval_s + 1:
            failures.append("progress line gap")

        # -- status
        states = [s for _, s in sampler.statuses]
        in_stall = [s for t, s in sampler.statuses if t_stall <= t <= t_stall_end]
        print(f"status --json during the run: {len(states)} checks, {states.count('running')} 'running' "
              f"({len(in_stall)} during the stall, all running: {all(s == 'running' for s in in_stall)})")
        if not states or any(s not in ("running", "complete") for s in states):  # complete: sampled at the end
            failures.append(f"status not running: {sorted(set(states))}")

        # -- metrics
        rec = [r for _, r, _ in sampler.scrapes]
        falls = sum(1 for a, b in itertools.pairwise(rec) if b < a)
        outage = [o for _, _, o in sampler.scrapes]
        print(f"metrics: {len(sampler.scrapes)} scrapes parsed, {len(sampler.scrape_errors)} failed; "
              f"rag_pipeline_records_total {rec[0] if rec else 0:.0f} -> {rec[-1] if rec else 0:.0f} "
              f"(falls: {falls}); rag_pipeline_outage_seconds_total at the last scrape "
              f"{outage[-1] if outage else 0:.0f} s")
        if sampler.scrape_errors or not rec or falls or rec[-1] <= rec[0]:
            failures.append("metrics")

        # -- rows
        import pyarrow.dataset as ds

        table = ds.dataset(out, format="parquet").to_table(columns=["rag_status", "gen_status"])
        bad = sum(1 for r, g in zip(table["rag_status"].to_pylist(), table["gen_status"].to_pylist(), strict=True)
                  if r != "ok" or g != "ok")
        print(f"rows: {table.num_rows} of {n}, not ok: {bad}")
        if table.num_rows != n or bad:
            failures.append("rows")

        # -- report
        html = work / "report.html"
        t0 = time.time()
        res = subprocess.run(["/usr/bin/time", "-f", "%M", RAG_PIPELINE, "report", str(out), "-o", str(html)],
                             capture_output=True, text=True, env=bench_env(1))
        peak_kib = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "?"
        print(f"report: exit {res.returncode}, {time.time() - t0:.1f} s, {html.stat().st_size if html.exists() else 0}"
              f" bytes, peak RSS {peak_kib} KiB")
        if res.returncode != 0:
            failures.append("report")
        if args.screenshot and html.exists():
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--screenshot={args.screenshot}", "--window-size=1200,2600",
                            html.resolve().as_uri()], capture_output=True, timeout=120)
            print(f"screenshot: {args.screenshot} ({args.screenshot.stat().st_size if args.screenshot.exists() else 0}"
                  " bytes)")
    finally:
        servers.stop()
    print("\nchecks:", "all passed" if not failures else "FAILED: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
