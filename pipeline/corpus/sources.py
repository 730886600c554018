"""Read the documents of an ingest SOURCE: a folder (recursively) or a single file.

Supported files: ``.txt``, ``.md`` (UTF-8 text), ``.html``/``.htm`` (tags stripped with the stdlib
``html.parser``; ``<script>``/``<style>`` dropped; ``<title>`` used as the title), ``.pdf`` (text of every page,
via pypdf), ``.jsonl`` and ``.jsonl.gz`` (BEIR corpus format, one ``{"_id", "title", "text"}`` object a line).
Hidden files and folders (name starting with ``.``) and other suffixes are ignored.

Document ids: the ``_id`` of a JSONL record; for any other file, its path relative to SOURCE (posix ``/``),
or its file name when SOURCE is that file. Indexed text: ``(title + " " + text).strip()`` (the BEIR convention).

Bad input (``on_error="fail"``, the default) raises :class:`pipeline.errors.InputError` naming the file and,
for JSONL, the 1-based line: missing SOURCE, unreadable or corrupt PDF, a line that is not valid JSON or not an
object, a missing/invalid ``_id`` or ``text``, a duplicate ``_id``, non-UTF-8 bytes, a corrupt gzip stream.
With ``on_error="skip"`` the bad file (or JSONL line) is skipped and listed in :attr:`SourceReport.skipped`.
Documents with no text at all are always skipped (and listed), never an error.

Streaming: :func:`iter_source` yields documents one at a time (folders walked lazily in sorted path order,
JSONL/JSONL.gz read line by line), so memory is one document plus what the duplicate-id check keeps
(:class:`SeenIds`: a dict by default, an on-disk SQLite table for ingest, :class:`SqliteSeenIds`).
:func:`read_source` collects everything into a list, for small callers and tests only.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sqlite3
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from pipeline.errors import InputError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
HTML_SUFFIXES = (".html", ".htm")
PDF_SUFFIXES = (".pdf",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES + JSONL_SUFFIXES
"""File name endings read from a SOURCE folder (case-insensitive)."""


@dataclass(frozen=True)
class Document:
    """One source document.

    Attributes:
        doc_id: unique id (JSONL ``_id`` as a string, or the file's relative path).
        text: the indexed text, ``(title + " " + text).strip()``; never empty.
        source: the file it came from, relative to SOURCE (the file name when SOURCE is a file).
        line: 1-based line of a JSONL record, None for other files.
    """

    doc_id: str
    text: str
    source: str
    line: int | None = None


@dataclass(frozen=True)
class SkippedInput:
    """A file or JSONL line that was not ingested, and why.

    Attributes:
        path: the file as found on disk (for messages).
        source: the file relative to SOURCE (as stored in chunk metadata ``source``).
        line: 1-based line number for JSONL, None when the whole file is concerned.
        reason: one-line explanation.
    """

    path: str
    source: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.reason}"


@dataclass
class SourceReport:
    """What :func:`iter_source` saw, filled while it streams.

    Attributes:
        documents: valid documents yielded.
        skipped: inputs not ingested (bad ones with ``on_error="skip"``, and empty documents).
        files: supported files opened.
    """

    documents: int = 0
    skipped: list[SkippedInput] = field(default_factory=list)
    files: int = 0

    @property
    def skipped_sources(self) -> set[str]:
        """Relative paths of files with at least one skipped bad input (their stored documents are kept)."""
        return {s.source for s in self.skipped if not s.reason.startswith("empty document")}


class SeenIds(Protocol):
    """Duplicate-id detection for one pass over a SOURCE."""

    def first_seen(self, doc_id: str, source: str, line: int | None) -> str | None:
        """Record ``doc_id`` at ``source[:line]``; return where it was first seen if it was seen before, else None."""
        ...


class MemorySeenIds:
    """:class:`SeenIds` in a dict (~150 bytes per id): for small sources."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def first_seen(self, doc_id: str, source: str, line: int | None) -> str | None:
        where = self._seen.get(doc_id)
        if where is None:
            self._seen[doc_id] = f"{source}:{line}" if line is not None else source
        return where


class SqliteSeenIds:
    """:class:`SeenIds` in an on-disk SQLite table (stdlib ``sqlite3``): memory bounded by SQLite's page cache
    whatever the number of documents. Measured cost: a few microseconds per id (bench/ingest.py, rss part).

    Args:
        con: an open connection (the ingest ledger's, or a temporary database); the table ``seen_ids`` is
            created if missing and emptied by :meth:`clear`.
    """

    COMMIT_EVERY = 10_000

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con
        con.execute("CREATE TABLE IF NOT EXISTS seen_ids (doc_id TEXT PRIMARY KEY, source TEXT, line INTEGER)")
        self._pending = 0

    @classmethod
    def temporary(cls, path: str | Path) -> SqliteSeenIds:
        """A new database file at ``path`` (no journal, no fsync: it lives for one pass)."""
        con = sqlite3.connect(str(path), isolation_level=None)
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("PRAGMA synchronous=OFF")
        con.execute("BEGIN")
        return cls(con)

    def clear(self) -> None:
        """Forget every id (start of a new pass)."""
        self.con.execute("DELETE FROM seen_ids")

    def first_seen(self, doc_id: str, source: str, line: int | None) -> str | None:
        cur = self.con.execute("INSERT OR IGNORE INTO seen_ids VALUES (?, ?, ?)", (doc_id, source, line))
        if cur.rowcount == 1:
            return None
        src, ln = self.con.execute("SELECT source, line FROM seen_ids WHERE doc_id = ?", (doc_id,)).fetchone()
        return f"{src}:{ln}" if ln is not None else src

    def close(self) -> None:
        """Close the connection (temporary databases)."""
        self.con.close()


@dataclass
class SourceScan:
    """Everything read from a SOURCE.

    Attributes:
        documents: valid documents in file order (files sorted by path), ids unique.
        skipped: inputs not ingested (bad ones with ``on_error="skip"``, and empty documents).
        files: number of supported files read.
    """

    documents: list[Document] = field(default_factory=list)
    skipped: list[SkippedInput] = field(default_factory=list)
    files: int = 0

    @property
    def skipped_sources(self) -> set[str]:
        """Relative paths of files with at least one skipped bad input (their stored documents are kept)."""
        return {s.source for s in self.skipped if not s.reason.startswith("empty document")}


class _BadInput(Exception):
    """Internal: one bad file or line (converted to InputError or a SkippedInput)."""

    def __init__(self, reason: str, line: int | None = None, whole_file: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line
        self.whole_file = whole_file


def _suffix(path: Path) -> str | None:
    """The supported suffix of ``path`` (``.jsonl.gz`` counts as one), or None."""
    name = path.name.lower()
    for suf in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return None


def _check_root(root: Path) -> None:
    if not root.exists():
        raise InputError(f"{root}: source not found (expected a folder or a .jsonl/.jsonl.gz file)")
    if root.is_file() and _suffix(root) is None:
        raise InputError(f"{root}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})")


def _walk_sorted(folder: Path) -> Iterator[Path]:
    """Supported, non-hidden files under ``folder`` in sorted relative-path order, one directory listing held at a
    time (a directory sorts as ``name + "/"``, which makes the depth-first order equal the full paths' order)."""
    try:
        with os.scandir(folder) as it:
            entries = [(e.name + "/" if e.is_dir() else e.name, e.is_dir()) for e in it if not e.name.startswith(".")]
    except OSError as exc:
        log.warning("cannot list %s: %s", folder, exc.strerror or exc)
        return
    entries.sort()
    for key, is_dir in entries:
        if is_dir:
            yield from _walk_sorted(folder / key[:-1])
        elif _suffix(p := folder / key) is not None:
            yield p
        else:
            log.debug("ignoring %s (unsupported type)", folder / key)


def iter_source_files(source: str | Path) -> Iterator[Path]:
    """Supported files of SOURCE, lazily, sorted by relative path (a single file gives ``source``).

    Raises:
        pipeline.errors.InputError: SOURCE does not exist, is a file of an unsupported type, or (when the walk
            ends) is a folder without any supported file.
    """
    root = Path(source)
    _check_root(root)
    if root.is_file():
        yield root
        return
    n = 0
    for p in _walk_sorted(root):
        n += 1
        yield p
    if not n:
        raise InputError(f"{root}: no supported files in folder (supported: {', '.join(SUPPORTED_SUFFIXES)})")


def list_source_files(source: str | Path) -> list[Path]:
    """:func:`iter_source_files` as a list (small sources). Raises as it does."""
    return list(iter_source_files(source))


def _decode_utf8(data: bytes) -> str:
    """Decode a whole file as UTF-8 (a BOM is dropped); _BadInput names the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _BadInput(f"not valid UTF-8 (byte offset {exc.start})", line=line, whole_file=True) from None


class _HTMLText(HTMLParser):
    """Collects the visible text and the <title> of an HTML page."""

    _SKIP = {"script", "style", "noscript", "template"}
    _BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
              "section", "article", "header", "footer", "pre", "blockquote", "hr", "dd", "dt"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self._skip_depth = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._SKIP:
            self._skip_depth += 1
        elif tag == "title":
            self._in_title = True
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag == "title":
            self._in_title = False
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if self._in_title:
            self.title_parts.append(data)
        else:
            self.parts.append(data)


def _collapse(text: str) -> str:
    """Collapse runs of spaces inside lines and blank-line runs to one paragraph break."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip().replace("\n\n\n", "\n\n")


def html_to_text(html: str) -> tuple[str, str]:
    """Visible text of an HTML page with stdlib ``html.parser``.

    Returns:
        (title, text): the ``<title>`` text and the body text with block elements on their own lines.
    """
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    title = " ".join("".join(parser.title_parts).split())
    return title, _collapse("".join(parser.parts))


def _read_pdf(path: Path) -> str:
    """Text of every page of a PDF, pages separated by a blank line; _BadInput if unreadable/corrupt."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            reader.decrypt("")
        pages = [page.extract_text() or "" for page in reader.pages]
    except OSError as exc:
        raise _BadInput(f"cannot read file: {exc.strerror or exc}", whole_file=True) from None
    except Exception as exc:  # noqa: BLE001 - pypdf raises many exception types on corrupt input
        raise _BadInput(f"corrupt or unreadable PDF ({type(exc).__name__}: {exc})", whole_file=True) from None
    return "\n\n".join(p.strip() for p in pages if p.strip())


def _file_document(path: Path, rel: str, suffix: str) -> Document | None:
    """The one document of a .txt/.md/.html/.pdf file (None if it has no text)."""
    if suffix in PDF_SUFFIXES:
        text = _read_pdf(path)
    else:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _BadInput(f"cannot read file: {exc.strerror or exc}", whole_file=True) from None
        text = _decode_utf8(data)
        if suffix in HTML_SUFFIXES:
            title, body = html_to_text(text)
            text = f"{title} {body}" if title else body
    text = text.strip()
    return Document(doc_id=rel, text=text, source=rel) if text else None


def _parse_record(raw: bytes, lineno: int) -> tuple[str, str] | None:
    """(doc_id, indexed text) of one BEIR JSONL line; None for a blank line; _BadInput otherwise."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise _BadInput(f"not valid UTF-8 (byte {exc.start} of the line)", line=lineno) from None
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _BadInput(f"invalid JSON ({exc.msg} at column {exc.colno})", line=lineno) from None
    if not isinstance(rec, dict):
        raise _BadInput(f"expected a JSON object, got {type(rec).__name__}", line=lineno)
    if "_id" not in rec:
        raise _BadInput("field '_id' is missing", line=lineno)
    doc_id = rec["_id"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id).strip() == "":
        raise _BadInput(f"field '_id' must be a non-empty string or integer, got {doc_id!r}", line=lineno)
    if "text" not in rec:
        raise _BadInput("field 'text' is missing", line=lineno)
    text = rec["text"]
    if not isinstance(text, str):
        raise _BadInput(f"field 'text' must be a string, got {type(text).__name__}", line=lineno)
    title = rec.get("title") or ""
    if not isinstance(title, str):
        raise _BadInput(f"field 'title' must be a string, got {type(title).__name__}", line=lineno)
    return str(doc_id), (title + " " + text).strip()


def _iter_jsonl(path: Path, rel: str, suffix: str, bad: list[_BadInput]) -> Iterator[Document | None]:
    """Documents of a BEIR JSONL(.gz) file; bad lines are appended to ``bad`` (caller decides)."""
    opener = gzip.open if suffix == ".jsonl.gz" else open
    lineno = 0
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):  # noqa: B007 - lineno used after the loop
                try:
                    parsed = _parse_record(raw, lineno)
                except _BadInput as exc:
                    bad.append(exc)
                    yield None
                    continue
                if parsed is None:
                    continue
                doc_id, text = parsed
                if not text:
                    bad.append(_BadInput("empty document (no title or text)", line=lineno))
                    yield None
                    continue
                yield Document(doc_id=doc_id, text=text, source=rel, line=lineno)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _BadInput(f"corrupt gzip stream after line {lineno} ({exc})", line=lineno + 1, whole_file=True) from None
    except OSError as exc:
        raise _BadInput(f"cannot read file: {exc.strerror or exc}", whole_file=True) from None


def iter_source(
    source: str | Path,
    on_error: str = "fail",
    progress: bool = False,
    *,
    seen: SeenIds | None = None,
    report: SourceReport | None = None,
) -> Iterator[Document]:
    """Stream the documents of SOURCE, validated, in file order (files sorted by relative path).

    Memory: one document (a whole .txt/.html/.pdf file, or one JSONL line) plus ``seen``; nothing else is kept
    (``report.skipped`` grows with the number of skipped inputs only).

    Args:
        source: a folder (walked recursively and lazily) or a single supported file.
        on_error: ``"fail"``: the first bad file or line raises; ``"skip"``: it is skipped, listed in
            ``report.skipped`` and logged as a warning. A bad file found part-way (a gzip stream corrupt after
            N good lines) has its first documents yielded already.
        progress: show a tqdm bar over documents read.
        seen: duplicate-id detection for this pass (default :class:`MemorySeenIds`; ingest passes
            :class:`SqliteSeenIds` so that 21M ids do not live in memory). A duplicate ``_id`` is a bad input
            (the first occurrence wins).
        report: filled with counts and skipped inputs while streaming.

    Yields:
        :class:`Document` with unique ids.

    Raises:
        pipeline.errors.InputError: with ``on_error="fail"``, the first bad input (message
            ``<file>[:<line>]: <reason>``); in both modes a missing SOURCE, an unsupported single file, a folder
            without supported files, or (at the end) a SOURCE that yielded no document at all.
        pipeline.errors.ConfigError: ``on_error`` is not ``fail`` or ``skip``.
    """
    from pipeline.config import choices
    from pipeline.errors import ConfigError

    allowed = choices("ingest.on_error")
    if on_error not in allowed:
        raise ConfigError(f"on_error must be one of {', '.join(allowed)}, got {on_error!r}")
    root = Path(source)
    report = report if report is not None else SourceReport()
    seen = seen if seen is not None else MemorySeenIds()
    bar = tqdm(desc="reading", unit="doc", disable=not progress, leave=False)

    def reject(path: Path, rel: str, exc: _BadInput) -> None:
        item = SkippedInput(path=str(path), source=rel, line=exc.line, reason=exc.reason)
        empty = exc.reason.startswith("empty document")
        if on_error == "fail" and not empty:
            raise InputError(str(item))
        log.warning("skipped %s", item)
        report.skipped.append(item)

    def accept(path: Path, doc: Document) -> bool:
        first = seen.first_seen(doc.doc_id, doc.source, doc.line)
        if first is not None:
            reject(path, doc.source, _BadInput(f"duplicate _id {doc.doc_id!r} (first at {first})", line=doc.line))
            return False
        report.documents += 1
        bar.update(1)
        return True

    try:
        for path in iter_source_files(root):
            report.files += 1
            rel = path.name if path == root else path.relative_to(root).as_posix()
            suffix = _suffix(path)
            assert suffix is not None
            try:
                if suffix in JSONL_SUFFIXES:
                    bad: list[_BadInput] = []
                    for doc in _iter_jsonl(path, rel, suffix, bad):
                        if doc is None:
                            reject(path, rel, bad.pop())
                        elif accept(path, doc):
                            yield doc
                else:
                    doc = _file_document(path, rel, suffix)
                    if doc is None:
                        reject(path, rel, _BadInput("empty document (no text)"))
                    elif accept(path, doc):
                        yield doc
            except _BadInput as exc:
                reject(path, rel, exc)
    finally:
        bar.close()
    if not report.documents:
        raise InputError(f"{root}: no document to ingest ({len(report.skipped)} input(s) skipped)")


def read_source(source: str | Path, on_error: str = "fail", progress: bool = False) -> SourceScan:
    """Read and validate every document of SOURCE into memory (:func:`iter_source` collected; small sources
    and tests only: ingest streams).

    Returns:
        The documents (unique ids) and the skipped inputs.

    Raises:
        As :func:`iter_source`.
    """
    report = SourceReport()
    docs = list(iter_source(source, on_error, progress, report=report))
    return SourceScan(documents=docs, skipped=report.skipped, files=report.files)
