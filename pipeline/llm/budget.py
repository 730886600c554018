"""The context budget rule: how many retrieved passages a prompt carries. Pure functions (no I/O).

A prompt is ``fixed part + passages + reply``, all in tokens of the model that answers it, and must fit the model's
context window (the server's: llama.cpp ``n_ctx`` of one slot, SGLang/vLLM ``max_model_len``)::

    budget_tokens = window_tokens - reserved_tokens            (reserved: fixed part + max_tokens of the reply)
    used = the largest k such that sum(passage_tokens[:k]) <= budget_tokens
                                and sum(passage_chars[:k]) <= max_chars   (when rag.context_chars > 0)

Passages are taken whole and best first: a passage that does not fit ends the context (the ones after it are not
tried, so ``contexts[:used]`` is what the model saw). ``used`` may be 0: not even the best passage fits.

Token counts come from the server's ``/tokenize`` where it has one (:mod:`pipeline.llm.server_tokens`); otherwise
they are estimated at :data:`CHARS_PER_TOKEN` characters per token.
"""

from __future__ import annotations

from collections.abc import Sequence

CHARS_PER_TOKEN = 4
"""Characters per token of the estimate used when the server cannot count: the usual rule of thumb for English
text with the BPE tokenizers of current models (OpenAI's "one token is ~4 characters of English"; measured here:
4.4-5.4 characters per token of SciFact abstracts with SmolLM2's tokenizer, so the estimate errs on the safe side
for such text). Code, numbers and non-Latin scripts have fewer characters per token: with them the estimate can
overrun the window; set ``rag.context_chars`` or use a server with ``/tokenize``."""


def estimate_tokens(text: str) -> int:
    """Tokens of ``text`` estimated as ``ceil(len(text) / CHARS_PER_TOKEN)`` (characters, not bytes)."""
    return -(-len(text) // CHARS_PER_TOKEN)


def passages_that_fit(
    passage_tokens: Sequence[int],
    budget_tokens: int,
    *,
    passage_chars: Sequence[int] = (),
    max_chars: int = 0,
) -> int:
    """The number of leading passages that fit a budget, whole and in order (the module docstring's rule).

    Args:
        passage_tokens: tokens of each passage as it appears in the prompt, best first (ints >= 0).
        budget_tokens: tokens left for passages (may be <= 0: then nothing fits).
        passage_chars: characters of each passage as it appears in the prompt (same length as
            ``passage_tokens``); only read when ``max_chars`` > 0.
        max_chars: most characters of passages in all (``rag.context_chars``); 0 = no character cap.

    Returns:
        ``used``, 0 <= used <= len(passage_tokens).

    Raises:
        ValueError: ``max_chars`` > 0 and ``passage_chars`` is not as long as ``passage_tokens``.
    """
    if max_chars > 0 and len(passage_chars) != len(passage_tokens):
        raise ValueError(f"{len(passage_chars)} passage lengths for {len(passage_tokens)} passages")
    tokens = chars = 0
    for i, n in enumerate(passage_tokens):
        tokens += n
        if tokens > budget_tokens:
            return i
        if max_chars > 0:
            chars += passage_chars[i]
            if chars > max_chars:
                return i
    return len(passage_tokens)


def reserved_tokens(*stages: tuple[int, int]) -> int:
    """Tokens a shared prompt prefix must leave free for every stage that uses it.

    Both LLM calls of a record start with the same passages (the server's prefix cache reuses them), so the
    passages must fit the larger of the two stages' needs.

    Args:
        stages: per stage ``(fixed_tokens, reply_tokens)``: the stage's prompt without passages (chat template
            included) and what it may add after it (its ``max_tokens``, and for the generation the RAG answer's
            ``rag.max_tokens``).

    Returns:
        ``max(fixed + reply)`` over the stages; 0 without stages.
    """
    return max((fixed + reply for fixed, reply in stages), default=0)


__all__ = ["CHARS_PER_TOKEN", "estimate_tokens", "passages_that_fit", "reserved_tokens"]
