"""Ingest and corpus-scale benchmarks. Parts (``--parts``, default all):

``throughput``: chunks/s of the full `ingest` path vs bare SentenceTransformer.encode on the same chunks.
    Same chunks, same process, same loaded model: the bare baseline encodes exactly the chunks the ingest
    writes (one encode call, normalised, same batch size); the full path is `pipeline.corpus.ingest.ingest_source` into
    a fresh temporary Chroma store (read + validate, chunk, hash, embed, upsert). Runs alternate (bare, full,
    full, bare, ...) to cancel drift; the median of each is reported. Goal: ratio >= 0.90.
``rss``: (a) peak RSS of a whole `rag-pipeline ingest` (fresh process, default settings, real model) of a
    synthetic corpus 1x, 3x, 10x the size of SciFact (``--sizes``; SciFact: 5,183 documents, ~8 MB), printed
    against corpus size with the time of the validation pass vs the write pass and chunks/s. Goal: flat (peak
    RSS of the largest size within a fixed bound of the smallest's), not linear.
``workers``: (b) RSS of one RAG-worker-like process (client opened, first query, 32-query batches of depth
    100) against collection size (``--collection-sizes``; random float32 [n, 384] written straight to Chroma),
    local PersistentClient vs the node's shared Chroma server (client RSS + the server's RSS), and queries/s
    of both (the HTTP hop's cost).
``resume``: (c) an ingest killed with SIGKILL mid-way, then run again: chunks re-embedded by the second run
    vs the chunks that had no finished ledger row (goal: only the unfinished write batch).

Usage: python bench/ingest.py [--parts throughput,rss,workers,resume] [--sizes 1,3,10]
                              [--collection-sizes 10000,50000,200000,500000] [--source data/example/corpus.jsonl]
Default sizes take hours on 2 CPU cores (10x SciFact is ~114k chunks at ~25 chunks/s): there, pass
``--doc-chars 200`` (10x = 51,830 one-chunk documents: the document count, the ledger and the collection grow
10x, the embedding costs ~1/5) or smaller ``--sizes`` (fractions allowed, e.g. 0.1,0.3,1).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# --- (b) RSS per RAG-worker-like process vs collection size: local client vs the node's shared server ----------
SHARED_ROOT = Path(tempfile.gettempdir()) / f"rag-bench-collections-{os.getuid()}"


def _rss_mb(pid: int | None = None) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB, from /proc."""
    vals = {}
    with open(f"/proc/{pid or 'self'}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kb, _ = line.split()
                vals[key[:-1]] = int(kb) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def _tree_rss_mb(pid: int) -> float:
    """RSS of a process and its descendants, MiB (the Chroma server runs as one process, but be safe)."""
    import psutil

    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


def synthetic_collection(n: int, root: Path = SHARED_ROOT) -> Path:
    """A Chroma store with one collection "bench" of ``n`` random unit float32 [n, 384] embeddings (cosine
    space, the project's collection configuration), written straight to Chroma: no model. Reused when present."""
    store = root / f"n{n}"
    marker = store / ".bench-complete"
    if marker.exists():
        return store
    import shutil

    import numpy as np

    from pipeline.config import StoreConfig
    from pipeline.store.client import get_collection, open_client

    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()
    client = open_client(StoreConfig(path=str(store), collection="bench"))
    col = get_collection(client, "bench")
    rng = np.random.default_rng(n)
    step = 5000
    for lo in range(0, n, step):
        m = min(step, n - lo)
        emb = rng.standard_normal((m, 384), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        ids = [f"d{i}#0" for i in range(lo, lo + m)]
        col.add(ids=ids, embeddings=emb, documents=[f"synthetic chunk {i} " + "x" * 200 for i in range(lo, lo + m)],
                metadatas=[{"doc_id": f"d{i}", "chunk_index": 0, "n_chunks": 1} for i in range(lo, lo + m)])
    del client
    marker.write_text(str(n))
    print(f"  built synthetic collection of {n} chunks in {time.perf_counter() - t0:.0f} s ({store})", flush=True)
    return store


def probe_main(args: argparse.Namespace) -> None:
    """One RAG-worker-like process: open the client (local store or URL), run the queries, print JSON."""
    import numpy as np

    from pipeline.config import StoreConfig
    from pipeline.store.client import get_collection, open_client

    base = _rss_mb()[0]
    cfg = StoreConfig(path=args.probe_store or "", collection="bench", chroma_url=args.probe_url or "")
    col = get_collection(open_client(cfg, create=False), "bench", create=False)
    opened = _rss_mb()[0]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((args.probe_queries, 384), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    col.query(query_embeddings=q[:1], n_results=100, include=["documents", "metadatas", "distances"])
    first = _rss_mb()[0]
    t0 = time.perf_counter()
    for lo in range(0, len(q), 32):  # micro-batches of retrieval.query_batch_size, depth 100 (hybrid fusion)
        col.query(query_embeddings=q[lo:lo + 32], n_results=100, include=["documents", "metadatas", "distances"])
    qps = len(q) / (time.perf_counter() - t0)
    rss, hwm = _rss_mb()
    print(json.dumps({"base_mb": base, "opened_mb": opened, "first_query_mb": first, "rss_mb": rss,
                      "hwm_mb": hwm, "qps": qps}))


def _probe(extra: list[str], queries: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--probe-queries", str(queries), *extra], check=True,
                         capture_output=True, text=True, env={**os.environ, "ANONYMIZED_TELEMETRY": "False"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_workers(args: argparse.Namespace) -> None:
    from pipeline.store.server import StoreServer

    sizes = [int(float(s)) for s in args.collection_sizes.split(",")]
    print(f"\n(b) RSS of one RAG-worker-like process vs collection size (random unit float32 [n, 384], cosine; "
          f"client opened, then {args.queries} queries in batches of 32, 100 results each)")
    rows = []
    for n in sizes:
        store = synthetic_collection(n)
        local = _probe(["--probe-store", str(store)], args.queries)
        srv = StoreServer(store, log_path=Path(tempfile.gettempdir()) / f"bench-chroma-{os.getuid()}.log")
        srv.start()
        try:
            server_idle = _tree_rss_mb(srv.proc.pid)
            http = _probe(["--probe-url", srv.url], args.queries)
            server = _tree_rss_mb(srv.proc.pid)
        finally:
            srv.stop()
        rows.append((n, local, http, server_idle, server))
        print(f"  n={n:>8}: local client RSS {local['rss_mb']:7.1f} MiB (bare process {local['base_mb']:.1f}, index+client "
              f"{local['rss_mb'] - local['base_mb']:7.1f}); HTTP client RSS {http['rss_mb']:6.1f} MiB; server RSS "
              f"{server:7.1f} MiB (idle {server_idle:.1f}); queries/s local {local['qps']:7.1f} vs shared "
              f"{http['qps']:7.1f} (ratio {http['qps'] / local['qps']:.2f})", flush=True)
    print("\n  n        local/worker  http/worker  server   per-chunk(local, KiB)  qps local  qps shared")
    for n, local, http, _idle, server in rows:
        per = (local["rss_mb"] - local["base_mb"]) * 1024 / n
        print(f"  {n:<8} {local['rss_mb']:10.1f}  {http['rss_mb']:10.1f}  {server:8.1f}  {per:10.2f}"
              f"            {local['qps']:8.1f}  {http['qps']:8.1f}")
    if len(rows) >= 2:
        (n0, l0, *_), (n1, l1, *_) = rows[0], rows[-1]
        slope = (l1["rss_mb"] - l0["rss_mb"]) / (n1 - n0)
        print(f"  local RSS slope: {slope * 1024:.2f} KiB per chunk ({slope * 1e6 / 1024:.0f} GiB per million chunks); "
              f"8 RAG workers duplicate 7 x that")


# --- (a) peak RSS of an ingest vs corpus size ---------------------------------------------------------------
SCIFACT_DOCS = 5183


def synthetic_corpus(scifact: Path, factor: float, out: Path, doc_chars: int = 0) -> tuple[Path, int, int]:
    """``factor`` x SciFact's document count as one JSONL: SciFact's documents repeated (copy k gets ids
    ``k-<_id>`` and its copy number in the title, so texts and hashes differ), each text cut to its first
    ``doc_chars`` characters when > 0 (one chunk per document: the embedding, which is not what this measures,
    then costs ~1/5 on CPU). Returns (path, documents, bytes)."""
    import gzip

    n = max(1, round(SCIFACT_DOCS * factor))
    path = out / (f"scifact-x{factor:g}" + (f"-c{doc_chars}" if doc_chars else "") + ".jsonl")
    if path.exists():
        return path, n, path.stat().st_size
    with gzip.open(scifact, "rt", encoding="utf-8") as fh:
        base = [json.loads(line) for line in fh if line.strip()]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i in range(n):
            d = base[i % len(base)]
            k = i // len(base)
            text = d["text"][:doc_chars] if doc_chars else d["text"]
            fh.write(json.dumps({"_id": f"{k}-{d['_id']}", "title": f"{d.get('title', '')} ({k})",
                                 "text": text}) + "\n")
    tmp.rename(path)
    return path, n, path.stat().st_size


class _Sampler:
    """RSS of one process every 0.1 s (a thread), with a time stamp per sample."""

    def __init__(self, pid: int) -> None:
        import threading

        import psutil

        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.proc.memory_info().rss / 2**20))
            except psutil.Error:
                return
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)

    def peak(self, until: float | None = None) -> float:
        return max((r for t, r in self.samples if until is None or t <= until), default=0.0)


_READ_SNIPPET = """
import sys, time, tempfile, pathlib
from pipeline.corpus.sources import iter_source, read_source, SqliteSeenIds
t0 = time.perf_counter()
if sys.argv[2] == "stream":
    with tempfile.TemporaryDirectory() as tmp:
        seen = SqliteSeenIds.temporary(pathlib.Path(tmp) / "seen.sqlite")
        n = sum(1 for _ in iter_source(sys.argv[1], seen=seen))
else:
    n = len(read_source(sys.argv[1]).documents)
dt = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(n, dt, int(hwm) / 1024)
"""


def _read_pass(path: Path, how: str) -> tuple[int, float, float]:
    out = subprocess.run([sys.executable, "-c", _READ_SNIPPET, str(path), how], check=True, cwd=REPO,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


def part_rss(args: argparse.Namespace) -> None:
    import threading

    from pipeline.config import IngestConfig

    sizes = [float(s) for s in args.sizes.split(",")]
    ingest_sizes = [float(s) for s in (args.ingest_sizes or args.sizes).split(",")]
    work = Path(tempfile.gettempdir()) / f"rag-bench-corpus-{os.getuid()}"
    work.mkdir(parents=True, exist_ok=True)
    print(f"\n(a) ingest of a synthetic corpus k x SciFact ({args.scifact}); default settings "
          f"(chunk_chars {IngestConfig().chunk_chars}, write batch 8 x encode batch), real model, 2 CPU cores")
    rows = []
    for k in sizes:
        path, n_docs, n_bytes = synthetic_corpus(Path(args.scifact), k, work, args.doc_chars)
        n, stream_s, stream_mb = _read_pass(path, "stream")
        _, _hold_s, hold_mb = _read_pass(path, "hold")
        row = {"k": k, "docs": n_docs, "mb": n_bytes / 2**20, "validate_s": stream_s, "validate_rss": stream_mb,
               "hold_rss": hold_mb}
        print(f"  {k:g}x: {n_docs} documents, {n_bytes / 2**20:.1f} MB; validation pass (streamed, SQLite "
              f"duplicate check) {stream_s:.2f} s, peak RSS {stream_mb:.0f} MiB; holding it in memory "
              f"(read_source, the old ingest's first step) peak RSS {hold_mb:.0f} MiB", flush=True)
        if k in ingest_sizes:
            with tempfile.TemporaryDirectory(prefix="bench-ingest-rss-") as tmp:
                cmd = [str(Path(sys.executable).with_name("rag-pipeline")), "-v", "ingest", str(path), "--store",
                       f"{tmp}/store", "--collection", "rss", "--no-progress"]
                t0 = time.monotonic()
                proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                sampler = _Sampler(proc.pid)
                marks: dict[str, float] = {}

                def read_err(stream=proc.stderr, marks=marks) -> None:
                    for line in stream:
                        if "rebuilding the BM25 index" in line:
                            marks["bm25"] = time.monotonic()
                        elif "validated" in line and "documents of" in line:
                            marks["validated"] = time.monotonic()

                reader = threading.Thread(target=read_err, daemon=True)
                reader.start()
                out, _ = proc.communicate()
                reader.join(timeout=5)
                sampler.stop()
                wall = time.monotonic() - t0
                assert proc.returncode == 0, f"ingest failed ({proc.returncode})"
                summary = out.strip().splitlines()[-1]
                chunks = int(summary.split("chunks added ")[1].split(",")[0])
                bm25_s = float(summary.split("BM25 index rebuilt in ")[1].split(" s")[0]) if "BM25" in summary else 0
                write_peak = sampler.peak(marks.get("bm25"))
                total_peak = sampler.peak()
                row.update(chunks=chunks, write_rss=write_peak, total_rss=total_peak, wall=wall, bm25_s=bm25_s,
                           cps=chunks / wall)
                print(f"      ingest: {chunks} chunks in {wall:.0f} s ({chunks / wall:.1f} chunks/s incl. model load "
                      f"and BM25 {bm25_s:.1f} s); peak RSS through the write pass {write_peak:.0f} MiB, "
                      f"with the BM25 rebuild {total_peak:.0f} MiB", flush=True)
        rows.append(row)
    print("\n  size   docs     MB    validate s  validate RSS  held RSS  | chunks  write-pass RSS  +BM25 RSS  chunks/s")
    for r in rows:
        extra = (f"| {r['chunks']:6d}  {r['write_rss']:12.0f}  {r['total_rss']:9.0f}  {r['cps']:8.1f}"
                 if "chunks" in r else "| (not ingested: --ingest-sizes)")
        print(f"  {r['k']:<5g} {r['docs']:6d}  {r['mb']:5.1f}  {r['validate_s']:10.1f}  {r['validate_rss']:12.0f}  "
              f"{r['hold_rss']:8.0f}  {extra}")
    ing = [r for r in rows if "chunks" in r]
    if len(ing) >= 2:
        a, b = ing[0], ing[-1]
        print(f"  write-pass peak RSS {b['k']:g}x / {a['k']:g}x: {b['write_rss'] / a['write_rss']:.2f} for "
              f"{b['docs'] / a['docs']:.1f}x the documents (goal: flat, within +100 MiB: "
              f"{b['write_rss'] - a['write_rss']:+.0f} MiB)")
        per = (b["total_rss"] - b["write_rss"]) * 1024 / b["chunks"]
        print(f"  BM25 rebuild (in-memory bm25s build, inherent): ~{per:.1f} KiB per chunk above the write pass")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(f"  validation pass peak RSS {b['k']:g}x / {a['k']:g}x: {b['validate_rss'] / a['validate_rss']:.2f}; "
              f"held corpus {b['hold_rss'] / a['hold_rss']:.2f}")


# --- (c) resume after SIGKILL ---------------------------------------------------------------------------------
_KILLED = """
import sys
from pipeline.config import EmbeddingConfig, IngestConfig, StoreConfig
from pipeline.corpus.ingest import ingest_source
ingest_source(sys.argv[1], StoreConfig(path=sys.argv[2], collection="resume"), IngestConfig(), EmbeddingConfig(),
              progress=False)
"""


def part_resume(args: argparse.Namespace) -> None:
    import sqlite3

    from pipeline.config import EmbeddingConfig, IngestConfig, StoreConfig
    from pipeline.corpus.ingest import ingest_source
    from pipeline.retrieval.embedding import (
        load_embedder,
        resolve_batch_size,
        resolve_device,
        resolve_write_batch,
    )

    work = Path(tempfile.gettempdir()) / f"rag-bench-corpus-{os.getuid()}"
    work.mkdir(parents=True, exist_ok=True)
    path, n_docs, _ = synthetic_corpus(Path(args.scifact), args.resume_docs / SCIFACT_DOCS, work)
    device = resolve_device("auto")
    write_batch = resolve_write_batch(0, resolve_batch_size(0, device))
    print(f"\n(c) resume: {n_docs} documents, default settings (write batch {write_batch} chunks on {device}); "
          "SIGKILL once 2 write batches are finished, then run again")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-resume-") as tmp:
        ledger = Path(tmp) / "store" / "ingest" / "resume.sqlite"
        proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(path), f"{tmp}/store"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def finished() -> tuple[int, int]:
            try:
                with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=1) as con:
                    docs, chunks = con.execute(
                        "SELECT COUNT(*), COALESCE(SUM(n_chunks), 0) FROM docs WHERE doc_hash != ''").fetchone()
                    return docs, chunks
            except sqlite3.Error:
                return 0, 0

        while finished()[1] < 2 * write_batch:
            if proc.poll() is not None:
                print("  the ingest finished before it could be killed: use more --resume-docs")
                return
            time.sleep(0.05)
        time.sleep(float(args.kill_delay_s))  # mid-way through the next batch
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        docs_done, chunks_done = finished()
        model = load_embedder("auto")
        embedded = [0]
        real_encode = model.encode

        def counting(texts, **kw):
            embedded[0] += len(texts)
            return real_encode(texts, **kw)

        model.encode = counting
        s = ingest_source(path, StoreConfig(path=f"{tmp}/store", collection="resume"), IngestConfig(),
                          EmbeddingConfig(), embedder=model, progress=False)
    total = s.chunks_total
    print(f"  killed with {docs_done} documents / {chunks_done} chunks finished (of {total} chunks)")
    print(f"  resumed: {s.docs_unchanged} documents unchanged (not re-embedded), {embedded[0]} chunks embedded = "
          f"total - finished ({total - chunks_done}): {'OK' if embedded[0] == total - chunks_done else 'MISMATCH'}; "
          f"work redone = at most the batch in flight at the kill (<= {write_batch} chunks)")


def part_throughput(args: argparse.Namespace) -> None:
    from pipeline.config import EmbeddingConfig, IngestConfig, StoreConfig
    from pipeline.corpus.chunking import chunk_text
    from pipeline.corpus.ingest import ingest_source
    from pipeline.corpus.sources import iter_source
    from pipeline.retrieval.embedding import load_embedder, resolve_batch_size, resolve_device

    ingest_cfg = IngestConfig(chunk_chars=args.chunk_chars, chunk_overlap=args.chunk_overlap)
    embed_cfg = EmbeddingConfig(device=args.device, batch_size=args.batch_size)
    device = resolve_device(args.device)
    batch = resolve_batch_size(args.batch_size, device)
    model = load_embedder(args.device)
    docs = list(iter_source(args.source))
    chunks = [c for d in docs for c in chunk_text(d.text, args.chunk_chars, args.chunk_overlap)]
    model.encode(chunks[:64], batch_size=batch)  # warm-up (allocations, thread pools)
    print(f"(throughput) source {args.source}: {len(docs)} documents -> {len(chunks)} chunks "
          f"(chunk_chars {args.chunk_chars}, overlap {args.chunk_overlap}); device {device}, "
          f"torch threads {__import__('torch').get_num_threads()}, batch {batch}")

    def bare() -> float:
        t0 = time.perf_counter()
        model.encode(chunks, batch_size=batch, convert_to_numpy=True, normalize_embeddings=True,
                     show_progress_bar=False)
        return len(chunks) / (time.perf_counter() - t0)

    def full() -> float:
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
            store = StoreConfig(path=tmp, collection="bench")
            s = ingest_source(args.source, store, ingest_cfg, embed_cfg, embedder=model, progress=False)
            assert s.chunks_written == len(chunks) == s.chunks_total, (s.chunks_written, len(chunks))
            return s.chunks_per_s

    bare_runs: list[float] = []
    full_runs: list[float] = []
    for i in range(args.repeats):
        order = [(bare, bare_runs), (full, full_runs)]
        for fn, runs in order if i % 2 == 0 else reversed(order):
            runs.append(fn())
            print(f"  run {i + 1}: {fn.__name__:<4} {runs[-1]:7.2f} chunks/s")
    b, f = statistics.median(bare_runs), statistics.median(full_runs)
    print(f"bare SentenceTransformer.encode: {b:.2f} chunks/s (median of {len(bare_runs)})")
    print(f"full ingest path:                {f:.2f} chunks/s (median of {len(full_runs)})")
    print(f"ratio full/bare: {f / b:.3f} (goal >= 0.90)")


PARTS = ("throughput", "rss", "workers", "resume")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--source", default=str(REPO / "data" / "example" / "corpus.jsonl"))
    ap.add_argument("--chunk-chars", type=int, default=1000)
    ap.add_argument("--chunk-overlap", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=0, help="embedding batch (0 = the device's default)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sizes", default="1,3,10", help="(rss) corpus sizes in multiples of SciFact")
    ap.add_argument("--doc-chars", type=int, default=0,
                    help="(rss) cut each synthetic document to N characters (one chunk each; 0 = whole)")
    scifact = [p / "shared" / "data" / "scifact" / "corpus.jsonl.gz" for p in (REPO.parent, REPO.parent.parent)]
    ap.add_argument("--scifact", default=str(next((p for p in scifact if p.exists()), scifact[0])),
                    help="SciFact corpus.jsonl.gz (default: ../shared/data/scifact, beside the checkout)")
    ap.add_argument("--collection-sizes", default="10000,50000,200000,500000", help="(workers) chunks")
    ap.add_argument("--queries", type=int, default=320, help="(workers) queries per probe")
    ap.add_argument("--ingest-sizes", default="", help="(rss) sizes also ingested (default: all --sizes)")
    ap.add_argument("--resume-docs", type=int, default=2000, help="(resume) documents of the killed ingest")
    ap.add_argument("--kill-delay-s", type=float, default=5.0, help="(resume) seconds after batch 2 to SIGKILL")
    ap.add_argument("--probe-store", help=argparse.SUPPRESS)
    ap.add_argument("--probe-url", help=argparse.SUPPRESS)
    ap.add_argument("--probe-queries", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    if args.probe_store or args.probe_url:
        probe_main(args)
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts: {', '.join(sorted(unknown))}")
    for part in parts:
        globals()[f"part_{part}"](args)


if __name__ == "__main__":
    main()
