"""A corpus at Wikipedia scale: the store's write path, memory, disk and query cost against collection size.

One store grows through the points of ``--points`` (default 100k, 300k, 1M chunks), measured at each point, so the
largest point costs one pass; a run that stops resumes at the first unfinished point (state in ``--out``).

What is measured, at each point N (each step in its own child process, so peak RSS is that step's alone):

* ``ingest``: :func:`pipeline.corpus.ingest.ingest_source` (the project's writer: source read, hash, ledger,
  Chroma upsert, then the BM25 index rebuild of the collection) of a folder of JSONL parts holding documents
  0..N-1; the documents of earlier points are unchanged (only compared with the ledger), the new ones written.
  Embeddings are precomputed (random unit float32 [N, 384], a memory-mapped ``.npy`` looked up by chunk id
  through ``embed_fn``), so the CPU measures the store, not the embedding model. Reported: chunks/s of the write
  pass per window of chunks (does it fall as the collection grows?), peak RSS of the write pass and of the BM25
  build (an RSS sampler thread; the BM25 phase is the last ``bm25_seconds`` of the call), BM25 build seconds.
* ``query``: a RAG-worker-like process opens :class:`pipeline.retrieval.retriever.Retriever` (``dense``,
  ``bm25``, ``hybrid``) and runs single queries: p50/p95 latency of ``Retriever.search`` (top-k 10) and the
  process's RSS. Query embeddings come from a stand-in for the model (random unit rows: the model's cost does
  not depend on the collection size), so the latency is the store's.
* disk: bytes per chunk of the Chroma SQLite file, the HNSW segment, the BM25 index, the ingest ledger.

Synthetic chunks: ~100 words (normal, sd 20, min 20) drawn from a 50,000-word vocabulary with Zipf frequencies
(p(rank r) ~ 1 / r^1.07, the exponent fitted to English text by Piantadosi 2014, "Zipf's word frequency law in
natural language"); one chunk per document (``ingest.chunk_chars`` = 0), like a passage corpus (DPR's 100-word
Wikipedia passages).

Then it fits chunks/s, peak RSS, disk and query latency against N (least squares, numpy) and projects them to
21M chunks (``--project``).

Usage:
    nice -n 10 python bench/corpus_scale.py --out bench_out/scale [--points 100000,300000,1000000]
        [--write-batch 0] [--bm25-build stream|whole] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM = 384
PART_DOCS = 50_000
VOCAB = 50_000
ZIPF_S = 1.07
COLLECTION = "wiki"


# --- synthetic corpus ---------------------------------------------------------------------------------
def _vocabulary(rng) -> list[str]:  # noqa: ANN001
    """VOCAB distinct lowercase words of 3-12 letters (lengths ~ Poisson(6), clipped)."""
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words: dict[str, None] = {}
    while len(words) < VOCAB:
        n = int(min(12, max(3, rng.poisson(6))))
        words.setdefault("".join(rng.choice(letters, n)), None)
    return list(words)


def ensure_corpus(out: Path, n: int, n_max: int) -> Path:
    """JSONL parts of PART_DOCS documents (``_id`` d0000000...) covering documents 0..n-1 under ``out/src``,
    and the embeddings ``out/emb.npy`` (float32 [n_max, 384], unit rows) filled for them. Reused when present."""
    import numpy as np

    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    emb_path = out / "emb.npy"
    if not emb_path.exists():
        np.lib.format.open_memmap(emb_path, mode="w+", dtype=np.float32, shape=(n_max, DIM)).flush()
    emb = np.load(emb_path, mmap_mode="r+")
    if emb.shape[0] < n:
        raise SystemExit(f"{emb_path} holds {emb.shape[0]} rows < {n}: remove it or keep --points")
    vocab = None
    p = 1.0 / np.arange(1, VOCAB + 1) ** ZIPF_S
    p /= p.sum()
    for part in range((n + PART_DOCS - 1) // PART_DOCS):
        path = src / f"part-{part:04d}.jsonl"
        if path.exists():
            continue
        rng = np.random.default_rng(1000 + part)
        if vocab is None:
            vocab = np.array(_vocabulary(np.random.default_rng(7)), dtype=object)
        lo = part * PART_DOCS
        lens = np.maximum(20, rng.normal(100, 20, PART_DOCS).astype(int))
        words = vocab[rng.choice(VOCAB, int(lens.sum()), p=p)]
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            at = 0
            for i, m in enumerate(lens):
                text = " ".join(words[at:at + m])
                at += m
                fh.write(json.dumps({"_id": f"d{lo + i:07d}", "title": "", "text": text}) + "\n")
        e = rng.standard_normal((PART_DOCS, DIM), dtype=np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        hi = min(lo + PART_DOCS, emb.shape[0])
        emb[lo:hi] = e[:hi - lo]
        emb.flush()
        tmp.rename(path)
        print(f"  corpus part {part}: documents {lo}..{lo + PART_DOCS - 1}", flush=True)
    return src


def _sub_source(out: Path, n: int) -> Path:
    """A folder of symlinks to the first n / PART_DOCS parts (the SOURCE of point n)."""
    d = out / f"source-{n}"
    d.mkdir(exist_ok=True)
    for part in range(n // PART_DOCS):
        link = d / f"part-{part:04d}.jsonl"
        if not link.exists():
            link.symlink_to(out / "src" / link.name)
    return d


# --- RSS sampling ---------------------------------------------------------------------------------------
class RssSampler:
    """Samples this process's memory every ``every_s`` seconds in a daemon thread: [(t, VmRSS, RssAnon)] in
    bytes, from /proc/self/status (RssAnon: heap and anonymous maps; VmRSS adds resident file-backed pages, e.g.
    memory-mapped index files, which the kernel can drop)."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s = every_s
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @staticmethod
    def read() -> tuple[int, int]:
        vals = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    key, kb, _ = line.split()
                    vals[key[:-1]] = int(kb) * 1024
        return vals["VmRSS"], vals["RssAnon"]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), *self.read()))
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()

    def peak(self, t_from: float = 0.0, t_to: float = float("inf"), anon: bool = False) -> int:
        return max((s[2 if anon else 1] for s in self.samples if t_from <= s[0] <= t_to), default=0)


def _peak_rss_self() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- children -------------------------------------------------------------------------------------------
def child_ingest(args: argparse.Namespace) -> dict:
    import numpy as np

    from pipeline.config import EmbeddingConfig, IngestConfig, StoreConfig
    from pipeline.corpus.ingest import ingest_source
    from pipeline.retrieval.bm25 import BM25Settings

    out = Path(args.out)
    emb = np.load(out / "emb.npy", mmap_mode="r")
    timeline: list[tuple[float, int]] = []
    written = [0]

    progress = open(out / f"timeline-{args.n}.jsonl", "w", encoding="utf-8")  # noqa: SIM115

    def lookup(ids: list[str], texts: list[str]) -> np.ndarray:
        rows = np.fromiter((int(i[1:].split("#", 1)[0]) for i in ids), dtype=np.int64, count=len(ids))
        timeline.append((time.perf_counter(), written[0]))
        progress.write(json.dumps([timeline[-1][0] - t0, written[0]]) + "\n")
        progress.flush()
        written[0] += len(ids)
        return np.ascontiguousarray(emb[rows])

    sampler = RssSampler()
    t0 = time.perf_counter()
    summary = ingest_source(
        _sub_source(out, args.n), StoreConfig(path=str(out / "store"), collection=COLLECTION),
        IngestConfig(chunk_chars=0, on_error="skip", write_batch_chunks=args.write_batch), EmbeddingConfig(),
        progress=False, bm25=BM25Settings(), embed_fn=lookup,
    )
    t1 = time.perf_counter()
    sampler.stop()
    bm25_from = t1 - summary.bm25_seconds
    timeline.append((bm25_from, written[0]))
    return {
        "summary": summary.as_dict(),
        "timeline": [(t - t0, c) for t, c in timeline],
        "write_peak_rss": sampler.peak(0, bm25_from),
        "bm25_peak_rss": sampler.peak(bm25_from),
        "bm25_peak_anon": sampler.peak(bm25_from, anon=True),
        "peak_rss": _peak_rss_self(),
        "write_seconds": bm25_from - t0,
    }


def child_bm25(args: argparse.Namespace) -> dict:
    """One BM25 build of the collection in a scratch index root: ``whole`` (all texts and tokens in memory,
    :meth:`BM25Index.build` + ``save``) or ``stored`` (:meth:`BM25Index.build_stored`, bounded memory)."""
    from pipeline.config import StoreConfig
    from pipeline.retrieval.bm25 import BM25Index, BM25Settings, iter_collection, read_collection
    from pipeline.store.client import open_collection

    out = Path(args.out)
    col = open_collection(StoreConfig(path=str(out / "store"), collection=COLLECTION), create=False)
    root = out / f"bm25-scratch-{args.bm25_build}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    opened = RssSampler.read()
    col.get(limit=1, include=["documents"])  # the local client loads the collection's HNSW index on first use
    before = RssSampler.read()
    sampler = RssSampler()
    t0 = time.perf_counter()
    if args.bm25_build == "whole":
        index = BM25Index.build(*read_collection(col), BM25Settings())
        index.save(root)
    else:
        index = BM25Index.build_stored(iter_collection(col), BM25Settings(), root)
    seconds = time.perf_counter() - t0
    sampler.stop()
    n = len(index)
    del index
    shutil.rmtree(root, ignore_errors=True)
    return {"seconds": seconds, "n": n, "rss_before": before[0], "anon_before": before[1], "anon_opened": opened[1],
            "peak_rss": sampler.peak(), "peak_anon": sampler.peak(anon=True), "maxrss": _peak_rss_self()}


class _StandInEmbedder:
    """Stands in for the SentenceTransformer in the query child: random unit float32 [n, 384] rows (the
    model's cost does not depend on the collection size; the store's does)."""

    device = "cpu"

    def __init__(self) -> None:
        import numpy as np

        self.rng = np.random.default_rng(5)

    def encode(self, texts, **_kw):  # noqa: ANN001, ANN201
        import numpy as np

        e = self.rng.standard_normal((len(texts), DIM), dtype=np.float32)
        return e / np.linalg.norm(e, axis=1, keepdims=True)


def child_query(args: argparse.Namespace) -> dict:
    import numpy as np
    import psutil

    from pipeline.config import StoreConfig
    from pipeline.retrieval.retriever import Retriever

    out = Path(args.out)
    rng = np.random.default_rng(11)
    # queries: 3-8 words of documents of the collection (so BM25 finds terms)
    queries = []
    with open(out / "src" / "part-0000.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= args.queries:
                break
            words = json.loads(line)["text"].split()
            k = int(rng.integers(3, 9))
            at = int(rng.integers(0, max(1, len(words) - k)))
            queries.append(" ".join(words[at:at + k]))
    res = {}
    proc = psutil.Process()
    base = proc.memory_info().rss
    for mode in ("dense", "bm25", "hybrid"):
        t0 = time.perf_counter()
        r = Retriever(StoreConfig(path=str(out / "store"), collection=COLLECTION), _StandInEmbedder(),
                      create=False, mode=mode)
        open_s = time.perf_counter() - t0
        r.search(queries[:2], 10)  # warm
        lat = []
        for q in queries:
            tq = time.perf_counter()
            r.search([q], 10)
            lat.append(time.perf_counter() - tq)
        res[mode] = {"open_s": open_s, "p50_ms": float(np.percentile(lat, 50) * 1e3),
                     "p95_ms": float(np.percentile(lat, 95) * 1e3), "rss_after": proc.memory_info().rss}
        del r
    res["base_rss"] = base
    res["peak_rss"] = _peak_rss_self()
    return res


def _run_child(args: argparse.Namespace, what: str, n: int, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--out", args.out, "--n", str(n), *extra,
           "--write-batch", str(args.write_batch), "--queries", str(args.queries)]
    env = {**os.environ, "ANONYMIZED_TELEMETRY": "False", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"child {what} at n={n} failed with exit {p.returncode}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["child_wall_s"] = time.perf_counter() - t0
    res["child_maxrss_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return res


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def disk(out: Path) -> dict:
    store = out / "store"
    sqlite = _du(store / "chroma.sqlite3")
    bm25 = _du(store / "bm25")
    total = _du(store)
    ledger = _du(store / "ingest")
    hnsw = sum(_du(d) for d in store.iterdir() if d.is_dir() and d.name not in ("bm25", "ingest"))
    return {"total": total, "sqlite": sqlite, "hnsw": hnsw, "bm25": bm25, "ledger": ledger,
            "other": total - sqlite - hnsw - bm25 - ledger}


# --- report ---------------------------------------------------------------------------------------------
def _windows(timeline: list, start_n: int, window: int) -> list[tuple[int, float]]:
    """(collection size at the window's end, chunks/s in the window) from the write batches' timestamps."""
    out = []
    t_prev, c_prev = timeline[0]
    for t, c in timeline[1:]:
        if c - c_prev >= window or (t, c) == tuple(timeline[-1]):
            if c > c_prev and t > t_prev:
                out.append((start_n + c, (c - c_prev) / (t - t_prev)))
            t_prev, c_prev = t, c
    return out


def _opened(build: dict) -> int:
    """Anonymous memory of the bm25 child with the collection opened, before its first read."""
    return build.get("anon_opened", build["anon_before"])


def report(state: dict, project: int) -> None:
    import numpy as np

    pts = sorted(state["points"].values(), key=lambda r: r["n"])
    if not pts:
        print("no point measured yet")
        return
    mib = 2**20
    print(f"\nstore: {state.get('variant', '')}")
    print("\nwrite rate of the ingest (chunks/s per window of the write pass, collection size at the window's end):")
    curve = []
    for r in pts:
        ing = r["ingest"]
        w = _windows(ing["timeline"], r["start_n"], 50_000 if r["n"] - r["start_n"] > 150_000 else 20_000)
        curve.extend(w)
        print("  " + ", ".join(f"{n // 1000}k: {v:.0f}" for n, v in w))
    partial = state.get("partial")
    if partial:  # an ingest stopped before its point (its write batches were logged as they went)
        w = _windows(partial["timeline"], partial["start_n"], 50_000)
        curve.extend(w)
        print(f"  (point {partial['n']} stopped at {partial['start_n'] + partial['timeline'][-1][1]:,} chunks) "
              + ", ".join(f"{n // 1000}k: {v:.0f}" for n, v in w))
    print("\n     N  new chunks  write s  chunks/s  write peak RSS  BM25 build s  BM25 peak RSS  disk B/chunk "
          "(sqlite, hnsw, bm25)  query p50/p95 ms dense | bm25 | hybrid   reader RSS (hybrid)")
    for r in pts:
        ing, q, d = r["ingest"], r["query"], r["disk"]
        s = ing["summary"]
        new = s["chunks_added"]
        n = r["n"]
        print(f"  {n:>8} {new:>10} {ing['write_seconds']:8.0f} {new / ing['write_seconds']:9.0f} "
              f"{ing['write_peak_rss'] / mib:11.0f} MiB {s['bm25_seconds']:12.1f} {ing['bm25_peak_rss'] / mib:10.0f} MiB "
              f"{d['total'] / n:8.0f} ({d['sqlite'] / n:.0f}, {d['hnsw'] / n:.0f}, {d['bm25'] / n:.0f})   "
              f"{q['dense']['p50_ms']:.1f}/{q['dense']['p95_ms']:.1f} | {q['bm25']['p50_ms']:.1f}/"
              f"{q['bm25']['p95_ms']:.1f} | {q['hybrid']['p50_ms']:.1f}/{q['hybrid']['p95_ms']:.1f}"
              f"   {q['hybrid']['rss_after'] / mib:.0f} MiB")
    builds = state.get("bm25_builds", {})
    if builds:
        print("\nBM25 build of the whole collection, standalone (seconds; peak anonymous memory above the opened "
              "client, [of which the client's first read, i.e. Chroma loading the HNSW index, where measured]):")
        for n in sorted((n for n in builds if builds[n]), key=int):
            print(f"  {int(n):>8}: " + "; ".join(
                f"{k} {b['seconds']:.0f} s, {(b['peak_anon'] - _opened(b)) / mib:.0f} MiB"
                + (f" [{(b['anon_before'] - b['anon_opened']) / mib:.0f}]" if "anon_opened" in b else "")
                for k, b in sorted(builds[n].items())))
    ns = np.array([r["n"] for r in pts], dtype=float)
    if len(curve) >= 2:
        cn = np.array([c[0] for c in curve], dtype=float)
        cv = np.array([c[1] for c in curve], dtype=float)
        # time per chunk grows with log N (HNSW insert ~ log N): fit seconds/chunk = a + b ln N
        b, a = np.polyfit(np.log(cn), 1.0 / cv, 1)
        rate_proj = 1.0 / (a + b * np.log(project))
        # hours for the whole ingest: integral of (a + b ln x) dx from 0 to project
        secs = a * project + b * (project * np.log(project) - project)
        print(f"\nfit: seconds/chunk = {a:.3e} + {b:.3e} ln N  ->  {rate_proj:.0f} chunks/s at {project:,}; "
              f"whole ingest of {project:,} chunks on one writer ~ {secs / 3600:.1f} h")
    if len(pts) >= 2:
        def lin(y: np.ndarray, label: str, unit: float, uname: str) -> None:
            b, a = np.polyfit(ns, y, 1)
            print(f"fit: {label} = {a / unit:.1f} {uname} + {b:.1f} B x N  ->  {(a + b * project) / unit:,.1f} {uname}"
                  f" at {project:,}")
        lin(np.array([r["ingest"]["write_peak_rss"] for r in pts], float), "writer peak RSS", mib, "MiB")
        lin(np.array([r["disk"]["total"] for r in pts], float), "disk", mib, "MiB")
        lin(np.array([r["query"]["hybrid"]["rss_after"] for r in pts], float), "local reader RSS (hybrid)", mib,
            "MiB")
        builds = state.get("bm25_builds", {})
        for kind in ("whole", "stored"):
            got = sorted((int(n), b[kind]) for n, b in builds.items() if kind in b)
            if len(got) < 2:
                continue
            bn = np.array([n for n, _ in got], float)
            anon = np.array([b["peak_anon"] - _opened(b) for _, b in got], float)
            lin_n = np.polyfit(bn, anon, 1)
            secs = np.array([b["seconds"] for _, b in got], float)
            us = float(np.mean(secs / bn)) * 1e6
            print(f"fit: BM25 build ({kind}) memory above the opened client = {lin_n[1] / mib:.0f} MiB + "
                  f"{lin_n[0]:.0f} B x N  ->  {(lin_n[1] + lin_n[0] * project) / 2**30:,.1f} GiB at {project:,}; "
                  f"time {us:.0f} us per chunk (mean of the points)  ->  {us * project / 1e6 / 3600:.1f} h")
        for mode in ("dense", "bm25", "hybrid"):
            p = np.array([r["query"][mode]["p50_ms"] for r in pts], float)
            b, a = np.polyfit(np.log(ns), p, 1) if mode == "dense" else np.polyfit(ns, p, 1)
            x = np.log(project) if mode == "dense" else project
            print(f"fit: {mode} p50 ms = {a:.2f} + {b:.3g} x {'ln N' if mode == 'dense' else 'N'}  ->  "
                  f"{a + b * x:,.1f} ms at {project:,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench_out" / "corpus_scale"))
    ap.add_argument("--points", default="100000,300000,1000000")
    ap.add_argument("--write-batch", type=int, default=0, help="ingest.write_batch_chunks (0 = the default)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--project", type=int, default=21_000_000)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--child", choices=("ingest", "query", "bm25"))
    ap.add_argument("--bm25-build", choices=("whole", "stored"), default="stored")
    ap.add_argument("--bm25-compare", default="whole,stored",
                    help="BM25 builds measured standalone at each point ('' = none): whole = the in-memory build "
                         "(texts and tokens of the collection in memory), stored = the bounded-memory build")
    ap.add_argument("--n", type=int, default=0)
    args = ap.parse_args()
    if args.child:
        res = {"ingest": child_ingest, "query": child_query, "bm25": child_bm25}[args.child](args)
        print(json.dumps(res))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"points": {}}
    state["variant"] = f"write_batch_chunks={args.write_batch or 'default'}"
    points = [int(float(p)) for p in args.points.split(",")]
    for n in points:  # an ingest killed before its point finished: keep its logged write rate for the curve
        log_path = out / f"timeline-{n}.jsonl"
        if str(n) not in state.get("ingested", {}) and log_path.exists():
            rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
            if len(rows) > 1:
                state["partial"] = {"n": n, "start_n": max((int(k) for k in state["points"]), default=0),
                                    "timeline": rows}
    if not args.report_only:
        for n in points:
            if str(n) in state["points"]:
                continue
            if n % PART_DOCS:
                raise SystemExit(f"points must be multiples of {PART_DOCS}")
            t0 = time.perf_counter()
            ensure_corpus(out, n, max(points))
            print(f"point {n}: corpus ready in {time.perf_counter() - t0:.0f} s", flush=True)
            start_n = max((int(k) for k in state["points"]), default=0)
            ing = state.setdefault("ingested", {}).get(str(n))
            if ing is None:  # the ingest of a point is kept as soon as it is done (a resume skips it)
                ing = _run_child(args, "ingest", n)
                state["ingested"][str(n)] = ing
                state_path.write_text(json.dumps(state))
            s = ing["summary"]
            print(f"point {n}: ingest {s['chunks_added']} new chunks in {ing['write_seconds']:.0f} s "
                  f"({s['chunks_added'] / ing['write_seconds']:.0f}/s), BM25 {s['bm25_seconds']:.0f} s; "
                  f"peak RSS write {ing['write_peak_rss'] / 2**20:.0f} MiB, BM25 {ing['bm25_peak_rss'] / 2**20:.0f} "
                  f"MiB", flush=True)
            builds = state.setdefault("bm25_builds", {}).setdefault(str(n), {})
            for kind in [k for k in args.bm25_compare.split(",") if k]:
                if kind not in builds:
                    builds[kind] = _run_child(args, "bm25", n, "--bm25-build", kind)
                    state_path.write_text(json.dumps(state))
                    bb = builds[kind]
                    print(f"point {n}: BM25 build {kind}: {bb['seconds']:.0f} s, peak RSS "
                          f"{(bb['peak_rss'] - bb['rss_before']) / 2**20:.0f} MiB above the opened client "
                          f"(anonymous {(bb['peak_anon'] - bb['anon_before']) / 2**20:.0f} MiB)", flush=True)
            q = _run_child(args, "query", n)
            print(f"point {n}: query p50 dense {q['dense']['p50_ms']:.1f} ms, bm25 {q['bm25']['p50_ms']:.1f} ms, "
                  f"hybrid {q['hybrid']['p50_ms']:.1f} ms", flush=True)
            state["points"][str(n)] = {"n": n, "start_n": start_n, "ingest": ing, "query": q, "disk": disk(out)}
            state_path.write_text(json.dumps(state))
            shutil.rmtree(out / f"source-{n}", ignore_errors=True)
    report(state, args.project)


if __name__ == "__main__":
    main()
