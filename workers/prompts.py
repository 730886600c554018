"""Prompt templates (configs/prompts/*.txt): fixed instructions first, then context, then the record.

That order keeps the long shared prefix identical across requests so servers' prefix caching (SGLang's
RadixAttention, llama.cpp's prompt cache) can reuse it. Templates use ``str.format`` fields:
``{query}``, ``{context}``, ``{rag_answer}`` and any passthrough field of the record.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.resources import resolve_bundled

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


def format_context(contexts: list[dict[str, Any]], max_chars: int) -> str:
    """Numbered passages ``[1] text`` in rank order, cut to at most ``max_chars`` characters in total."""
    parts: list[str] = []
    used = 0
    for i, c in enumerate(contexts, start=1):
        piece = f"[{i}] {c['text'].strip()}"
        if used + len(piece) > max_chars:
            piece = piece[: max(0, max_chars - used)]
        if not piece:
            break
        parts.append(piece)
        used += len(piece) + 1
    return "\n".join(parts)
