"""eval-answers: scoring formulas on hand-checked cases, references parsing, and the command on a run directory
written with the real output code (OutputDir + the run's row schema)."""

import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.evaluation.answers import (
    ReferenceFields,
    evaluate_answers,
    exact_match,
    load_references,
    normalize_answer,
    token_f1,
)
from pipeline.output import OutputDir, input_fingerprint, row_schema


def test_squad_normalisation_and_exact_match():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a day; the end.") == "apple day end"
    assert normalize_answer("theory of A") == "theory of"  # articles only as whole words
    assert exact_match("Paris.", ["paris"]) == 1.0
    assert exact_match("in Paris", ["Paris"]) == 0.0
    assert exact_match("London", ["Paris", "the London"]) == 1.0  # best over several references


def test_token_f1_hand_checked():
    # pred tokens [cat, sat, on, mat], gold [cat, sat, on, red, mat]... common 4: P=4/4, R=4/5, F1=8/9
    assert token_f1("The cat sat on the mat", ["the cat sat on the red mat"]) == pytest.approx(8 / 9)
    # common 1 ("blue"): P = 1/2, R = 1/3 -> F1 = 2 * (1/6) / (5/6) = 0.4
    assert token_f1("blue sky", ["blue green red"]) == pytest.approx(0.4)
    # multiset counts: pred [a? no: "yes yes"] vs gold ["yes"]: common 1, P=1/2, R=1 -> 2/3
    assert token_f1("yes yes", ["yes"]) == pytest.approx(2 / 3)
    assert token_f1("nothing", ["else"]) == 0.0
    assert token_f1("", [""]) == 1.0 and token_f1("a", ["word"]) == 0.0  # "a" normalises to empty
    assert token_f1("red", ["blue", "red"]) == 1.0


def _write_refs(tmp_path, lines):
    p = tmp_path / "refs.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" if not isinstance(x, str) else x for x in lines), encoding="utf-8")
    return p


def test_reference_errors_name_file_line_and_field(tmp_path):
    ok = {"id": 1, "answer": "x"}
    cases = [
        ([ok, {"answer": "y"}], r"refs.jsonl:2: field 'id'"),
        ([ok, {"id": 2, "answer": 3}], r"refs.jsonl:2: field 'answer'"),
        ([ok, {"id": 2, "label": ["x"]}], r"refs.jsonl:2: field 'label'"),
        ([ok, {"id": 2, "doc_ids": "d1"}], r"refs.jsonl:2: field 'doc_ids'"),
        ([ok, {"id": 2}], r"refs.jsonl:2: none of the fields"),
        ([ok, {"id": 1, "answer": "z"}], r"refs.jsonl:2: duplicate id"),
        ([ok, "{not json\n"], r"refs.jsonl:2: invalid JSON"),
    ]
    for lines, msg in cases:
        with pytest.raises(InputError, match=msg):
            load_references(_write_refs(tmp_path, lines))
    refs = load_references(_write_refs(tmp_path, [{"qid": "a", "gold": ["x", "y"], "cls": "no", "docs": [7]}]),
                           ReferenceFields("qid", "gold", "cls", "docs"))
    assert refs["a"].answers == ("x", "y") and refs["a"].label == "no" and refs["a"].doc_ids == {"7"}


def _run_dir(tmp_path, rows):
    """A committed run directory holding ``rows`` (dicts with the output columns that matter)."""
    import pyarrow as pa

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": r["id"], "query": "q"}) + "\n" for r in rows), encoding="utf-8")
    od = OutputDir(tmp_path / "out")
    od.prepare(input_path=inp, fingerprint=input_fingerprint(inp), shard=None, total_records=len(rows),
               config=Config().to_dict(), overwrite=False)
    schema = row_schema({})
    full = [{"query": "q", "rag_error": None, "gen_error": None, "attempts": 1, "endpoint": None, "model": None,
             "retrieve_ms": 1.0, "rag_llm_ms": None, "generate_ms": 1.0, "rag_answer": None, "generation_json": None,
             "gen_status": "ok", **r} for r in rows]
    od.commit_part(pa.Table.from_pylist(full[:2], schema=schema))
    od.commit_part(pa.Table.from_pylist(full[2:], schema=schema))
    return od.path


def test_context_recall_counts_only_the_passages_sent_to_the_model(tmp_path):
    import pyarrow as pa

    from pipeline.output.schema import row_schema

    # the gold document d1 was retrieved second: found only when two passages reached the model
    rows = [
        {"id": "cut", "generation": "x", "rag_status": "ok", "contexts": _ctx("d9", "d1"), "contexts_used": 1},
        {"id": "whole", "generation": "x", "rag_status": "ok", "contexts": _ctx("d9", "d1"), "contexts_used": 2},
        {"id": "none-fit", "generation": "x", "rag_status": "soft_fail", "contexts": _ctx("d1"), "contexts_used": 0},
        # a soft failure sent the query alone: no prompt carried passages (null)
        {"id": "alone", "generation": "x", "rag_status": "soft_fail", "contexts": _ctx("d1"), "contexts_used": None},
    ]
    out = _run_dir(tmp_path, rows)
    # a part written before contexts_used existed: every retrieved passage counts, as before
    old = row_schema({})
    old = old.remove(old.get_field_index("contexts_used"))
    row = {"id": "older", "query": "q", "generation": "x", "rag_status": "ok", "gen_status": "ok",
           "contexts": _ctx("d9", "d1")}
    OutputDir(out).commit_part(pa.Table.from_pylist([row], schema=old))
    refs = load_references(_write_refs(tmp_path, [{"id": i, "doc_ids": ["d1"]}
                                                  for i in ("cut", "whole", "none-fit", "alone", "older")]))
    rep = evaluate_answers(out, refs)
    assert rep.overall["gold_doc_records"] == 5
    assert rep.overall["context_recall"] == pytest.approx(2 / 5)  # whole and older
    assert rep.by_rag_status["ok"]["context_recall"] == pytest.approx(2 / 3)
    assert rep.by_rag_status["soft_fail"]["context_recall"] == 0.0


def _ctx(*docs):
    return [{"doc_id": d, "chunk_id": f"{d}#0", "text": "passage " * 50, "score": 0.5, "dense_rank": 1,
             "bm25_rank": None} for d in docs]


def test_eval_answers_overall_and_per_rag_status(tmp_path):
    rows = [
        {"id": "1", "generation": "Paris", "rag_status": "ok", "contexts": _ctx("d1", "d9"), "contexts_used": 2},
        {"id": "2", "generation": "the cat sat on the mat", "rag_status": "ok", "contexts": _ctx("d5"),
         "contexts_used": 1},
        {"id": "3", "generation": "Yes, clearly.", "rag_status": "soft_fail", "contexts": []},
        {"id": "4", "generation": None, "rag_status": "hard_fail", "contexts": [], "gen_status": "skipped"},
        {"id": "5", "generation": "whatever", "rag_status": "ok", "contexts": _ctx("d3"), "contexts_used": 1,
         "generation_json": json.dumps({"label": "no"})},
        {"id": "extra", "generation": "x", "rag_status": "ok", "contexts": []},
    ]
    out = _run_dir(tmp_path, rows)
    refs_path = _write_refs(tmp_path, [
        {"id": "1", "answer": ["paris", "Paris, France"], "doc_ids": ["d1"]},
        {"id": "2", "answer": "the cat sat on the red mat", "doc_ids": ["d2"]},
        {"id": "3", "label": "yes"},
        {"id": "4", "answer": "x", "label": "no"},
        {"id": "5", "label": "no", "doc_ids": ["d3", "d4"]},
        {"id": "6", "answer": "never run"},
    ])
    rep = evaluate_answers(out, load_references(refs_path))
    o = rep.overall
    assert rep.missing == 1 and rep.missing_ids == ["6"] and rep.unreferenced == 1 and rep.references == 6
    assert o["records"] == 5 and o["answers"] == 3 and o["label_records"] == 3 and o["gold_doc_records"] == 3
    assert o["exact_match"] == pytest.approx(1 / 3)  # 1 exact, 2 partial, 4 no prediction
    assert o["f1"] == pytest.approx((1 + 8 / 9 + 0) / 3)
    assert o["label_accuracy"] == pytest.approx(2 / 3) and o["unparsed_labels"] == 1  # 3 yes, 5 no (json), 4 none
    assert o["context_recall"] == pytest.approx(2 / 3)  # 1 and 5 hold a gold doc, 2 does not
    ok = rep.by_rag_status["ok"]
    assert ok["records"] == 3 and ok["exact_match"] == pytest.approx(1 / 2) and ok["context_recall"] == pytest.approx(2 / 3)
    assert rep.by_rag_status["soft_fail"]["label_accuracy"] == 1.0
    assert rep.by_rag_status["hard_fail"]["f1"] == 0.0 and rep.by_rag_status["hard_fail"]["label_accuracy"] == 0.0

    js = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["eval-answers", str(out), "--references", str(refs_path), "--json", str(js)])
    assert res.exit_code == 0, res.output
    assert "soft_fail" in res.output and "0.3333" in res.output
    got = json.loads(js.read_text(encoding="utf-8"))
    assert got["overall"]["records"] == 5 and set(got["by_rag_status"]) == {"ok", "soft_fail", "hard_fail"}

    bad = _write_refs(tmp_path, [{"id": "zz", "answer": "a"}])
    res = CliRunner().invoke(main, ["eval-answers", str(out), "--references", str(bad)])
    assert res.exit_code == 2 and "no output row has a reference" in res.output and "Traceback" not in res.output
