"""The README's classification recipe end to end on the real CPU llama.cpp server (SmolLM2): `run
--response-format configs/schemas/label.json`, named from a directory without configs/ (the bundled copy), at the
default generation.max_tokens (64) that the schema's reason cap is sized for, gives every row one label in
generation_json; `eval-answers --labels yes,no,maybe` reads it there: no ambiguous and no unparsed row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.llm.structured import load_schema
from tests.fixtures.llm import requires_llama
from tests.runtools import read_rows, run_args, store_args, write_config, write_records

pytestmark = [requires_llama, pytest.mark.slow]

LABELS = ["yes", "no", "maybe"]


def test_label_schema_recipe_gives_one_parseable_label_per_row(tmp_path, example_store, llama_endpoints):
    claims = [json.loads(x) for x in write_records(tmp_path, 4).read_text().splitlines()]
    records = tmp_path / "questions.jsonl"
    records.write_text("".join(json.dumps({"id": c["id"], "query": f"Is the following claim true according to the "
                                           f"evidence? Answer yes, no or maybe.\nClaim: {c['query']}"}) + "\n"
                               for c in claims), encoding="utf-8")
    refs = tmp_path / "refs.jsonl"  # any labels: the recipe is about parseable answers, not SmolLM2's accuracy
    refs.write_text("".join(json.dumps({"id": c["id"], "label": LABELS[i % 3]}) + "\n" for i, c in enumerate(claims)),
                    encoding="utf-8")
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"generation": {"max_tokens": 64}})
    work = tmp_path / "elsewhere"  # no configs/ here: the name resolves to the bundled schema
    work.mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--no-progress",
         *run_args(records, out, cfg, "--endpoints", ",".join(llama_endpoints),
                   "--response-format", "configs/schemas/label.json", *store_args(example_store))],
        cwd=work, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert list(work.iterdir()) == []
    schema = load_schema("configs/schemas/label.json")
    rows = read_rows(out)
    assert len(rows) == 4
    for r in rows:
        assert r["gen_status"] == "ok" and r["gen_finish_reason"] == "stop", r
        value = json.loads(r["generation_json"])
        jsonschema.validate(value, schema)
        assert value["label"] in LABELS

    js = tmp_path / "r.json"
    ev = CliRunner().invoke(main, ["eval-answers", str(out), "--references", str(refs), "--labels", ",".join(LABELS),
                                   "--json", str(js)])
    assert ev.exit_code == 0, ev.output
    o = json.loads(js.read_text(encoding="utf-8"))["overall"]
    assert o["label_records"] == 4 and o["unparsed_labels"] == 0 and o["ambiguous_labels"] == 0
    assert sum(o["predicted_labels"][lab] for lab in LABELS) == 4
