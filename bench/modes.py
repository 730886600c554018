"""What each ``rag.mode`` costs per record: LLM calls, prompt and completion tokens per stage, wall time.

Runs `rag-pipeline run` on the bundled example (`make run`'s command line: ``--store --collection example
--ingest data/example/corpus.jsonl``) once per ``rag.mode`` value with the CPU default (a managed llama.cpp
SmolLM2 server), then prints one table from the output rows (the per-stage token columns the server reported):

    mode | records | LLM calls/record | RAG prompt / completion tokens | generation prompt / completion tokens |
    tokens/record | wall s | records/s | generations identical to the RAG answer

An LLM call is a stage whose row has a token count (the server answered it). "Identical" counts generations
byte-identical to the record's RAG answer (after stripping whitespace): a second call that repeats the first.

Last, the cost of sizing the context (one ``/tokenize`` request per prompt that may not fit,
:mod:`pipeline.llm.context`): the retrieve+answer run's passages are sized again against a fresh CPU server,
record by record, and the time per record is printed beside the RAG answer's request time of the same rows.

Usage: python bench/modes.py [--limit 40] [--store DIR] [--out DIR]
Default: all 40 example records, ~2-4 min per mode on 2 idle cores (the first run also ingests the example,
~1-2 min).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_mode(mode: str, store: Path, out: Path, limit: int) -> float:
    """Run the example with ``--rag-mode mode`` into ``out`` (fresh); returns the wall time in seconds."""
    cmd = [sys.executable, "-m", "pipeline", "run", "--input", "data/example/records.jsonl", "--output", str(out),
           "--store", str(store), "--collection", "example", "--ingest", "data/example/corpus.jsonl",
           "--rag-mode", mode, "--limit", str(limit), "--overwrite", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def per_record(rows: list[dict], column: str) -> float:
    """Mean of ``column`` over ``rows`` (a missing count is 0)."""
    return sum(r[column] or 0 for r in rows) / len(rows) if rows else 0.0


def table(results: dict[str, tuple[list[dict], float]]) -> str:
    """The cost table (module docstring) as fixed-width text."""
    head = (f"{'rag.mode':<17}{'records':>8}{'calls/rec':>10}{'rag prompt':>11}{'rag compl':>10}{'gen prompt':>11}"
            f"{'gen compl':>10}{'tokens/rec':>11}{'wall s':>8}{'rec/s':>7}{'gen == rag':>11}")
    lines = [head]
    for mode, (rows, wall) in results.items():
        calls = sum((r["rag_prompt_tokens"] is not None) + (r["gen_prompt_tokens"] is not None) for r in rows)
        cols = ("rag_prompt_tokens", "rag_completion_tokens", "gen_prompt_tokens", "gen_completion_tokens")
        means = [per_record(rows, c) for c in cols]
        answered = [r for r in rows if r["rag_answer"] and r["generation"]]
        same = sum(r["generation"].strip() == r["rag_answer"].strip() for r in answered)
        lines.append(f"{mode:<17}{len(rows):>8}{calls / len(rows):>10.2f}{means[0]:>11.0f}{means[1]:>10.1f}"
                     f"{means[2]:>11.0f}{means[3]:>10.1f}{sum(means):>11.0f}{wall:>8.0f}{len(rows) / wall:>7.3f}"
                     f"{(f'{same}/{len(answered)}' if answered else '-'):>11}")
    return "\n".join(lines)


def sizing_cost(rows: list[dict]) -> str:
    """Time :meth:`pipeline.llm.context.ContextSizer.for_rag_answer` per record against a fresh CPU server."""
    from pipeline.config import load_config
    from pipeline.llm.context import ContextSizer
    from pipeline.llm.prompts import load_templates
    from pipeline.llm.server_tokens import ServerTokens
    from pipeline.servers.llamacpp import default_llamacpp_model

    cfg = load_config()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "pipeline.servers.cpu_server", "--model", default_llamacpp_model(),
                               "--port", str(port), "--n_ctx", str(cfg.servers.n_ctx), "--n_parallel", "4"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        sizer = ContextSizer(cfg, load_templates(cfg), ServerTokens(cfg.rag.context_window_tokens))
        sizer.tokens.endpoint(url)  # the once-per-endpoint probe, not a per-record cost
        ms = []
        for r in rows:
            t0 = time.perf_counter()
            sizer.for_rag_answer(url, query=r["query"], contexts=r["contexts"])
            ms.append((time.perf_counter() - t0) * 1000)
    finally:
        server.terminate()
        server.wait(timeout=10)
    rag_ms = [r["rag_llm_ms"] for r in rows if r["rag_llm_ms"]]
    p50 = statistics.median(ms)
    return (f"context sizing (one /tokenize per prompt, {len(ms)} records, a fresh server): p50 {p50:.1f} ms, "
            f"max {max(ms):.1f} ms per record; the RAG answer's request p50 {statistics.median(rag_ms):.0f} ms "
            f"in the run: sizing adds {100 * p50 / statistics.median(rag_ms):.2f}%")


def main() -> None:
    from pipeline.config import choices
    from pipeline.output import read_rows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=40, help="example records per mode (1-40)")
    ap.add_argument("--store", type=Path, default=Path(tempfile.gettempdir()) / f"rag-bench-modes-{os.getuid()}",
                    help="Chroma store the example is ingested into (reused)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / f"rag-bench-modes-out-{os.getuid()}",
                    help="output directories, one per mode")
    args = ap.parse_args()
    results: dict[str, tuple[list[dict], float]] = {}
    for mode in choices("rag.mode"):
        out = args.out / mode.replace("+", "_")
        print(f"running rag.mode = {mode} on {args.limit} example records ...", flush=True)
        wall = run_mode(mode, args.store, out, args.limit)
        results[mode] = (read_rows(out).to_pylist(), wall)
    print(table(results))
    print(sizing_cost(results["retrieve+answer"][0]))


if __name__ == "__main__":
    main()
