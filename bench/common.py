"""Helpers shared by the orchestration and memory benchmarks (bench tools, not part of the product).

- :func:`ensure_store`: the example corpus ingested once into a temporary Chroma store, reused by later runs.
- :func:`write_records`: M synthetic input records made from data/example/queries.jsonl (repeated, new ids).
- :class:`PipelineRun`: `rag-pipeline run` as a subprocess in its own session (so the bench can stop exactly
  the process group it started), logging at INFO (-v) to a file so worker READY times can be read back.
- :func:`committed_parts`: (commit wall time, rows) of every committed Parquet part.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "data" / "example"
RAG_PIPELINE = str(Path(sys.executable).with_name("rag-pipeline"))
DEFAULT_STORE = Path(tempfile.gettempdir()) / f"rag-bench-store-{os.getuid()}"
COLLECTION = "bench"

_LOG_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO pipeline\.run\.worker_set: (?:rank0|(\S+)) READY")


def ensure_store(store: Path = DEFAULT_STORE, corpus: Path = EXAMPLE / "corpus.jsonl") -> tuple[Path, str]:
    """Ingest ``corpus`` into ``store`` (collection "bench") unless a previous bench run already did.

    A marker file holding the corpus' sha256 is written after a successful ingest; a store without it (or for
    another corpus) is reset and ingested again. Returns (store path, collection name).
    """
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()
    marker = store / f".bench-ingested-{COLLECTION}"
    if marker.exists() and marker.read_text().strip() == digest:
        return store, COLLECTION
    store.mkdir(parents=True, exist_ok=True)
    print(f"ingesting {corpus} into {store} (collection {COLLECTION!r}); reused by later bench runs ...",
          flush=True)
    t0 = time.time()
    subprocess.run([RAG_PIPELINE, "ingest", str(corpus), "--store", str(store), "--collection", COLLECTION,
                    "--reset", "--no-progress"], check=True, cwd=REPO, env=bench_env(1))
    marker.write_text(digest)
    print(f"  ingested in {time.time() - t0:.0f} s", flush=True)
    return store, COLLECTION


def write_records(path: Path, m: int) -> Path:
    """``m`` records ``{"id": "r000000", "query": <claim>, "claim_id": <_id>}``, cycling over the 40 claims."""
    queries = [json.loads(ln) for ln in (EXAMPLE / "queries.jsonl").read_text().splitlines() if ln.strip()]
    with path.open("w") as fh:
        for i in range(m):
            q = queries[i % len(queries)]
            fh.write(json.dumps({"id": f"r{i:06d}", "query": q["text"], "claim_id": int(q["_id"])}) + "\n")
    return path


def bench_env(torch_threads: int) -> dict[str, str]:
    """Environment of the processes the bench starts: offline, and torch's thread count if > 0."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ANONYMIZED_TELEMETRY="False")
    if torch_threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(torch_threads)
    return env


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for sec, values in sections.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class PipelineRun:
    """`rag-pipeline -v run ...` in its own session; stderr (INFO log) goes to ``workdir/stderr.log``."""

    def __init__(self, workdir: Path, args: list[str], torch_threads: int) -> None:
        self.workdir = workdir
        self.log_path = workdir / "stderr.log"
        self._log = self.log_path.open("w")
        self.t_launch = time.time()
        self.proc = subprocess.Popen([RAG_PIPELINE, "-v", "run", *args, "--no-progress"], cwd=REPO,
                                     env=bench_env(torch_threads), stdout=subprocess.DEVNULL, stderr=self._log,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"rag-pipeline run did not finish in {timeout_s:.0f} s; log tail:\n"
                               + self.log_tail()) from None
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGTERM then SIGKILL to the process group this object started (its own session)."""
        if self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def started_pids(self) -> dict[int, str]:
        """pid -> worker name ("rag-0", "gen-3", ...) from main's "started NAME (pid N)" log lines."""
        out: dict[int, str] = {}
        for ln in self.log_path.read_text(errors="replace").splitlines():
            m = re.search(r"INFO pipeline\.run\.worker_set: started (\S+) \(pid (\d+)\)", ln)
            if m:
                out[int(m.group(2))] = m.group(1)
        return out

    def ready_times(self) -> dict[str, float]:
        """Wall time (epoch s) at which main logged each worker READY ("rag-0" is rank0)."""
        out: dict[str, float] = {}
        for ln in self.log_path.read_text(errors="replace").splitlines():
            m = _LOG_RE.match(ln)
            if m:
                t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
                out.setdefault(m.group(3) or "rag-0", t)
        return out


def committed_parts(out_dir: Path) -> list[tuple[float, int]]:
    """(mtime, rows) of every committed part, in commit order (the part is written, then renamed)."""
    import pyarrow.parquet as pq

    parts = sorted(out_dir.glob("part-*.parquet"))
    return sorted((p.stat().st_mtime, pq.read_metadata(p).num_rows) for p in parts)


def steady_rate(parts: list[tuple[float, int]], t_from: float, total: int, tail_rows: int
                ) -> tuple[float, float, float, int] | None:
    """Rows committed per second between the first commit after ``t_from`` and the last commit before the
    final ``tail_rows`` rows (the drain at the end of the input, when fewer requests are in flight).

    Returns (rate, window start, window end, rows in the window), or None if the window is empty.
    """
    cum = 0
    points = []
    for t, n in parts:
        cum += n
        points.append((t, cum))
    start = next(((t, c) for t, c in points if t >= t_from), None)
    ends = [(t, c) for t, c in points if c <= total - tail_rows]
    if start is None or not ends or ends[-1][0] <= start[0]:
        return None
    (t0, c0), (t1, c1) = start, ends[-1]
    return (c1 - c0) / (t1 - t0), t0, t1, c1 - c0


class TreeSampler:
    """Samples the process tree under ``root_pid`` every ``interval_s`` (a thread): RSS and CPU time per process.

    Roles: ``main`` (the root), ``rag`` (a child that mapped libtorch: RAG workers import torch),
    ``tracker`` (multiprocessing's resource tracker), ``gen`` (every other child: the generation processes never
    import torch). Also keeps each process' kernel peak RSS (VmHWM, read while it is alive) and the machine's
    busy CPU time, to see how much of the 2 cores other programs took.
    """

    MIN_AGE_S = 0.5
    """Processes younger than this are not sampled: a spawned child is a copy of its parent until it execs."""

    def __init__(self, root_pid: int, interval_s: float = 0.25, extra: dict[int, str] | None = None) -> None:
        import threading

        self.root_pid = root_pid
        self.extra = dict(extra or {})  # more processes to sample (not in the tree), pid -> role
        self.interval_s = interval_s
        self.roles: dict[int, str] = {}
        self.torch: set[int] = set()  # processes that mapped libtorch
        self.hwm_kb: dict[int, int] = {}
        self.samples: list[tuple[float, dict[int, tuple[int, float]], float]] = []  # (t, {pid: (rss, cpu_s)}, busy)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tree-sampler")

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _role(self, p: Any) -> str:
        import psutil

        if p.pid not in self.torch:
            try:
                with open(f"/proc/{p.pid}/maps") as fh:
                    if "libtorch" in fh.read():
                        self.torch.add(p.pid)
            except OSError:  # the process is gone
                pass
        if p.pid == self.root_pid:
            return "main"
        if p.pid in self.extra:
            return self.extra[p.pid]
        role = self.roles.get(p.pid)
        if role == "tracker":
            return role
        try:
            if "resource_tracker" in " ".join(p.cmdline()):
                return "tracker"
        except psutil.Error:
            pass
        return "rag" if p.pid in self.torch else "gen"

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            t = time.time()
            snap: dict[int, tuple[int, float]] = {}
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for pid in self.extra:
                try:
                    procs.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    pass
            for p in procs:
                try:
                    with p.oneshot():
                        if t - p.create_time() < self.MIN_AGE_S:
                            continue  # maybe between fork and exec: still the parent's image (and its torch)
                        ct = p.cpu_times()
                        snap[p.pid] = (p.memory_info().rss, ct.user + ct.system)
                    self.roles[p.pid] = self._role(p)
                    with open(f"/proc/{p.pid}/status") as fh:
                        for ln in fh:
                            if ln.startswith("VmHWM:"):
                                self.hwm_kb[p.pid] = max(self.hwm_kb.get(p.pid, 0), int(ln.split()[1]))
                                break
                except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                    continue
            ct = psutil.cpu_times()
            self.samples.append((t, snap, ct.user + ct.system + ct.nice + getattr(ct, "irq", 0)
                                 + getattr(ct, "softirq", 0) + getattr(ct, "steal", 0)))
            self._stop.wait(self.interval_s)

    def cpu_cores(self, t_a: float, t_b: float) -> dict[str, float]:
        """CPU used in [t_a, t_b] (cores: CPU seconds / wall seconds) per role, and by the whole machine."""
        inside = [s for s in self.samples if t_a <= s[0] <= t_b]
        if len(inside) < 2:
            return {}
        (ta, sa, ba), (tb, sb, bb) = inside[0], inside[-1]
        out: dict[str, float] = {}
        for pid, (_, cpu_b) in sb.items():
            cpu_a = sa[pid][1] if pid in sa else 0.0  # started inside the window
            role = self.roles.get(pid, "gen")
            out[role] = out.get(role, 0.0) + (cpu_b - cpu_a) / (tb - ta)
        out["machine"] = (bb - ba) / (tb - ta)
        return out
