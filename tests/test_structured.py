"""Structured output (generation.response_format): schema checks, and the real CPU llama.cpp server (xllamacpp,
SmolLM2) asked for JSON by the OpenAI response_format json_schema field, through the generation code and
through a whole `rag-pipeline run` (which also runs the default hybrid retrieval end to end)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jsonschema
import pytest

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.llm.client import LLMClient
from pipeline.llm.structured import StructuredOutput, load_schema
from pipeline.messages import RagResult, WorkItem
from tests.fixtures.llm import dead_endpoint, requires_llama
from tests.runtools import (
    REPO,
    read_rows,
    run_args,
    start_run,
    store_args,
    unreached_store_args,
    write_config,
    write_records,
)
from workers.generation import generate_one

SCHEMA = {
    "title": "claim verdict",
    "type": "object",
    "properties": {"label": {"enum": ["supported", "refuted", "unknown"]}, "reason": {"type": "string", "maxLength": 60}},
    "required": ["label", "reason"],
    "additionalProperties": False,
}
TEMPLATES = {"context": "Claim: {query}\nEvidence: {context}\nVerdict as JSON:",
             "no_context": "Claim: {query}\nVerdict as JSON:"}


def _schema_file(tmp_path, schema=SCHEMA, name="schema.json"):
    p = tmp_path / name
    p.write_text(schema if isinstance(schema, str) else json.dumps(schema, indent=1), encoding="utf-8")
    return p


def test_schema_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.json: cannot read"):
        load_schema(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=r"bad.json:2: invalid JSON"):
        load_schema(_schema_file(tmp_path, '{\n "type": }', "bad.json"))
    with pytest.raises(ConfigError, match=r"arr.json: a JSON Schema must be a JSON object"):
        load_schema(_schema_file(tmp_path, "[1]", "arr.json"))
    with pytest.raises(ConfigError, match=r"inv.json: not a valid JSON Schema at type"):
        load_schema(_schema_file(tmp_path, {"type": "banana"}, "inv.json"))


def test_request_field_and_validation(tmp_path):
    so = StructuredOutput.from_file(_schema_file(tmp_path))
    rf = so.request_fields()["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "claim_verdict"
    assert rf["json_schema"]["schema"] == SCHEMA and rf["json_schema"]["strict"] is True
    assert so.parse('{"label": "refuted", "reason": "x"}') == ({"label": "refuted", "reason": "x"}, None)
    value, err = so.parse('{"label": "maybe", "reason": "x"}')
    assert value is None and err.startswith("schema violation at label")
    value, err = so.parse('{"label": "refuted"')
    assert value is None and err.startswith("not JSON")
    jsonschema.validate({"label": "unknown", "reason": ""}, SCHEMA)  # the fixture schema itself is sane


@requires_llama
def test_real_server_returns_schema_json_or_invalid_output_after_reask(tmp_path, llama_endpoints):
    so = StructuredOutput.from_file(_schema_file(tmp_path))
    cfg = Config()
    item = WorkItem("c1", "Aspirin reduces the risk of heart attacks.", rag=RagResult("c1", rag_status="soft_fail"))
    with LLMClient(llama_endpoints[:1], cfg.llm) as client:
        ok_cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, max_tokens=96))
        r = generate_one(client, ok_cfg, TEMPLATES, item, so)
        assert r.gen_status == "ok", r
        value = json.loads(r.generation_json)
        jsonschema.validate(value, SCHEMA)  # constrained decoding honoured the schema
        assert json.loads(r.generation) == value and r.attempts == 1

        # 6 tokens cannot hold the object: the reply is cut off, re-asked once, then recorded as invalid
        short = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, max_tokens=6,
                                                                        response_format_attempts=2))
        r = generate_one(client, short, TEMPLATES, item, so)
        assert r.gen_status == "invalid_output" and r.generation_json is None, r
        assert r.attempts == 2 and "after 2 request(s): not JSON" in r.gen_error
        assert r.generation.lstrip().startswith("{")
        # the row says why: cut off by max_tokens, the setting named; usage summed over both replies
        assert r.finish_reason == "length"
        assert "cut off at generation.max_tokens = 6: finish_reason length; raise it" in r.gen_error
        assert r.requests == 2 and r.completion_tokens == 12 and r.prompt_tokens > 0

        plain = generate_one(client, ok_cfg, TEMPLATES, item)  # no schema: text, no generation_json
        assert plain.gen_status == "ok" and plain.generation_json is None


@requires_llama
@pytest.mark.slow
def test_run_with_response_format_writes_generation_json(tmp_path, example_store, llama_endpoints):
    records = write_records(tmp_path, 4)
    out = tmp_path / "out"
    schema = _schema_file(tmp_path)
    cfg = write_config(tmp_path, {"generation": {"max_tokens": 96}})
    proc, _ = start_run(run_args(records, out, cfg, "--endpoints", ",".join(llama_endpoints), "--response-format",
                                 str(schema), "--retrieval-mode", "hybrid", *store_args(example_store)))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    rows = read_rows(out)
    assert len(rows) == 4
    for r in rows:
        assert r["gen_status"] == "ok", r
        jsonschema.validate(json.loads(r["generation_json"]), SCHEMA)
        assert r["rag_status"] == "ok" and r["contexts"]
        for c in r["contexts"]:  # hybrid: fused score = sum of 1 / (60 + rank) over the source rankings
            ranks = [x for x in (c["dense_rank"], c["bm25_rank"]) if x is not None]
            assert ranks and c["score"] == pytest.approx(sum(1 / (60 + x) for x in ranks), rel=1e-5)


def test_bad_schema_stops_the_run_before_any_server_starts(tmp_path):
    records = write_records(tmp_path, 2)
    bad = _schema_file(tmp_path, {"type": 7}, "bad.json")
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--no-progress", "--input", str(records), "--output",
         str(tmp_path / "out"), "--endpoints", dead_endpoint(), "--response-format", str(bad),
         *unreached_store_args(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "bad.json: not a valid JSON Schema" in res.stderr and "Traceback" not in res.stderr
