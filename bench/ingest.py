"""Ingest throughput vs the physical limit: chunks/s of the full `ingest` path vs bare SentenceTransformer.encode.

Same chunks, same process, same loaded model: the bare baseline encodes exactly the chunks the ingest writes
(one encode call, normalised, same batch size); the full path is `workers.ingest.ingest_source` into a fresh
temporary Chroma store (read + validate, chunk, hash, embed, upsert). Runs alternate (bare, full, full, bare,
...) to cancel drift; the median of each is reported. Goal: ratio >= 0.90.

Usage: python bench/ingest.py [--source data/example/corpus.jsonl] [--chunk-chars 1000] [--chunk-overlap 200]
                              [--repeats 2] [--batch-size 64]
Default: the 400 example abstracts -> ~700 chunks, ~2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(REPO / "data" / "example" / "corpus.jsonl"))
    ap.add_argument("--chunk-chars", type=int, default=1000)
    ap.add_argument("--chunk-overlap", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

    from pipeline.config import EmbeddingConfig, IngestConfig, StoreConfig
    from workers.chunking import chunk_text
    from workers.embedding import load_embedder, resolve_device
    from workers.ingest import ingest_source
    from workers.sources import read_source

    ingest_cfg = IngestConfig(chunk_chars=args.chunk_chars, chunk_overlap=args.chunk_overlap)
    embed_cfg = EmbeddingConfig(device=args.device, batch_size=args.batch_size)
    model = load_embedder(args.device)
    docs = read_source(args.source).documents
    chunks = [c for d in docs for c in chunk_text(d.text, args.chunk_chars, args.chunk_overlap)]
    model.encode(chunks[:64], batch_size=args.batch_size)  # warm-up (allocations, thread pools)
    print(f"source {args.source}: {len(docs)} documents -> {len(chunks)} chunks "
          f"(chunk_chars {args.chunk_chars}, overlap {args.chunk_overlap}); device {resolve_device(args.device)}, "
          f"torch threads {__import__('torch').get_num_threads()}, batch {args.batch_size}")

    def bare() -> float:
        t0 = time.perf_counter()
        model.encode(chunks, batch_size=args.batch_size, convert_to_numpy=True, normalize_embeddings=True,
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


if __name__ == "__main__":
    main()
