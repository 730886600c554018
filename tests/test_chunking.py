"""Character chunking with overlap at paragraph/sentence/word boundaries (pipeline/corpus/chunking.py)."""

import pytest

from pipeline.corpus.chunking import chunk_text
from pipeline.errors import ConfigError

SENTENCES = [f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(60)]


def _paragraphs(n_par: int, per_par: int) -> str:
    pars = [" ".join(SENTENCES[p * per_par:(p + 1) * per_par]) for p in range(n_par)]
    return "\n\n".join(pars)


def test_zero_chunk_chars_gives_one_chunk_per_document():
    text = _paragraphs(6, 8)
    assert len(text) > 2000
    assert chunk_text(text, 0, 0) == [text]
    assert chunk_text("  short text \n", 1000, 200) == ["short text"]
    assert chunk_text(" \n\t ", 1000, 200) == []


def test_chunks_are_bounded_ordered_substrings_that_cover_the_text():
    text = _paragraphs(6, 8)
    chunks = chunk_text(text, 400, 100)
    assert len(chunks) >= len(text) // 400
    pos = 0
    covered_to = 0
    for c in chunks:
        assert 0 < len(c) <= 400
        start = text.find(c, pos)
        assert start >= 0, "chunk is not an in-order substring of the text"
        assert start <= covered_to + 2, "a gap between consecutive chunks"  # only whitespace may be skipped
        covered_to = start + len(c)
        pos = start + 1
    assert covered_to == len(text.rstrip())


def test_cuts_prefer_paragraph_then_sentence_boundaries():
    text = _paragraphs(6, 4)  # paragraphs of ~240 chars
    for c in chunk_text(text, 400, 0):
        assert c.endswith("."), c[-30:]
        assert c.startswith("Sentence number"), c[:30]
    # With no paragraph break in reach, a chunk still ends at a sentence end.
    flat = " ".join(SENTENCES)
    chunks = chunk_text(flat, 300, 60)
    assert all(c.endswith(".") for c in chunks[:-1])
    # Overlapping chunks start at a sentence start when the overlap contains one.
    assert all(c.startswith("Sentence number") for c in chunks)


def test_overlap_repeats_text_of_previous_chunk():
    flat = " ".join(SENTENCES)
    chunks = chunk_text(flat, 300, 120)
    for a, b in zip(chunks, chunks[1:], strict=False):
        first_sentence = b.split(". ")[0] + "."
        assert first_sentence in a, "the next chunk should begin with text from the end of the previous one"
    no_overlap = chunk_text(flat, 300, 0)
    assert sum(map(len, chunks)) > sum(map(len, no_overlap))


def test_long_word_is_cut_hard_and_progress_is_guaranteed():
    chunks = chunk_text("x" * 2500, 1000, 200)
    assert [len(c) for c in chunks] == [1000, 1000, 900]


def test_deterministic():
    text = _paragraphs(5, 7)
    assert chunk_text(text, 350, 80) == chunk_text(text, 350, 80)


@pytest.mark.parametrize(("chars", "overlap"), [(-1, 0), (100, -5), (100, 100), (100, 150)])
def test_invalid_parameters_raise_config_error(chars, overlap):
    with pytest.raises(ConfigError):
        chunk_text("some text " * 50, chars, overlap)
