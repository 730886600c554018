"""Reading SOURCE folders and files, and the error for each class of bad input (pipeline/corpus/sources.py)."""

import gzip
import json

import pytest

from pipeline.corpus.sources import html_to_text, read_source
from pipeline.errors import InputError
from tests.fixtures.store import make_pdf, write_small_corpus


def test_folder_reads_every_supported_type_recursively(tmp_path):
    root = write_small_corpus(tmp_path / "src")
    make_pdf(root / "papers" / "etna.pdf", ["Mount Etna erupted in 2021.", "Lava reached the sea."])
    with gzip.open(root / "more.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"_id": 7, "title": "Gz", "text": "Compressed BEIR document."}) + "\n")
    (root / ".hidden.txt").write_text("hidden file", encoding="utf-8")
    (root / ".git").mkdir()
    (root / ".git" / "x.txt").write_text("inside a hidden folder", encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG not text")

    scan = read_source(root)
    docs = {d.doc_id: d for d in scan.documents}
    assert set(docs) == {"bread.md", "chess/openings.html", "sat-1", "sat-2", "volcano.txt", "7", "papers/etna.pdf"}
    assert scan.skipped == [] and scan.files == 6
    # BEIR: indexed text = title + " " + text; the source is the file relative to SOURCE.
    assert docs["sat-2"].text.startswith("Orbital decay Atmospheric drag")
    assert docs["sat-2"].source == "corpus/sat.jsonl" and docs["sat-2"].line == 2
    assert docs["7"].text == "Gz Compressed BEIR document."
    # HTML: title kept, tags, scripts and styles dropped, entities decoded.
    html = docs["chess/openings.html"].text
    assert html.startswith("Chess openings The Sicilian Defence")
    assert "flank & aims" in html and "<p>" not in html and "not indexed" not in html and "color" not in html
    assert "Mount Etna erupted in 2021." in docs["papers/etna.pdf"].text
    assert docs["volcano.txt"].text.startswith("Volcanoes form") and docs["volcano.txt"].line is None


def test_single_jsonl_file_source(tmp_path):
    root = write_small_corpus(tmp_path / "src")
    scan = read_source(root / "corpus" / "sat.jsonl")
    assert [d.doc_id for d in scan.documents] == ["sat-1", "sat-2"]
    assert scan.documents[0].source == "sat.jsonl"


def test_html_to_text_blocks_on_their_own_lines():
    title, text = html_to_text("<title> T </title><div>a</div><div>b <b>c</b></div><script>x</script>")
    assert title == "T"
    assert text == "a\n\nb c"  # block elements are paragraphs (chunking prefers to cut there)


def _bad_jsonl(tmp_path, line2: bytes):
    p = tmp_path / "src" / "docs.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b'{"_id": "ok", "text": "fine"}\n' + line2 + b"\n" + b'{"_id": "ok2", "text": "fine too"}\n')
    return p


BAD_LINES = {
    "invalid-json": (b'{"_id": "a", "text": ', "invalid JSON"),
    "not-object": (b'["a", "b"]', "expected a JSON object"),
    "missing-id": (b'{"title": "t", "text": "x"}', "field '_id' is missing"),
    "missing-text": (b'{"_id": "b", "title": "t"}', "field 'text' is missing"),
    "bad-text-type": (b'{"_id": "b", "text": 5}', "field 'text' must be a string"),
    "non-utf8": (b'{"_id": "b", "text": "caf\xe9"}', "not valid UTF-8"),
    "duplicate-id": (b'{"_id": "ok", "text": "again"}', "duplicate _id 'ok'"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_jsonl_line_names_file_and_line(tmp_path, case):
    raw, reason = BAD_LINES[case]
    p = _bad_jsonl(tmp_path, raw)
    with pytest.raises(InputError) as err:
        read_source(tmp_path / "src")
    msg = str(err.value)
    assert msg.startswith(f"{p}:2: "), msg
    assert reason in msg
    assert "\n" not in msg


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_skip_mode_skips_the_bad_line_and_lists_it(tmp_path, case):
    raw, reason = BAD_LINES[case]
    p = _bad_jsonl(tmp_path, raw)
    scan = read_source(p, on_error="skip")
    assert [d.doc_id for d in scan.documents] == ["ok", "ok2"]
    assert len(scan.skipped) == 1
    assert scan.skipped[0].line == 2 and reason in scan.skipped[0].reason
    assert str(scan.skipped[0]).startswith(f"{p}:2: ")


def test_missing_source(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path / 'nope'}: source not found"):
        read_source(tmp_path / "nope")


def test_corrupt_pdf_names_the_file(tmp_path):
    root = write_small_corpus(tmp_path / "src")
    bad = root / "broken.pdf"
    bad.write_bytes(b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R\n")  # truncated
    with pytest.raises(InputError) as err:
        read_source(root)
    assert str(err.value).startswith(f"{bad}: corrupt or unreadable PDF")
    scan = read_source(root, on_error="skip")
    assert [s.path for s in scan.skipped] == [str(bad)]
    assert len(scan.documents) == 5


def test_non_utf8_text_file_names_file_and_line(tmp_path):
    root = write_small_corpus(tmp_path / "src")
    bad = root / "latin1.txt"
    bad.write_bytes("line one\nline two\nna\xefve caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=rf"^{bad}:3: not valid UTF-8"):
        read_source(root)


def test_corrupt_gzip_names_the_file(tmp_path):
    p = tmp_path / "c.jsonl.gz"
    data = gzip.compress(b"".join(b'{"_id": "%d", "text": "document %d"}\n' % (i, i) for i in range(2000)))
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"^{p}:\d+: corrupt gzip stream"):
        read_source(p)


def test_empty_documents_are_skipped_not_errors(tmp_path):
    root = write_small_corpus(tmp_path / "src")
    (root / "empty.txt").write_text("   \n", encoding="utf-8")
    scan = read_source(root)  # on_error=fail: still not an error
    assert len(scan.documents) == 5
    assert [s.source for s in scan.skipped] == ["empty.txt"]


@pytest.mark.parametrize("setup", ["no-supported-files", "all-bad", "unsupported-single-file"])
def test_nothing_to_ingest_is_an_error(tmp_path, setup):
    src = tmp_path / "src"
    src.mkdir()
    if setup == "no-supported-files":
        (src / "a.csv").write_text("x,y\n", encoding="utf-8")
    elif setup == "all-bad":
        (src / "a.jsonl").write_text("not json\n", encoding="utf-8")
    else:
        src = src / "a.csv"
        src.write_text("x,y\n", encoding="utf-8")
    with pytest.raises(InputError, match=str(src)):
        read_source(src, on_error="skip")
