"""Prompt templates (configs/prompts/*.txt) and the two prompts of a record.

Both LLM calls of a record (the RAG answer in its RAG worker, the generation in the generation pool) start with
the same bytes: the *shared prefix* (``rag.prefix_prompt_file``: the fixed instructions, then the retrieved
context, then the query), followed by the stage-specific part (``rag.prompt_file`` for the RAG answer,
``generation.prompt_file`` for the generation). Main sends a record's generation to the endpoint that produced
its RAG answer while that endpoint is healthy, so the server's prefix cache (SGLang's RadixAttention, llama.cpp's
prompt cache) holds the KV cache of the instructions + context when the second call arrives and only the short
stage-specific tail is prefilled again. Prompts built here are the only prompts the pipeline sends; the test of
the shared prefix builds both with these functions.

Templates use ``str.format`` fields: ``{query}``, ``{context}``, ``{rag_answer}`` and any passthrough field of
the record (an unknown field renders empty).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError
from pipeline.resources import resolve_bundled

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.messages import RagResult

KNOWN_FIELDS = {"query", "context", "rag_answer"}


def resolve_template_path(path: str) -> Path:
    """A relative path to a bundled file (prompt template, example corpus) is looked up in the current
    directory, then among the files shipped with the package (:func:`pipeline.resources.resolve_bundled`)."""
    return resolve_bundled(path)


def load_template(path: str) -> str:
    """Read a template file.

    Raises:
        ConfigError: the file is missing or is not a valid ``str.format`` template.
    """
    p = resolve_template_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read prompt template: {exc.strerror}") from None
    try:
        list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ConfigError(f"{p}: invalid prompt template: {exc}") from None
    return text


class _Fields(dict):
    def __missing__(self, key: str) -> str:  # an unknown field renders empty instead of failing a record
        return ""


def render(template: str, *, query: str, context: str = "", rag_answer: str = "", extra: dict[str, Any] | None = None) -> str:
    """Fill a template. Unknown fields render as empty strings."""
    values = _Fields({k: ("" if v is None else v) for k, v in (extra or {}).items()})
    values.update(query=query, context=context, rag_answer=rag_answer)
    return template.format_map(values)


def load_templates(cfg: Any) -> dict[str, str]:
    """The four templates of a configuration: ``prefix``, ``rag``, ``generate``, ``no_context``.

    Raises:
        ConfigError: a template file is missing or invalid.
    """
    return {
        "prefix": load_template(cfg.rag.prefix_prompt_file),
        "rag": load_template(cfg.rag.prompt_file),
        "generate": load_template(cfg.generation.prompt_file),
        "no_context": load_template(cfg.generation.fallback_prompt_file),
    }


def passage_texts(contexts: list[dict[str, Any]]) -> list[str]:
    """Each passage as the prompt shows it: ``[i] text`` (1-based rank, the text stripped), best first."""
    return [f"[{i}] {c['text'].strip()}" for i, c in enumerate(contexts, start=1)]


def format_context(contexts: list[dict[str, Any]]) -> str:
    """The passages of a prompt: :func:`passage_texts` joined by newlines (every passage given, whole)."""
    return "\n".join(passage_texts(contexts))


def shared_prefix(templates: dict[str, str], *, query: str, contexts: list[dict[str, Any]],
                  extra: dict[str, Any] | None = None) -> str:
    """The bytes both LLM calls of a record start with: instructions, the given passages (numbered, whole), query.

    ``contexts`` are the passages the prompt carries: the first ``contexts_used`` of the record's retrieved ones
    (:mod:`pipeline.llm.context` decides how many fit the model's context window)."""
    return render(templates["prefix"], query=query, context=format_context(contexts), extra=extra)


def rag_answer_prompt(templates: dict[str, str], *, query: str, contexts: list[dict[str, Any]],
                      extra: dict[str, Any] | None = None) -> str:
    """Prompt of the RAG answer: the shared prefix with ``contexts``, then ``rag.prompt_file``."""
    prefix = shared_prefix(templates, query=query, contexts=contexts, extra=extra)
    return prefix + render(templates["rag"], query=query, extra=extra)


def generation_prompt(templates: dict[str, str], *, query: str, rag: RagResult, contexts_used: int,
                      extra: dict[str, Any] | None = None) -> str:
    """Prompt of the generation, from the record's :class:`pipeline.messages.RagResult`.

    After ``rag_status`` "ok" with ``contexts_used`` > 0: the shared prefix with the first ``contexts_used`` passages
    (the same bytes as the RAG-answer prompt's start when it carried as many), then ``generation.prompt_file``
    with the RAG answer. Otherwise (a soft failure, or no passage fits the model's window):
    ``generation.fallback_prompt_file`` with the query alone, no context.
    """
    if rag.rag_status != "ok" or contexts_used <= 0:
        return render(templates["no_context"], query=query, extra=extra)
    prefix = shared_prefix(templates, query=query, contexts=rag.contexts[:contexts_used], extra=extra)
    return prefix + render(templates["generate"], query=query, rag_answer=rag.rag_answer or "", extra=extra)
