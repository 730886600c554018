"""Label scoring of eval-answers, one rule at a time on hand-checked cases: the label parser (single label,
ambiguous, no label, longest phrase, punctuation, generation_json first), the aggregation (accuracy over
labelled records, counts per predicted label, confusion matrix, majority-class baseline), and the command on a
small hand-labelled output file written with the run's row schema."""

import json
import re

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.evaluation.answers import (
    AMBIGUOUS,
    NO_LABEL,
    AnswerTally,
    LabelRead,
    Reference,
    label_name,
    label_order,
    label_words,
    majority_baseline,
    parse_label,
    read_label,
)

YNM = ["yes", "no", "maybe"]


def test_label_words_split_on_punctuation_and_drop_articles():
    assert label_words("Yes/No.") == ["yes", "no"]
    assert label_words("NOT_ENOUGH_INFO") == ["not", "enough", "info"]
    assert label_words("The answer:yes") == ["answer", "yes"]
    assert label_name("  Not  Enough-Info ") == "not enough info"


def test_one_label_however_often_is_that_label():
    assert read_label("Yes, it does.", YNM) == LabelRead("yes", ("yes",), "text")
    assert read_label("No. No, no!", YNM).label == "no"
    assert read_label("Answer:maybe", YNM).label == "maybe"  # punctuation separates words
    assert parse_label("MAYBE", YNM) == "maybe"


def test_two_different_labels_are_ambiguous_not_the_first():
    echo = read_label("yes, no", YNM)  # the model echoing the instruction
    assert echo.label is None and echo.found == ("yes", "no") and echo.column == AMBIGUOUS
    assert read_label("The answer is: NO. Maybe later.", YNM).column == AMBIGUOUS
    assert read_label("yes/no/maybe", YNM).found == ("yes", "no", "maybe")
    assert parse_label("yes, no", YNM) is None


def test_no_allowed_label_is_no_label_found():
    assert read_label("Nobody knows", YNM).column == NO_LABEL  # whole words only
    assert read_label("yesterday, nonetheless", YNM).found == ()
    assert read_label("", YNM) == LabelRead(None, (), "none")
    assert read_label(None, YNM).column == NO_LABEL


def test_longest_label_at_a_word_wins_and_hides_the_labels_inside_it():
    labels = ["supported", "not supported"]
    assert read_label("it is not supported here", labels).label == "not supported"
    assert read_label("supported, or rather not supported", labels).column == AMBIGUOUS
    sci = ["SUPPORT", "CONTRADICT", "NOT ENOUGH INFO"]
    assert read_label("Verdict: NOT_ENOUGH_INFO", sci).label == "not enough info"
    assert read_label("not enough info to support it", sci).found == ("not enough info", "support")


def test_generation_json_label_wins_and_the_text_is_not_read():
    assert read_label("yes, no", YNM, structured={"label": "Maybe"}) == LabelRead("maybe", ("maybe",), "json")
    assert read_label("yes", YNM, structured={"label": "perhaps"}).column == NO_LABEL  # not an allowed label
    assert read_label("no", YNM, structured={"reason": "x"}).label == "no"  # no label field: the text
    assert read_label("no", YNM, structured=["yes"]).label == "no"  # not an object: the text
    assert read_label("no", YNM, structured={"verdict": "yes"}, label_field="verdict").label == "yes"


def test_label_order_and_majority_baseline():
    assert label_order(["Yes", "no", "yes", ""], ["maybe", "NO", "Unsure"]) == ["yes", "no", "maybe", "unsure"]
    assert majority_baseline({"yes": 3, "no": 2}) == ("yes", 0.6)
    assert majority_baseline({"no": 2, "yes": 2}, ["yes", "no"]) == ("yes", 0.5)  # tie: the report order
    assert majority_baseline({"no": 2, "yes": 2}, ["no", "yes"]) == ("no", 0.5)
    assert majority_baseline({}) == (None, None)


def _tally(cases):
    t = AnswerTally()
    for gold, pred in cases:
        t.add(Reference(label=gold), pred, read_label(pred, YNM), set())
    return t


def test_tally_counts_confusion_and_baseline_hand_checked():
    t = _tally([("yes", "Yes."), ("yes", "yes, no"), ("yes", "no"), ("no", None), ("maybe", "maybe so")])
    t.add(Reference(answers=("Paris",)), "Paris", None, set())  # no reference label: not in the label counts
    r = t.result(label_order(YNM))
    assert r["records"] == 6 and r["label_records"] == 5 and r["labels_correct"] == 2
    assert r["label_accuracy"] == pytest.approx(2 / 5)
    assert (r["ambiguous_labels"], r["no_label"], r["unparsed_labels"]) == (1, 1, 2)
    assert r["predicted_labels"] == {"yes": 1, "no": 1, "maybe": 1, AMBIGUOUS: 1, NO_LABEL: 1}
    assert r["confusion"] == {
        "yes": {"yes": 1, "no": 1, "maybe": 0, AMBIGUOUS: 1, NO_LABEL: 0},
        "no": {"yes": 0, "no": 0, "maybe": 0, AMBIGUOUS: 0, NO_LABEL: 1},
        "maybe": {"yes": 0, "no": 0, "maybe": 1, AMBIGUOUS: 0, NO_LABEL: 0},
    }
    assert r["majority_label"] == "yes" and r["majority_baseline"] == pytest.approx(3 / 5)
    assert r["exact_match"] == 1.0 and r["answers"] == 1


def test_an_echo_of_the_labels_scores_zero_not_the_majority_share():
    # 6 yes, 4 no, every generation "yes, no": the first-label rule scored 0.6, the majority share.
    t = _tally([("yes", "yes, no")] * 6 + [("no", "Yes, no.")] * 4)
    r = t.result(label_order(YNM))
    assert r["label_accuracy"] == 0.0 and r["ambiguous_labels"] == 10 and r["majority_baseline"] == 0.6


def test_tally_without_labels_has_no_label_metrics():
    t = AnswerTally()
    t.add(Reference(doc_ids=frozenset({"d1"})), "x", None, {"d1"})
    r = t.result(["yes", "no"])
    assert r["label_records"] == 0 and r["label_accuracy"] is None and r["majority_baseline"] is None
    assert r["confusion"] == {} and r["predicted_labels"] == {"yes": 0, "no": 0, AMBIGUOUS: 0, NO_LABEL: 0}
    assert r["context_recall"] == 1.0


# --- the command on a hand-labelled output file ----------------------------------------------------------------
ROWS = [  # id, generation, rag_status, generation_json; reference label (or answer) and what the rule reads
    ("a", "Yes.", "ok", None),                                        # yes -> yes
    ("b", "yes, no", "ok", None),                                     # no  -> ambiguous
    ("c", "I cannot tell from the passages.", "soft_fail", None),     # maybe -> no label
    ("d", "Maybe; the evidence is mixed.", "soft_fail", None),        # maybe -> maybe
    ("e", "yes or no", "ok", {"label": "no", "reason": "contradicted"}),  # no -> no (generation_json)
    ("f", None, "hard_fail", None),                                   # yes -> no label (skipped)
    ("g", "No.", "ok", None),                                         # no  -> no
    ("h", "The answer is yes.", "ok", None),                          # no  -> yes
    ("i", "Yes, definitely.", "ok", None),                            # yes -> yes
    ("j", "Paris", "ok", None),                                       # answer only
    ("k", "yes", "ok", None),                                         # no reference
]
REFS = {"a": "yes", "b": "no", "c": "maybe", "d": "maybe", "e": "no", "f": "yes", "g": "no", "h": "no", "i": "yes"}


def _output(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.output.schema import row_schema

    out = tmp_path / "out"
    (out / ".rag-pipeline").mkdir(parents=True)
    (out / ".rag-pipeline/run.json").write_text("{}", encoding="utf-8")
    rows = [{"id": rid, "query": "q", "generation": gen, "rag_status": st, "contexts": [],
             "gen_status": "skipped" if gen is None else "ok",
             "generation_json": json.dumps(obj) if obj else None} for rid, gen, st, obj in ROWS]
    pq.write_table(pa.Table.from_pylist(rows, schema=row_schema({})), out / "part-00000.parquet")
    refs = tmp_path / "refs.jsonl"
    lines = [{"id": k, "label": v} for k, v in REFS.items()] + [{"id": "j", "answer": "Paris"},
                                                                  {"id": "z", "label": "yes"}]
    refs.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return out, refs


def test_eval_answers_command_on_a_hand_labelled_output(tmp_path):
    out, refs = _output(tmp_path)
    js = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["eval-answers", str(out), "--references", str(refs), "--labels",
                                    "yes,no,maybe", "--json", str(js)])
    assert res.exit_code == 0, res.output
    got = json.loads(js.read_text(encoding="utf-8"))
    o = got["overall"]
    assert got["missing_ids"] == ["z"] and got["unreferenced"] == 1 and got["labels"] == YNM
    assert o["records"] == 10 and o["label_records"] == 9 and o["labels_correct"] == 5  # a d e g i
    assert o["label_accuracy"] == pytest.approx(5 / 9)
    assert (o["ambiguous_labels"], o["no_label"], o["unparsed_labels"]) == (1, 2, 3)
    assert got["ambiguous_ids"] == ["b"] and got["no_label_ids"] == ["c", "f"]
    assert o["predicted_labels"] == {"yes": 3, "no": 2, "maybe": 1, AMBIGUOUS: 1, NO_LABEL: 2}
    assert o["confusion"] == {
        "yes": {"yes": 2, "no": 0, "maybe": 0, AMBIGUOUS: 0, NO_LABEL: 1},
        "no": {"yes": 1, "no": 2, "maybe": 0, AMBIGUOUS: 1, NO_LABEL: 0},
        "maybe": {"yes": 0, "no": 0, "maybe": 1, AMBIGUOUS: 0, NO_LABEL: 1},
    }
    assert o["majority_label"] == "no" and o["majority_baseline"] == pytest.approx(4 / 9)
    by = got["by_rag_status"]
    assert by["ok"]["records"] == 7 and by["ok"]["label_records"] == 6
    assert by["ok"]["label_accuracy"] == pytest.approx(4 / 6) and by["ok"]["majority_baseline"] == pytest.approx(4 / 6)
    assert by["ok"]["ambiguous_labels"] == 1 and by["ok"]["no_label"] == 0
    assert by["soft_fail"]["label_accuracy"] == 0.5 and by["soft_fail"]["majority_label"] == "maybe"
    assert by["hard_fail"]["majority_baseline"] == 1.0 and by["hard_fail"]["no_label"] == 1

    table = {ln.split()[0]: ln.split() for ln in res.output.splitlines() if ln.split()}
    head = table["rag_status"]
    assert head[1:] == ["records", "EM", "F1", "labelled", "label_acc", "majority", "ambiguous", "no_label",
                        "ctx_recall"]
    assert table["all"][1:] == ["10", "1.0000", "1.0000", "9", "0.5556", "0.4444", "1", "2", "-"]
    assert table["ok"][1:] == ["7", "1.0000", "1.0000", "6", "0.6667", "0.6667", "1", "0", "-"]
    assert "unparsed labels 3 (ambiguous 1, no label found 2)" in res.output
    block = res.output.split("labels, all: 9 labelled, accuracy 0.5556, majority 'no' 0.4444")[1].splitlines()
    assert re.split(r"\s{2,}", block[1].strip()) == ["reference", "yes", "no", "maybe", AMBIGUOUS, NO_LABEL, "total"]
    assert block[2].split() == ["yes", "2", "0", "0", "0", "1", "3"]
    assert block[3].split() == ["no", "1", "2", "0", "1", "0", "4"]
    assert block[4].split() == ["maybe", "0", "0", "1", "0", "1", "2"]
    assert block[5].split() == ["predicted", "3", "2", "1", "1", "2", "9"]
    assert "ambiguous: ids b" in res.output and "no label found: ids c, f" in res.output
