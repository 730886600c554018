"""Helpers for tests that run `rag-pipeline run` as a real subprocess (signals, crashes, orphans)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "data" / "example"

SMALL_CONFIG: dict[str, dict] = {
    "retrieval": {"top_k": 1},  # one whole abstract per prompt (the example store holds whole documents)
    "rag": {"max_tokens": 8},
    "generation": {"max_tokens": 8, "num_processes": 2},
    "llm": {"max_attempts": 2, "backoff_initial_s": 0.1, "backoff_max_s": 0.5, "breaker_failures": 2,
            "breaker_cooldown_s": 5.0, "read_timeout_s": 60.0},
    "run": {"part_rows": 1, "grace_s": 30.0},
}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def write_config(tmp_path: Path, overrides: dict[str, dict] | None = None) -> Path:
    """A small, fast test config (few tokens, one row per part) as TOML, with per-section overrides."""
    sections = {k: dict(v) for k, v in SMALL_CONFIG.items()}
    for sec, values in (overrides or {}).items():
        sections.setdefault(sec, {}).update(values)
    text = "".join(
        f"[{sec}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()) for sec, values in sections.items()
    )
    p = tmp_path / "test.toml"
    p.write_text(text)
    return p


def write_records(tmp_path: Path, n: int, name: str = "records.jsonl") -> Path:
    """The first n example records (real SciFact claims)."""
    lines = (EXAMPLE / "records.jsonl").read_text().splitlines()
    out = []
    i = 0
    while len(out) < n:
        rec = json.loads(lines[i % len(lines)])
        if i >= len(lines):
            rec["id"] = f"{rec['id']}-r{i // len(lines)}"
        out.append(json.dumps(rec))
        i += 1
    p = tmp_path / name
    p.write_text("\n".join(out) + "\n")
    return p


def run_args(records: Path, out: Path, cfg: Path, *extra: str) -> list[str]:
    """`run` arguments for an input, an output dir and a config file, plus ``extra``."""
    return ["--input", str(records), "--output", str(out), "--config", str(cfg), *extra]


def store_args(example_store) -> list[str]:
    """`--store/--collection` of the session's example store fixture."""
    return ["--store", str(example_store.store_cfg.path), "--collection", example_store.store_cfg.collection]


def unreached_store_args(tmp_path: Path) -> list[str]:
    """`--store/--collection/--ingest` for a run that must stop before any worker starts (bad input, identity,
    setting): a store and collection are named (a run needs them: no default), and the run would fill them with a
    one-document corpus if it ever got that far."""
    corpus = tmp_path / "one-doc-corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "d1", "title": "t", "text": "one document"}) + "\n")
    return ["--store", str(tmp_path / "unreached-store"), "--collection", "unreached", "--ingest", str(corpus)]


def start_run(args: list[str], marker: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start `python -m pipeline.cli run ARGS` with a unique environment marker to find its process tree later."""
    marker = marker or uuid.uuid4().hex
    env = {
        **os.environ,
        "RAG_PIPELINE_TEST_MARKER": marker,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--no-progress", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, marker


MARKER_ENV = "RAG_PIPELINE_TEST_MARKER"
"""Environment variable carrying a run's marker (inherited by everything the run starts)."""


def processes_with_marker(marker: str, exclude: str = "") -> list[psutil.Process]:
    """Live processes whose environment carries the marker (the run and everything it started), except those
    whose command line contains ``exclude`` (when given)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(MARKER_ENV) == marker and p.status() != psutil.STATUS_ZOMBIE \
                    and not (exclude and exclude in " ".join(p.cmdline())):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_no_survivors(marker: str, timeout_s: float = 15.0, exclude: str = "") -> list[psutil.Process]:
    """Wait up to ``timeout_s`` for the marked processes (see :func:`processes_with_marker`) to be gone; returns
    those still alive."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = processes_with_marker(marker, exclude)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def committed_parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet"))


def wait_for_parts(out: Path, n: int, proc: subprocess.Popen, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(committed_parts(out)) < n:
        if proc.poll() is not None:
            raise AssertionError(f"run exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("no committed part in time")
        time.sleep(0.1)


def read_ids(out: Path) -> list[str]:
    ids: list[str] = []
    for part in committed_parts(out):
        ids += pq.read_table(part, columns=["id"]).column("id").to_pylist()
    return ids


def read_rows(out: Path) -> list[dict]:
    rows: list[dict] = []
    for part in committed_parts(out):
        rows += pq.read_table(part).to_pylist()
    return rows


EARLIER = {"run.json": "_run.json", "manifest.json": "_manifest.json", "rejected.jsonl": "_rejected.jsonl",
           "state.json": "_state.json", "report.html": "_report.html", "logs": "_logs",
           "input_scan.json": "_input_scan.json", "slurm": "_slurm"}
"""The names an earlier version gave the bookkeeping at the top of a directory."""


def as_earlier_version(d: Path) -> None:
    """Rename ``d/.rag-pipeline/*`` to the earlier top-level names and drop the folder."""
    meta = d / ".rag-pipeline"
    for p in sorted(meta.iterdir()):
        os.rename(p, d / EARLIER[p.name])
    meta.rmdir()
