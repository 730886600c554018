"""The context budget rule (pipeline/llm/budget.py) and the split of a joined tokenization into per-text counts
(pipeline/llm/server_tokens.split_pieces), by hand-checked cases."""

from __future__ import annotations

import pytest

from pipeline.llm.budget import CHARS_PER_TOKEN, estimate_tokens, passages_that_fit, reserved_tokens
from pipeline.llm.server_tokens import split_pieces


def test_passages_are_taken_whole_and_best_first():
    # 100 + 200 = 300 fits a budget of 350; the third (50) would fit alone but comes after one that does not
    assert passages_that_fit([100, 200, 100, 50], 350) == 2
    assert passages_that_fit([100, 200, 100, 50], 400) == 3
    assert passages_that_fit([100, 200], 300) == 2  # exactly the budget fits
    assert passages_that_fit([100, 200], 299) == 1


def test_nothing_fits_when_the_best_passage_is_larger_than_the_budget():
    assert passages_that_fit([500, 10, 10], 400) == 0
    assert passages_that_fit([10], 0) == 0 and passages_that_fit([10], -50) == 0
    assert passages_that_fit([], 1000) == 0


def test_every_passage_fits_a_large_budget():
    assert passages_that_fit([300] * 5, 2048) == 5


def test_the_character_cap_applies_to_whole_passages_too():
    tokens, chars = [100, 100, 100], [900, 900, 900]
    assert passages_that_fit(tokens, 10_000, passage_chars=chars, max_chars=2000) == 2
    assert passages_that_fit(tokens, 10_000, passage_chars=chars, max_chars=899) == 0
    assert passages_that_fit(tokens, 150, passage_chars=chars, max_chars=2000) == 1  # the tighter of the two
    assert passages_that_fit(tokens, 10_000, passage_chars=chars, max_chars=0) == 3  # 0: no cap
    with pytest.raises(ValueError, match="2 passage lengths for 3 passages"):
        passages_that_fit(tokens, 10_000, passage_chars=[1, 2], max_chars=10)


def test_the_shared_prefix_reserves_for_the_larger_stage():
    # RAG answer: 80 tokens of prompt + 64 reply = 144; generation: 90 + 64 answer + 64 reply = 218
    assert reserved_tokens((80, 64), (90, 128)) == 218
    assert reserved_tokens((80, 64)) == 144 and reserved_tokens() == 0


def test_the_estimate_rounds_characters_up_to_tokens():
    assert CHARS_PER_TOKEN == 4
    assert [estimate_tokens("x" * n) for n in (0, 1, 4, 5, 1000)] == [0, 1, 1, 2, 250]
    assert estimate_tokens("é" * 4) == 1  # characters, not bytes


def test_a_joined_tokenization_splits_by_the_bytes_of_each_text():
    texts = ["Hello world", " [1] év", "\n[2] foo"]
    # the pieces of "Hello world [1] év\n[2] foo" as llama.cpp's /tokenize with_pieces gives them; "é" is two
    # bytes; one token's bytes are not valid UTF-8 alone and come as a byte list
    tokens = [{"piece": "Hello"}, {"piece": " world"}, {"piece": " ["}, {"piece": "1"}, {"piece": "]"},
              {"piece": [32, 195]}, {"piece": [169]}, {"piece": "v"}, {"piece": "\n"}, {"piece": "["},
              {"piece": "2"}, {"piece": "]"}, {"piece": " foo"}]
    assert split_pieces(texts, tokens) == [2, 6, 5]
    assert sum(split_pieces(texts, tokens)) == len(tokens)


def test_a_token_across_a_boundary_counts_in_the_text_it_starts_in():
    # "ab" + "cd" tokenized as "abc" + "d": the merged token starts in the first text
    assert split_pieces(["ab", "cd"], [{"piece": "abc"}, {"piece": "d"}]) == [1, 1]
    # a tokenizer's added leading space shifts every offset by one byte: the extra byte lands in the last text
    assert split_pieces(["ab", "cd"], [{"piece": " ab"}, {"piece": "cd"}]) == [1, 1]
    assert split_pieces(["x"], []) == [0]
