"""Staging a store on a node (pipeline/store/staging.py): the time to copy it vs a bare copy of the same files,
and the time a second task of the node takes to find and check the copy.

A store of ``--chunks`` random float32 [n, 384] chunks (cosine, written straight to Chroma in a child process) is
staged into a fresh directory (``stage``: read the version under the lock, check free space, copy, check the copy)
and copied with ``shutil.copytree`` alone (``bare``), in alternating order with a ``sync`` after each copy,
``--repeats`` times; the medians and their ratio
(bare / stage, goal >= 0.80: the version and the checks cost little beside the copy) are printed, then the median
time of staging again into a directory that already holds the copy (``found``: version + check, no copy).

Usage: python bench/staging.py [--chunks 50000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_WRITE = """
import sys, numpy as np, chromadb
from chromadb.config import Settings
c = chromadb.PersistentClient(sys.argv[1], settings=Settings(anonymized_telemetry=False))
col = c.get_or_create_collection("bench", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None)
n, rng = int(sys.argv[2]), np.random.default_rng(0)
for lo in range(0, n, 5000):
    hi = min(n, lo + 5000)
    col.add(ids=[f"d{i}#0" for i in range(lo, hi)], embeddings=rng.random((hi - lo, 384), dtype=np.float32),
            documents=["x" * 200] * (hi - lo))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from pipeline.config import Config
    from pipeline.store.staging import stage_store

    with tempfile.TemporaryDirectory(prefix="bench-staging-") as tmp:
        root = Path(tmp)
        store = root / "shared" / "store"
        subprocess.run([sys.executable, "-c", _WRITE, str(store), str(args.chunks)], check=True)
        cfg = dataclasses.replace(Config().store, path=str(store), collection="bench")
        size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        stage_s, bare_s, found_s = [], [], []
        for i in range(args.repeats):
            def bare_copy(i: int = i) -> None:
                t = time.perf_counter()
                shutil.copytree(store, root / f"bare{i}", copy_function=shutil.copy2)
                bare_s.append(time.perf_counter() - t)

            def staged_copy(i: int = i) -> None:
                t = time.perf_counter()
                with stage_store(cfg, root / f"local{i}") as staged:
                    assert staged.copied
                stage_s.append(time.perf_counter() - t)

            for step in ((bare_copy, staged_copy) if i % 2 == 0 else (staged_copy, bare_copy)):
                step()
                subprocess.run(["sync"], check=True)  # each copy starts with no dirty pages of the other
            t = time.perf_counter()
            with stage_store(cfg, root / f"local{i}") as again:
                assert not again.copied
            found_s.append(time.perf_counter() - t)
            shutil.rmtree(root / f"bare{i}")
            shutil.rmtree(root / f"local{i}")
        stage, bare, found = (statistics.median(x) for x in (stage_s, bare_s, found_s))
        print(f"store: {args.chunks} chunks, {size / 2**20:.1f} MiB")
        print(f"stage (copy + checks): {stage:.3f} s ({size / 2**20 / stage:.0f} MiB/s); bare copytree: {bare:.3f} s; "
              f"ratio bare/stage {bare / stage:.2f} (goal >= 0.80)")
        print(f"found on the node (version + check, no copy): {found:.3f} s")


if __name__ == "__main__":
    main()
