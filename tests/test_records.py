"""Input validation: every bad-input class gives file:line and the field; skip mode collects them."""

import json

import pytest

from pipeline.dataset.records import iter_records, scan_input
from pipeline.errors import InputError


def write(tmp_path, lines, name="in.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return p


GOOD = json.dumps({"id": "a", "query": "what is x?", "n": 1})


@pytest.mark.parametrize(
    "bad, expect",
    [
        ("{not json", "2: malformed JSON"),
        ("[1, 2]", "2: expected a JSON object, got list"),
        (json.dumps({"id": "b"}), "2: field 'query': missing or empty"),
        (json.dumps({"id": "b", "query": "   "}), "2: field 'query': missing or empty"),
        (json.dumps({"query": "q"}), "2: field 'id': missing"),
        (json.dumps({"id": "a", "query": "again"}), "2: field 'id': duplicate id 'a' (first on line 1)"),
        (b'{"id": "b", "query": "caf\xe9"}', "2: not valid UTF-8"),
        (json.dumps({"id": "b", "query": "x" * 9000}), "2: field 'query': query has 9000 characters"),
    ],
)
def test_each_bad_line_names_file_line_and_field(tmp_path, bad, expect):
    p = write(tmp_path, [GOOD, bad])
    with pytest.raises(InputError) as ei:
        scan_input(p)
    assert str(ei.value).startswith(f"{p}:")
    assert expect in str(ei.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(InputError, match="no valid records"):
        scan_input(write(tmp_path, []))
    with pytest.raises(InputError, match="not found"):
        scan_input(tmp_path / "nope.jsonl")


def test_skip_mode_collects_rejected_lines_and_streams_the_rest(tmp_path):
    p = write(tmp_path, [GOOD, "{bad", json.dumps({"id": 7, "query": "q7", "tags": ["x"], "n": 2.5})])
    scan = scan_input(p, on_bad_record="skip")
    assert scan.n_valid == 2
    assert [r["line"] for r in scan.rejected] == [2]
    assert "malformed JSON" in scan.rejected[0]["error"]
    assert scan.extra_types == {"n": "float64", "tags": "json"}
    recs = list(iter_records(scan))
    assert [(r.index, r.line, r.id) for r in recs] == [(0, 1, "a"), (1, 3, "7")]


def test_passthrough_field_named_like_an_output_column_is_renamed(tmp_path):
    p = write(tmp_path, [json.dumps({"id": "a", "query": "q", "generation": "old"})])
    scan = scan_input(p)
    assert scan.extra_types == {"input_generation": "string"}
    assert next(iter_records(scan)).extra == {"input_generation": "old"}


def test_custom_id_and_query_fields(tmp_path):
    p = write(tmp_path, [json.dumps({"uid": 1, "question": "why?"})])
    scan = scan_input(p, id_field="uid", query_field="question")
    rec = next(iter_records(scan, id_field="uid", query_field="question"))
    assert (rec.id, rec.query, rec.extra) == ("1", "why?", {})
