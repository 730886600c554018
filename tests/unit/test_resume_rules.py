"""The rules of a resume (pipeline/output/resume.py) and of what a run must be told (pipeline/run/required.py):
which committed rows a retry selects, how a run grows with --limit, and no silent input/output/store defaults.
Parquet parts are real files in tmp_path; no process is started."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.errors import InputError, StoreError
from pipeline.output import OutputDir, input_fingerprint, read_rows, row_schema
from pipeline.output.resume import REASONS, RetrySelection, check_limit_change, retry_reasons
from pipeline.run.required import missing_run_names, require_run_names

# ------------------------------------------------------------------------------------------- retry selection


def test_retry_reasons_one_per_row_in_order_of_precedence() -> None:
    rag = ["ok", "hard_fail", "ok", "ok", "soft_fail", "ok", "ok", "ok", None]
    gen = ["ok", "skipped", "failed", "invalid_output", "ok", "ok", "invalid_output", "skipped", None]
    fin = ["stop", None, "length", "length", "length", None, None, "length", "length"]
    both = retry_reasons(rag, gen, fin, failed=True, truncated=True)
    assert both == [None, "hard_fail", "failed", "invalid_output", "truncated", None, "invalid_output", None, None]
    assert retry_reasons(rag, gen, fin, failed=True, truncated=False) == [
        None, "hard_fail", "failed", "invalid_output", None, None, "invalid_output", None, None]
    # alone, --retry-truncated takes only ok generations that hit max_tokens (not failed ones, not skipped ones)
    assert retry_reasons(rag, gen, fin, failed=False, truncated=True) == [
        None, None, None, None, "truncated", None, None, None, None]
    # without the column (an older output) nothing is truncated
    assert retry_reasons(rag, gen, None, failed=False, truncated=True) == [None] * len(rag)


def test_selection_counts_every_reason_of_its_flags_and_says_what_it_retries() -> None:
    sel = RetrySelection(failed=True, truncated=False)
    assert sel.counts == {"hard_fail": 0, "failed": 0, "invalid_output": 0}
    sel.add(["a", "b", "c", "d", "e"], ["hard_fail", None, "invalid_output", "invalid_output", "failed"])
    assert sel.ids == {"a", "c", "d", "e"} and sel.rows == 5
    assert sel.describe() == "retrying 1 hard_fail, 1 failed, 2 invalid_output rows (--retry-failed)"

    none = RetrySelection(failed=True, truncated=True)
    none.add(["a"], [None])
    assert none.describe() == ("nothing to retry: no committed row is hard_fail or failed or invalid_output or "
                               "truncated (gen_finish_reason = length) (of 1) (--retry-failed --retry-truncated)")
    old = RetrySelection(failed=False, truncated=True, rows_without_finish_reason=4)
    old.add(["a", "b", "c", "d"], [None] * 4)
    assert "written without gen_finish_reason (an older version): none can be found truncated" in old.describe()
    mixed = RetrySelection(failed=False, truncated=True, rows_without_finish_reason=2)
    mixed.add(["a", "b", "c"], ["truncated", None, None])
    assert mixed.describe() == ("retrying 1 truncated (gen_finish_reason = length) rows (--retry-truncated); 2 rows "
                                "written without gen_finish_reason (an older version) were not checked for truncation")
    assert list(RetrySelection(failed=True, truncated=True).counts) == list(REASONS)


def _rows(specs: list[tuple[str, str, str]], finish: list[str | None] | None = None) -> pa.Table:
    """Rows (id, rag_status, gen_status), with a gen_finish_reason column when ``finish`` is given."""
    table = pa.Table.from_pylist([{"id": i, "query": f"q{i}", "rag_status": r, "gen_status": g, "generation": "x",
                                   "gen_finish_reason": f}
                                  for (i, r, g), f in zip(specs, finish or [None] * len(specs), strict=True)],
                                 schema=row_schema({}))
    if finish is None:  # a part written before the column existed
        table = table.drop_columns(["gen_finish_reason"])
    return table


@pytest.fixture
def od(tmp_path: Path) -> OutputDir:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "query": f"q{i}"}) + "\n" for i in range(20)))
    d = OutputDir(tmp_path / "out")
    d.prepare(input_path=inp, fingerprint=input_fingerprint(inp), shard=None, total_records=20, config={},
              overwrite=False, identity={"run.limit": 0})
    return d


def test_output_dir_selects_from_parts_with_and_without_the_finish_reason_column(od: OutputDir) -> None:
    # an older part (no gen_finish_reason), then parts written with it
    od.commit_part(_rows([("r0", "ok", "ok"), ("r1", "hard_fail", "skipped"), ("r2", "ok", "invalid_output")]))
    od.commit_part(_rows([("r3", "ok", "ok"), ("r4", "ok", "ok"), ("r5", "ok", "failed")],
                         ["length", "stop", "length"]))
    od.commit_part(_rows([("r6", "soft_fail", "ok"), ("r7", "ok", "invalid_output")], ["length", "length"]))
    assert od.failed_ids() == {"r1", "r2", "r5", "r7"}
    sel = od.retry_selection(failed=True, truncated=True)
    assert sel.ids == {"r1", "r2", "r3", "r5", "r6", "r7"} and sel.rows == 8
    assert sel.counts == {"hard_fail": 1, "failed": 1, "invalid_output": 2, "truncated": 2}
    assert sel.rows_without_finish_reason == 3
    only = od.retry_selection(failed=False, truncated=True)
    assert only.ids == {"r3", "r6"} and only.counts == {"truncated": 2}
    assert od.retry_selection(failed=True).rows_without_finish_reason == 0  # not looked at without --retry-truncated
    # replacing the selected rows leaves nothing to select (the retry's own path: retry parts, then apply)
    od.commit_retry_part(_rows([(i, "ok", "ok") for i in sorted(sel.ids)], ["stop"] * len(sel.ids)))
    od.apply_retries()
    assert od.retry_selection(failed=True, truncated=False).ids == set()
    assert len(read_rows(od.path)) == 8


def test_selection_of_an_output_written_before_the_column_says_nothing_can_be_found(od: OutputDir) -> None:
    od.commit_part(_rows([("r0", "ok", "ok"), ("r1", "ok", "ok")]))
    sel = od.retry_selection(failed=False, truncated=True)
    assert sel.ids == set() and sel.rows_without_finish_reason == 2
    assert "none can be found truncated" in sel.describe()
    assert OutputDir(od.path.parent / "empty").retry_selection(failed=True).ids == set()


# ------------------------------------------------------------------------------------------- runs that grow


def test_limit_change_grows_keeps_or_refuses_by_the_records_it_holds() -> None:
    assert check_limit_change("out", 3, 3, 3, 3) is None
    assert check_limit_change("out", 100, 0, 40, 40) is None  # both cover the whole 40-record input
    grown = check_limit_change("out", 3, 5, 3, 5)
    assert grown and "from 3 to 5 records" in grown and "run.limit 3 -> 5" in grown
    assert check_limit_change("out", 3, 0, 3, 40)
    with pytest.raises(InputError) as exc:
        check_limit_change("out", 5, 3, 5, 3)
    msg = str(exc.value)
    assert "\n" not in msg and "was started with run.limit=5 (5 records), now 3 (3 records)" in msg
    assert "use --limit 5 or more (0 = all)" in msg
    with pytest.raises(InputError, match="run.limit=0 .40 records., now 10"):
        check_limit_change("out", 0, 10, 40, 10)


def _prepare(d: OutputDir, inp: Path, limit: int, total: int) -> None:
    d.prepare(input_path=inp, fingerprint=input_fingerprint(inp), shard=None, total_records=total, config={},
              overwrite=False, identity={"run.limit": limit, "run.id_field": "id"})


def test_prepare_extends_a_run_records_the_change_and_refuses_to_shrink(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "query": "q"}) + "\n" for i in range(8)))
    d = OutputDir(tmp_path / "out")
    _prepare(d, inp, 3, 3)
    d.commit_part(_rows([("r0", "ok", "ok"), ("r1", "ok", "ok"), ("r2", "ok", "ok")]))
    _prepare(d, inp, 5, 5)
    info = d.run_info()
    assert info["total_records"] == 5 and info["identity"]["run.limit"] == 5
    assert [(c["key"], c["old"], c["new"], c["total_records"]) for c in info["config_changes"]] == [
        ("run.limit", 3, 5, [3, 5])]
    assert len(d.ledger) == 3  # the committed rows stay
    with pytest.raises(InputError, match="was started with run.limit=5"):
        _prepare(d, inp, 4, 4)
    assert d.run_info()["total_records"] == 5  # a refused resume changes nothing
    _prepare(d, inp, 0, 8)  # no limit: the whole input
    assert d.run_info()["total_records"] == 8
    with pytest.raises(InputError, match="was started with run.id_field="):  # other identity keys stay fixed
        d.prepare(input_path=inp, fingerprint=input_fingerprint(inp), shard=None, total_records=8, config={},
                  overwrite=False, identity={"run.limit": 0, "run.id_field": "doc_id"})


# ------------------------------------------------------------------------------------------- no silent defaults


def test_the_bundled_defaults_name_no_input_output_store_or_collection() -> None:
    cfg = load_config()
    assert (cfg.run.input, cfg.run.output, cfg.store.path, cfg.store.chroma_url, cfg.store.collection) == ("",) * 5
    assert [code for _, code in missing_run_names(cfg)] == [2, 2, 4, 4]


@pytest.mark.parametrize(("overrides", "code", "first", "also"), [
    ({}, 2, "no input: pass --input FILE", "(also: no output directory; no vector store named; no collection named)"),
    ({"run.input": "in.jsonl"}, 2, "no output directory: pass --output DIR", "(also: no vector store named; "),
    ({"run.input": "in.jsonl", "run.output": "o"}, 4,
     "no vector store named: pass --store DIR (a local Chroma store) or --chroma-url URL, or set [store] path in your "
     "--config; to build it from a corpus first, add --ingest SOURCE", "(also: no collection named)"),
    ({"run.input": "in.jsonl", "run.output": "o", "store.chroma_url": "http://h:8000"}, 4,
     "no collection named: pass --collection NAME, or set [store] collection in your --config", ""),
])
def test_a_run_not_told_its_pieces_is_refused_in_one_line(overrides, code, first, also) -> None:
    cfg = load_config(None, overrides)
    with pytest.raises((InputError, StoreError)) as exc:
        require_run_names(cfg)
    msg = str(exc.value)
    assert exc.value.exit_code == code and msg.startswith(first) and also in msg and "\n" not in msg
    if not also:
        assert "also" not in msg and "--ingest" not in msg


def test_a_user_config_may_name_everything(tmp_path: Path) -> None:
    user = tmp_path / "mine.toml"
    user.write_text('[run]\ninput = "in.jsonl"\noutput = "out"\n[store]\npath = "store"\ncollection = "docs"\n')
    cfg = load_config(user)
    assert missing_run_names(cfg) == [] and require_run_names(cfg) is cfg


def test_ingest_of_the_bundled_example_is_found_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"run.input": "in.jsonl", "run.output": "o", "store.path": "s", "store.collection": "c",
                             "run.ingest": "data/example/corpus.jsonl"})
    got = require_run_names(cfg).run.ingest
    assert Path(got).is_absolute() and Path(got).is_file() and got.endswith("corpus.jsonl")
    (tmp_path / "data" / "example").mkdir(parents=True)
    (tmp_path / "data" / "example" / "corpus.jsonl").write_text("{}\n")  # the user's own file wins
    assert require_run_names(cfg).run.ingest == "data/example/corpus.jsonl"
