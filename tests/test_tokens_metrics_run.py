"""Token accounting and run metrics with the real components: `rag-pipeline run` as a subprocess against real
llama.cpp servers (SmolLM2), the example Chroma store and the embedding model.

- rows carry the servers' token counts and finish reasons; a tiny ``generation.max_tokens`` makes every
  generation end with ``length``, which the manifest and the summary count, naming the setting to raise;
  the model column is the model's name; the managed server's ``/metrics`` is listed in the manifest;
- ``--metrics-port 0`` serves Prometheus text during the run whose counters grow (scraped and parsed with
  prometheus_client's own parser);
- a metrics port that is taken is refused with one line and exit 2 before any server starts;
- a run directory written before the token columns existed resumes with its own columns, and status and
  eval-answers read it.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pyarrow.parquet as pq
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from pipeline.output.schema import USAGE_COLUMNS
from pipeline.servers.process import port_in_use
from tests.fixtures.llm import free_port_block, requires_llama
from tests.runtools import (
    committed_parts,
    read_rows,
    run_args,
    start_run,
    store_args,
    wait_no_survivors,
    write_config,
    write_records,
)

pytestmark = [requires_llama, pytest.mark.slow]

MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"


def test_rows_carry_tokens_and_finish_reasons_and_the_manifest_counts_max_tokens_hits(tmp_path, example_store):
    records = write_records(tmp_path, 4)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"rag": {"max_tokens": 24}, "generation": {"max_tokens": 1}})
    proc, marker = start_run(run_args(records, out, cfg, "--base-port", str(free_port_block(1)),
                                      *store_args(example_store)))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    rows = read_rows(out)
    assert len(rows) == 4
    for r in rows:
        assert r["rag_status"] == "ok" and r["gen_status"] == "ok", r
        assert r["rag_prompt_tokens"] > 0 and 0 < r["rag_completion_tokens"] <= 24, r
        assert r["rag_finish_reason"] in ("stop", "length"), r
        assert r["gen_prompt_tokens"] > 0 and r["gen_completion_tokens"] == 1, r
        assert r["gen_finish_reason"] == "length", r  # one token allowed: every generation is cut
        assert r["model"] == MODEL_NAME  # a name, not the GGUF's path
    schema = pq.read_schema(committed_parts(out)[0])
    assert all(c in schema.names for c in USAGE_COLUMNS)
    assert schema.field("gen_completion_tokens").type == "int32"

    man = json.loads((out / ".rag-pipeline/manifest.json").read_text())
    tok = man["tokens"]
    assert tok["gen"]["hit_max_tokens"] == 4 and tok["gen"]["max_tokens_setting"] == "generation.max_tokens"
    assert tok["gen"]["finish_reasons"] == {"length": 4}
    assert tok["gen"]["completion_tokens"] == 4 and tok["gen"]["rows_with_usage"] == 4
    assert tok["rag"]["prompt_tokens"] == sum(r["rag_prompt_tokens"] for r in rows)
    assert tok["rag"]["completion_tokens"] == sum(r["rag_completion_tokens"] for r in rows)
    rag_lengths = sum(r["rag_finish_reason"] == "length" for r in rows)
    assert tok["rag"]["hit_max_tokens"] == rag_lengths
    assert tok["rag"]["request_completion_tokens_per_s"] > 0
    assert man["this_invocation"]["completion_tokens_per_s"]["gen"] > 0
    assert man["models"]["llm"] == [MODEL_NAME]
    (server,) = man["servers"]
    assert man["metrics"] == {"url": None, "servers": [f"http://127.0.0.1:{server['port']}/metrics"]}
    # the end summary says how many generations were cut and which setting to raise
    assert "4 generations hit max_tokens (finish_reason length): raise generation.max_tokens" in err
    assert re.search(r"gen tokens: prompt \d+  completion 4 ", err), err[-2000:]
    assert wait_no_survivors(marker) == []


class _Stderr:
    """Reads a running process's stderr on a thread (lines kept), so the test can wait for a line."""

    def __init__(self, proc) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc) -> None:
        for line in proc.stderr:
            self.lines.append(line)

    def wait_for(self, pattern: str, proc, timeout_s: float = 240.0) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            assert proc.poll() is None, "run exited early: " + "".join(self.lines)[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}")

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


def _scrape(url: str) -> dict[str, dict[tuple, float]]:
    """``{family name: {sorted label items: value}}`` of every sample, parsed by prometheus_client."""
    resp = requests.get(url, timeout=5)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(resp.text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _total(scrape: dict, name: str) -> float:
    return sum(scrape.get(name, {}).values())


def test_metrics_port_zero_serves_prometheus_text_whose_counters_grow(tmp_path, example_store, llama_endpoints):
    n = 10
    records = write_records(tmp_path, n)
    out = tmp_path / "out"
    cfg = write_config(tmp_path)
    proc, marker = start_run(run_args(records, out, cfg, "--metrics-port", "0", "--endpoints",
                                      ",".join(llama_endpoints), *store_args(example_store)))
    err = _Stderr(proc)
    url = err.wait_for(r"run metrics \(Prometheus\) on (http://127\.0\.0\.1:\d+/metrics)", proc).group(1)
    scrapes = []
    while proc.poll() is None:
        try:
            scrapes.append(_scrape(url))
        except requests.ConnectionError:  # the run ended between poll() and the request
            break
        time.sleep(0.25)
    proc.wait(timeout=600)
    text = err.text()
    assert proc.returncode == 0, text[-3000:]
    rows = read_rows(out)
    assert len(rows) == n

    seen = [_total(s, "rag_pipeline_records_total") for s in scrapes]
    assert len(scrapes) >= 3, seen
    assert seen == sorted(seen) and seen[0] < seen[-1] <= 2 * n, seen  # counted per stage: 2 per row
    assert len(set(seen)) >= 3, f"the counter must grow during the run, scraped {seen}"
    last = scrapes[-1]
    # a scrape reads the families one after the other while rows are made: counts of one row may differ by a few
    rows_so_far = last["rag_pipeline_records_total"][(("stage", "gen"), ("status", "ok"))]
    assert 0 < rows_so_far <= n and abs(seen[-1] - 2 * rows_so_far) <= 1
    tokens = [_total(s, "rag_pipeline_tokens_total") for s in scrapes]
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1]
    assert rows_so_far - 2 <= last["rag_pipeline_request_seconds_count"][(("stage", "generate"),)] <= n
    assert rows_so_far - 2 <= last["rag_pipeline_overhead_seconds_count"][()] <= n
    assert 0 < last["rag_pipeline_overhead_seconds_sum"][()]
    assert {dict(k)["endpoint"] for k in last["rag_pipeline_inflight"]} == set(llama_endpoints)
    assert max(max(s.get("rag_pipeline_inflight", {0: 0}).values()) for s in scrapes) >= 1
    assert last["rag_pipeline_restarts_total"] == {(("kind", "server"),): 0, (("kind", "worker"),): 0}
    assert "rag_pipeline_retries_total" in last and "rag_pipeline_outage_seconds_total" in last

    man = json.loads((out / ".rag-pipeline/manifest.json").read_text())
    assert man["metrics"] == {"url": url, "servers": []}  # attached endpoints: none of ours
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert not port_in_use("127.0.0.1", port)  # free again once the run ended
    assert wait_no_survivors(marker) == []


def test_taken_metrics_port_is_one_line_exit_2_before_any_server_starts(tmp_path, example_store):
    records = write_records(tmp_path, 2)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {"servers": {"port_slot": 0}})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        proc, marker = start_run(run_args(records, out, cfg, "--metrics-port", str(port), "--base-port",
                                          str(free_port_block(1)), *store_args(example_store)))
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines == [lines[-1]] and lines[0].startswith("Error: [run] metrics_port: port "), err
    assert f"port {port} on 127.0.0.1 is already in use" in err and "--metrics-port" in err
    assert "Traceback" not in err
    # no server was started: its log would be in .rag-pipeline/logs beside main's own log
    assert sorted(p.name for p in (out / ".rag-pipeline/logs").glob("*")) in ([], ["main.log"])
    assert not committed_parts(out)
    assert time.monotonic() - t0 < 60
    assert wait_no_survivors(marker) == []


def test_directory_of_an_earlier_version_resumes_with_its_columns_and_stays_readable(
        tmp_path, example_store, llama_endpoints):
    """Parts without the token columns (as an earlier version wrote them): the resume writes its rows with the
    same columns (one schema per directory); status, eval-answers and the manifest read the directory."""
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.output import run_status

    records = write_records(tmp_path, 6)
    out = tmp_path / "out"
    cfg = write_config(tmp_path)
    args = run_args(records, out, cfg, "--endpoints", ",".join(llama_endpoints), *store_args(example_store))
    proc, _ = start_run(args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    parts = committed_parts(out)
    assert len(parts) == 6
    for part in parts[:3]:  # the first three rows, as an earlier version committed them
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(list(USAGE_COLUMNS)), part)
    for part in parts[3:]:  # the rest was not done yet
        part.unlink()
    proc, marker = start_run(args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "started by an earlier version" in err and "--overwrite" in err
    schemas = {tuple(pq.read_schema(p).names) for p in committed_parts(out)}
    assert len(schemas) == 1 and not set(USAGE_COLUMNS) & set(next(iter(schemas)))  # one schema, the old one
    assert sorted(r["id"] for r in read_rows(out)) == sorted(json.loads(x)["id"] for x in
                                                             records.read_text().splitlines())
    man = json.loads((out / ".rag-pipeline/manifest.json").read_text())
    assert man["rows"] == 6 and man["tokens"]["gen"]["rows_with_usage"] == 0
    assert "rag tokens:" not in err and "gen tokens:" not in err  # nothing to report: the summary has no token line
    st = run_status(out)
    assert st["done"] == 6 and st["complete"] is True
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"id": json.loads(x)["id"], "answer": "yes"}) + "\n"
                            for x in records.read_text().splitlines()))
    res = CliRunner().invoke(main, ["eval-answers", str(out), "--references", str(refs)])
    assert res.exit_code == 0, res.output
    assert wait_no_survivors(marker) == []
