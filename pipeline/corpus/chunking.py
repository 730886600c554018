"""Character chunking with overlap that prefers to cut at paragraph, then sentence, then word boundaries.

A chunk is at most ``chunk_chars`` characters (before stripping surrounding whitespace). The cut is placed at
the last paragraph break in the second half of the window if there is one, else at the last sentence end,
else the last line break, else the last whitespace, else exactly at ``chunk_chars`` (one very long word).
The next chunk starts up to ``chunk_overlap`` characters before the cut, moved forward to the first sentence
start (else word start) inside that overlap, so chunks do not begin in the middle of a word.
"""

from __future__ import annotations

import re

from pipeline.errors import ConfigError

# Boundary patterns, most preferred first. A cut is placed at the END of the match (after the whitespace),
# so the current chunk keeps its final punctuation and the next one starts at a non-space character.
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_LINE = re.compile(r"\n\s*")
_SPACE = re.compile(r"\s+")
_CUT_PATTERNS = (_PARAGRAPH, _SENTENCE, _LINE, _SPACE)


def check_chunking(chunk_chars: int, chunk_overlap: int) -> None:
    """Validate chunking parameters.

    Raises:
        pipeline.errors.ConfigError: ``chunk_chars < 0``, ``chunk_overlap < 0``, or
            ``chunk_overlap >= chunk_chars`` while chunking is on (``chunk_chars > 0``).
    """
    if chunk_chars < 0:
        raise ConfigError(f"chunk_chars must be >= 0 (0 = one chunk per document), got {chunk_chars}")
    if chunk_overlap < 0:
        raise ConfigError(f"chunk_overlap must be >= 0, got {chunk_overlap}")
    if chunk_chars > 0 and chunk_overlap >= chunk_chars:
        raise ConfigError(f"chunk_overlap ({chunk_overlap}) must be smaller than chunk_chars ({chunk_chars})")


def _last_match_end(text: str, lo: int, hi: int) -> int | None:
    """End of the last boundary match inside text[lo:hi], by pattern preference; None if there is none."""
    for pat in _CUT_PATTERNS:
        end = None
        for m in pat.finditer(text, lo, hi):
            end = m.end()
        if end is not None and end > lo:
            return end
    return None


def _overlap_start(text: str, lo: int, hi: int) -> int:
    """Start of the next chunk inside the overlap text[lo:hi]: the first sentence start, else ``lo`` if it
    starts a word, else the first word start, else ``lo`` (no boundary: cut inside a word)."""
    m = _SENTENCE.search(text, lo, hi)
    if m is not None and m.end() < hi:
        return m.end()
    if text[lo - 1].isspace() and not text[lo].isspace():
        return lo
    m = _SPACE.search(text, lo, hi)
    if m is not None and m.end() < hi:
        return m.end()
    return lo


def chunk_text(text: str, chunk_chars: int = 1000, chunk_overlap: int = 200) -> list[str]:
    """Split a document's text into overlapping character chunks.

    Args:
        text: the document's indexed text.
        chunk_chars: maximum chunk length in characters; 0 = the whole text is one chunk.
        chunk_overlap: characters (at most) that consecutive chunks share.

    Returns:
        The chunks, each stripped of surrounding whitespace, in document order; empty chunks are dropped
        (an all-whitespace text gives ``[]``). Deterministic: the same input always gives the same chunks.

    Raises:
        pipeline.errors.ConfigError: invalid parameters (see :func:`check_chunking`).
    """
    check_chunking(chunk_chars, chunk_overlap)
    if chunk_chars == 0 or len(text) <= chunk_chars:
        stripped = text.strip()
        return [stripped] if stripped else []
    chunks: list[str] = []
    n = len(text)
    start = 0
    while start < n:
        hard_end = start + chunk_chars
        if hard_end >= n:
            end = n
        else:
            # Only accept a boundary in the second half of the window, so chunks stay reasonably long.
            end = _last_match_end(text, start + chunk_chars // 2, hard_end) or hard_end
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= n:
            break
        next_start = end
        if chunk_overlap > 0:
            lo = max(end - chunk_overlap, start + 1)
            next_start = _overlap_start(text, lo, end)
        start = next_start
    return chunks
