"""Golden test: with the CPU server (llama.cpp via xllamacpp, SmolLM2-135M-Instruct Q4_1) at temperature 0, fixed
records give fixed text, end to end through the real pipeline (retrieval, context assembly, prompt templates,
LLM client, Parquet row). A change to prompts, context assembly or the client changes the text and fails here.

xllamacpp's wheel is an AVX2 build with no run-time CPU dispatch, so the numbers, and the greedy text, are the same
on every x86-64 machine with AVX2. The run is a plain `run --deterministic` with its own managed server and its
records in flight together, as any run: the mode (one slot, no prompt-cache reuse, seeded requests) makes each
reply depend on its request alone, whatever the order and overlap of the requests.

To re-record after an intended change: ``RAG_PIPELINE_RECORD_GOLDEN=1 pytest tests/test_golden.py`` and review the
diff of tests/golden/run_rows.json like any other change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fixtures.llm import free_port_block, requires_llama
from tests.runtools import (
    read_rows,
    run_args,
    start_run,
    store_args,
    wait_no_survivors,
    write_config,
    write_records,
)

pytestmark = [requires_llama, pytest.mark.slow]

GOLDEN = Path(__file__).parent / "golden" / "run_rows.json"
FIELDS = ("id", "rag_status", "rag_answer", "gen_status", "generation")


def test_fixed_records_give_fixed_text(tmp_path, example_store):
    records = write_records(tmp_path, 4)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"rag": {"max_tokens": 24}, "generation": {"max_tokens": 24, "num_processes": 2},
                                  "servers": {"base_port": free_port_block(1), "n_threads": 1}})
    proc, marker = start_run(run_args(records, out, cfg, "--deterministic", *store_args(example_store)))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    rows = sorted(({k: r[k] for k in FIELDS} for r in read_rows(out)), key=lambda r: r["id"])
    assert all(r["rag_status"] == "ok" and r["gen_status"] == "ok" and r["generation"] for r in rows), rows
    if os.environ.get("RAG_PIPELINE_RECORD_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    assert rows == json.loads(GOLDEN.read_text()), "generated text changed (see the module docstring to re-record)"
    assert wait_no_survivors(marker) == []
