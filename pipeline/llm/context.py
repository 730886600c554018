"""How many retrieved passages a record's prompts carry: the context budget of :mod:`pipeline.llm.budget`, applied
to the prompts of :mod:`pipeline.llm.prompts` with the counts and window of :mod:`pipeline.llm.server_tokens`.

It runs in the process that builds the prompt: the RAG worker for the RAG answer, the generation process for the
generation. Per prompt it makes at most one ``/tokenize`` request, and none when the prompt surely fits: a token
is at least one byte of UTF-8 text, so a prompt whose bytes plus the reserved tokens fit the window needs no
count.

Both calls of a record share their passages (the shared prefix). The RAG worker therefore sizes the passages for
both stages at once (:func:`pipeline.llm.budget.reserved_tokens`): the RAG answer's tail and ``rag.max_tokens``,
and the generation's tail, the RAG answer (at most ``rag.max_tokens``) and ``generation.max_tokens``; the
generation on the same endpoint then takes the same passages without counting. A generation sent elsewhere
(another endpoint, perhaps another model: ``generation.endpoints``, failover) is sized again on its own endpoint,
never with more passages than the RAG answer had.

Each segment counted apart (the prompt without passages, each stage's tail, each passage) is given
:data:`SLACK_TOKENS` more, for the tokens that merge across a segment boundary in the real prompt.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.llm.budget import estimate_tokens, passages_that_fit, reserved_tokens
from pipeline.llm.prompts import passage_texts, render
from pipeline.llm.server_tokens import ServerTokens

SLACK_TOKENS = 1
"""Tokens added per counted segment (see the module docstring)."""


class ContextSizer:
    """Decides ``contexts_used`` for a record's prompts (the module docstring's rule).

    Args:
        cfg: the run's configuration (``rag.max_tokens``, ``generation.max_tokens``, ``rag.context_chars``,
            ``generation.response_format``).
        templates: :func:`pipeline.llm.prompts.load_templates` of ``cfg``.
        tokens: the process's :class:`pipeline.llm.server_tokens.ServerTokens`.
    """

    def __init__(self, cfg: Config, templates: dict[str, str], tokens: ServerTokens) -> None:
        from pipeline.llm.structured import REASK

        self.cfg = cfg
        self.templates = templates
        self.tokens = tokens
        # a re-asked generation is its prompt + REASK with an error of at most 200 characters
        self.reask_tokens = estimate_tokens(REASK.format(error="x" * 200)) if cfg.generation.response_format else 0

    def for_rag_answer(self, endpoint: str, *, query: str, contexts: list[dict[str, Any]],
                       extra: dict[str, Any] | None = None) -> int:
        """Passages (the first ``n`` of ``contexts``) the RAG answer on ``endpoint`` carries, sized so that the
        generation with the same passages fits too. 0 <= n <= len(contexts)."""
        prefix = render(self.templates["prefix"], query=query, context="", extra=extra)
        rag_tail = render(self.templates["rag"], query=query, extra=extra)
        gen_tail = render(self.templates["generate"], query=query, rag_answer="", extra=extra)
        rag, gen = self.cfg.rag, self.cfg.generation
        return self._fit(endpoint, [prefix, rag_tail, gen_tail], contexts,
                         lambda c: reserved_tokens((c[0] + c[1], rag.max_tokens),
                                                   (c[0] + c[2], rag.max_tokens + gen.max_tokens + self.reask_tokens)))

    def for_generation(self, endpoint: str, *, query: str, contexts: list[dict[str, Any]], rag_answer: str = "",
                       extra: dict[str, Any] | None = None) -> int:
        """Passages (the first ``n`` of ``contexts``) the generation on ``endpoint`` carries, with ``rag_answer``
        in its prompt. 0 <= n <= len(contexts)."""
        prefix = render(self.templates["prefix"], query=query, context="", extra=extra)
        gen_tail = render(self.templates["generate"], query=query, rag_answer=rag_answer, extra=extra)
        reply = self.cfg.generation.max_tokens + self.reask_tokens
        return self._fit(endpoint, [prefix, gen_tail], contexts, lambda c: c[0] + c[1] + reply)

    def _fit(self, endpoint: str, fixed: list[str], contexts: list[dict[str, Any]], reserve: Any) -> int:
        """``passages_that_fit`` with the passages of ``contexts`` after the ``fixed`` segments; ``reserve`` maps the
        fixed segments' token counts to the reserved tokens."""
        if not contexts:
            return 0
        pieces = [p + "\n" for p in passage_texts(contexts)]
        chars = [len(p) for p in pieces]
        info = self.tokens.endpoint(endpoint)
        overhead = info.template_tokens + SLACK_TOKENS * (len(fixed) + len(pieces))
        cap = self.cfg.rag.context_chars
        upper = [len(t.encode("utf-8")) for t in fixed + pieces]  # tokens <= bytes
        if overhead + reserve(upper) + sum(upper[len(fixed):]) <= info.window_tokens:
            return passages_that_fit(upper[len(fixed):], info.window_tokens, passage_chars=chars, max_chars=cap)
        counts = self.tokens.count(endpoint, fixed + pieces)
        budget = info.window_tokens - overhead - reserve(counts)
        return passages_that_fit(counts[len(fixed):], budget, passage_chars=chars, max_chars=cap)


__all__ = ["ContextSizer", "SLACK_TOKENS"]
