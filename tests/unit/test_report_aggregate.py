"""`rag-pipeline report`'s aggregation (pipeline/report/aggregate.py) and page (pipeline/report/page.py): fixed
tables in, known counts and percentiles out. No matplotlib here (the figures are drawn in tests/test_report.py)."""

from __future__ import annotations

import base64
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.output.schema import COLUMN_TYPES
from pipeline.report import aggregate
from pipeline.report.aggregate import LogHistogram, ReportStats, scan_report
from pipeline.report.page import NO_TOKENS, SECTIONS, build_html

# One fixed table: 10 rows. Statuses, endpoints, errors and latencies chosen so every count is known.
ROWS = [
    # rag_status, gen_status, rag_error, gen_error, endpoint, retrieve_ms, rag_llm_ms, generate_ms
    ("ok", "ok", None, None, "http://a:1", 10.0, 100.0, 1000.0),
    ("ok", "ok", None, None, "http://a:1", 20.0, 200.0, 2000.0),
    ("ok", "ok", None, None, "http://b:2", 30.0, 300.0, 3000.0),
    ("ok", "ok", None, "", "http://b:2", 40.0, 400.0, 4000.0),
    ("ok", "failed", None, "HTTP 500 from http://b:2", "http://b:2", 50.0, 500.0, 5000.0),
    ("ok", "failed", None, "HTTP 500 from http://b:2", "http://b:2", 60.0, 600.0, 6000.0),
    ("soft_fail", "ok", "no passage above retrieval.min_score", None, "http://a:1", 70.0, 700.0, 7000.0),
    ("hard_fail", "skipped", "timeout <after> 3 attempts", "timeout <after> 3 attempts", "http://a:1", 80.0, None,
     None),
    ("hard_fail", "skipped", "timeout <after> 3 attempts", "timeout <after> 3 attempts", None, 90.0, None, None),
    ("ok", "invalid_output", None, "reply is not JSON", "http://c:3", 100.0, 1000.0, float("nan")),
]
NAMES = ("rag_status", "gen_status", "rag_error", "gen_error", "endpoint", "retrieve_ms", "rag_llm_ms", "generate_ms")


def _table(rows=ROWS, **extra: list) -> pa.Table:
    cols = {n: [r[i] for r in rows] for i, n in enumerate(NAMES)}
    cols["model"] = ["m1"] * (len(rows) - 1) + [None]
    arrays = {n: pa.array(v, type=COLUMN_TYPES[n]) for n, v in cols.items()}
    for n, v in extra.items():
        arrays[n] = pa.array(v)
    return pa.table(arrays)


# -- LogHistogram -----------------------------------------------------------------------------


def test_histogram_exact_counts_min_max_mean_and_percentiles_within_the_bin_error():
    h = LogHistogram()
    values = np.arange(1, 101, dtype=np.float64)  # 1..100 ms
    h.add(values[:40])
    h.add(pa.chunked_array([pa.array(values[40:]), pa.array([None], pa.float64())]))  # null skipped
    h.add(np.array([np.nan]))  # NaN skipped
    s = h.summary()
    assert (s["n"], s["min"], s["max"], s["sum"]) == (100, 1.0, 100.0, 5050.0)
    assert s["mean"] == 50.5
    exact = dict(zip(("p50", "p95", "p99"), np.percentile(values, [50, 95, 99]), strict=True))  # 50.5, 95.05, 99.01
    for k, v in exact.items():
        assert s[k] == pytest.approx(v, rel=6e-4), (k, s[k], v)


def test_histogram_percentiles_match_numpy_on_a_skewed_sample():
    rng = np.random.default_rng(7)
    values = rng.lognormal(mean=6.0, sigma=1.5, size=200_000)  # ms, heavy tail
    h = LogHistogram()
    for chunk in np.array_split(values, 7):
        h.add(chunk)
    got = h.percentiles((1, 50, 90, 95, 99, 99.9))
    want = np.percentile(values, [1, 50, 90, 95, 99, 99.9])
    for (k, v), w in zip(got.items(), want, strict=True):
        assert v == pytest.approx(w, rel=6e-4), (k, v, w)


def test_histogram_zero_out_of_range_and_empty():
    h = LogHistogram(lo=1.0, hi=1000.0)
    assert h.summary()["p50"] is None and h.mean is None
    assert h.display_bins()[1].size == 0
    h.add(np.array([0.0, 0.0, 0.5, 5.0, 5000.0]))
    assert (h.zero, h.below, h.above, h.n, int(h.counts.sum())) == (2, 1, 1, 5, 1)
    assert h.percentiles((0, 100)) == {"p0": 0.0, "p100": 5000.0}  # clamped to the exact min and max
    edges, counts, log = h.display_bins(nbins=10)
    assert counts.sum() == 3 and log  # the positive values, 0.5 .. 5000: log-spaced
    assert edges[0] == pytest.approx(0.5) and edges[-1] == pytest.approx(5000.0, rel=1e-5)
    with pytest.raises(ValueError):
        LogHistogram(lo=0.0)


def test_histogram_display_bins_are_linear_over_a_narrow_range():
    h = LogHistogram()
    h.add(np.array([900.0, 950.0, 999.0]))
    edges, counts, log = h.display_bins(nbins=4)
    assert not log and counts.tolist() == [1, 0, 1, 1]
    assert np.allclose(np.diff(edges), np.diff(edges)[0])


# -- ReportStats over a fixed table -----------------------------------------------------------


def test_statuses_endpoints_errors_and_latencies_of_a_fixed_table():
    st = ReportStats()
    t = _table()
    st.add(t.slice(0, 4).to_batches()[0])  # two batches: counts add up
    st.add(t.slice(4))
    assert st.rows == 10
    rag, gen, counts = st.status_table()
    assert rag == ["ok", "soft_fail", "hard_fail"]
    assert gen == ["ok", "failed", "invalid_output", "skipped"]
    assert counts.tolist() == [[4, 2, 1, 0], [1, 0, 0, 0], [0, 0, 0, 2]]
    assert st.endpoint_rows() == {"http://b:2": 4, "http://a:1": 4, "http://c:3": 1, "null": 1}
    assert st.endpoint_status[("http://b:2", "failed")] == 2
    assert st.endpoint_status[("http://a:1", "skipped")] == 1
    groups = {g["error"]: g["count"] for g in st.errors.groups()}
    assert groups == {"gen_error: HTTP 500 from http://b:2": 2, "rag_error: timeout <after> 3 attempts": 2,
                      "gen_error: timeout <after> 3 attempts": 2, "rag_error: no passage above retrieval.min_score": 1,
                      "gen_error: reply is not JSON": 1}  # the empty gen_error is not an error
    assert dict(st.models) == {"m1": 9}
    ret = st.latency["retrieve"].summary()
    assert (ret["n"], ret["min"], ret["max"], ret["mean"]) == (10, 10.0, 100.0, 55.0)
    assert ret["p50"] == pytest.approx(55.0, rel=6e-4) and ret["p99"] == pytest.approx(99.1, rel=6e-4)
    gen_ms = st.latency["generate"].summary()
    assert gen_ms["n"] == 7 and gen_ms["max"] == 7000.0  # two nulls and a NaN are not values
    assert gen_ms["p50"] == pytest.approx(4000.0, rel=6e-4)
    assert st.token_columns == () and st.tokens == {} and st.finish == {}


def test_token_and_finish_reason_columns_when_present():
    tokens = {"rag_prompt_tokens": [100, 200, 300, 400, 500, 600, 700, None, None, 1000],
              "gen_completion_tokens": [0, 8, 8, 8, 8, 8, 64, None, None, 64],
              "gen_finish_reason": ["stop"] * 6 + ["length", None, None, "length"]}
    st = ReportStats(token_columns=("rag_prompt_tokens", "gen_completion_tokens"),
                     finish_columns=("gen_finish_reason",))
    assert "gen_finish_reason" in st.columns() and "contexts" not in st.columns()
    st.add(_table(**tokens))
    p = st.tokens["rag_prompt_tokens"].summary()
    assert (p["n"], p["sum"], p["min"], p["max"]) == (8, 3800.0, 100.0, 1000.0)
    assert p["p50"] == pytest.approx(450.0, rel=6e-4)
    c = st.tokens["gen_completion_tokens"]
    assert (c.n, c.zero, c.sum) == (8, 1, 168.0)
    assert dict(st.finish["gen_finish_reason"]) == {"stop": 6, "length": 2, "null": 2}


def test_endpoints_beyond_the_cap_are_folded(monkeypatch):
    monkeypatch.setattr(aggregate, "MAX_ENDPOINTS", 4)
    st = ReportStats()
    eps = ["e0"] * 5 + ["e1"] * 4 + [f"rare{i}" for i in range(6)]
    rows = [("ok", "ok", None, None, ep, 1.0, 1.0, 1.0) for ep in eps]
    st.add(_table(rows))
    got = st.endpoint_rows()
    assert got == {"(other endpoints)": 6, "e0": 5, "e1": 4}
    assert sum(got.values()) == st.rows == 15


def test_throughput_bins_from_commit_times():
    st = ReportStats()
    t0 = 1_700_000_000
    t0 -= t0 % 3600  # a whole hour (epoch seconds)
    # a part of 50 rows every 30 s for 10 minutes (two parts in the same second once), then a resume an hour
    # later: 5 more parts every 30 s
    commits = [(t0 + 5 + 30 * k, 50) for k in range(20)] + [(t0 + 5.5, 7)]
    commits += [(t0 + 3605 + 30 * k, 50) for k in range(5)]
    for t, n in commits:
        st.add_part(t, n)
    st.add_part(t0 + 9000, 0)  # an empty part counts as a part, not as a commit of rows
    assert st.parts == 27 and (st.first_commit, st.last_commit) == (t0 + 5, t0 + 3725)
    secs, rows = st.commits()
    assert secs.size == 25 and secs[0] == t0 + 5 and rows[0] == 57 and rows.sum() == 1257
    starts, per_bin, width = st.throughput(max_bins=120)
    # 3,721 s span / 120 bins = 31 s, and twice the median gap (30 s) = 60 s: 1-minute bins
    assert width == 60 and starts[0] == t0 and starts[1] == t0 + 60 and len(per_bin) == 63
    assert per_bin.sum() == 1257
    assert per_bin[0] == 57 + 50 and per_bin[1] == 100 and per_bin[9] == 100 and per_bin[10:60].sum() == 0
    assert per_bin[60:].tolist() == [100, 100, 50]
    assert st.mean_rate() == pytest.approx((1257 - 57) / 3720)  # rows after the first commit second / span
    assert st.throughput(max_bins=10)[2] == 600  # fewer bins allowed: wider ones
    one = ReportStats()
    one.add_part(t0, 5)
    assert one.throughput()[2] == 1 and one.mean_rate() is None
    assert ReportStats().throughput()[1].size == 0


# -- the scan and the page ---------------------------------------------------------------------


def _write_run(d, parts: list[pa.Table]) -> None:
    (d / ".rag-pipeline").mkdir(parents=True)
    (d / ".rag-pipeline/run.json").write_text('{"input": "/data/in.jsonl", "total_records": 12}')
    for i, t in enumerate(parts):
        pq.write_table(t, d / f"part-{i:05d}.parquet")
    (d / "part-00099.parquet.tmp").write_bytes(b"not a committed part")


def test_scan_reads_token_columns_when_some_parts_have_them(tmp_path):
    plain = _table()
    with_tokens = _table(ROWS[:2], gen_completion_tokens=[7, 9], gen_finish_reason=["stop", "length"])
    _write_run(tmp_path / "run", [plain, with_tokens])
    st = scan_report(tmp_path / "run")
    assert (st.rows, st.parts, st.info.total_records, st.info.dirs) == (12, 2, 12, 1)
    assert st.token_columns == ("gen_completion_tokens",) and st.finish_columns == ("gen_finish_reason",)
    assert st.tokens["gen_completion_tokens"].n == 2 and st.tokens["gen_completion_tokens"].sum == 16.0
    assert dict(st.finish["gen_finish_reason"]) == {"null": 10, "stop": 1, "length": 1}
    _write_run(tmp_path / "plain", [plain])
    assert scan_report(tmp_path / "plain").token_columns == ()


def test_page_escapes_output_text_embeds_figures_and_says_when_tokens_are_missing():
    st = ReportStats()
    st.add(_table())
    png = b"\x89PNG fake"
    page = build_html(st, {"latency": png}, source="/out/<run>", generated_at=1_700_000_000.0)
    for sec in SECTIONS:
        assert f'<section id="{sec}">' in page
    assert "<after>" not in page and "timeout &lt;after&gt; 3 attempts" in page
    assert "/out/&lt;run&gt;" in page
    assert NO_TOKENS in page
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page
    assert len(re.findall(r"<img ", page)) == 1  # only the figures given
    assert "<script" not in page and "http-equiv" not in page and not re.search(r'(src|href)="(https?:)?//', page)

    tok = ReportStats(token_columns=("gen_prompt_tokens",), finish_columns=("gen_finish_reason",))
    tok.add(_table(gen_prompt_tokens=list(range(10)), gen_finish_reason=["stop"] * 9 + ["length"]))
    page = build_html(tok, {}, source="o", generated_at=0.0)
    assert NO_TOKENS not in page and "gen_prompt_tokens" in page and "length" in page


def test_part_batches_cast_fill_missing_columns_and_name_an_unreadable_part(tmp_path):
    from pipeline.errors import RunError
    from pipeline.output.reading import iter_part_batches

    a = pa.table({"rag_status": ["ok", "hard_fail"], "gen_prompt_tokens": pa.array([3, 4], pa.int32())})
    b = pa.table({"rag_status": ["ok"], "other": [1]})
    pq.write_table(a, tmp_path / "part-00000.parquet", row_group_size=1)
    pq.write_table(b, tmp_path / "part-00001.parquet")
    parts = [tmp_path / "part-00000.parquet", tmp_path / "part-00001.parquet"]
    batches = list(iter_part_batches(parts, ["rag_status", "gen_prompt_tokens"], {"gen_prompt_tokens": pa.int64()},
                                     batch_rows=1))
    assert [x.num_rows for x in batches] == [1, 1, 1]
    assert [x.num_rows for x in iter_part_batches(parts, ["rag_status"], batch_rows=10)] == [2, 1]  # part by part
    t = pa.Table.from_batches(batches)
    assert t.schema.field("gen_prompt_tokens").type == pa.int64()
    assert t.to_pydict() == {"rag_status": ["ok", "hard_fail", "ok"], "gen_prompt_tokens": [3, 4, None]}
    bad = tmp_path / "part-00002.parquet"
    bad.write_bytes(b"PAR1 not parquet")
    with pytest.raises(RunError, match="part-00002.parquet: cannot read committed part"):
        list(iter_part_batches([*parts, bad], ["rag_status"]))
    run = tmp_path / "run"
    _write_run(run, [_table()])
    (run / "part-00001.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(RunError, match="part-00001.parquet: cannot read committed part"):
        scan_report(run)
