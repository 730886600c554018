"""Atomic file writes, JSON bookkeeping files and the input fingerprint."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

_HASH_BLOCK_BYTES = 1 << 20


def _hash_file(p: Path, digest: Any) -> int:
    size_bytes = 0
    with p.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK_BYTES):
            digest.update(block)
            size_bytes += len(block)
    return size_bytes


def input_fingerprint(path: str | Path) -> dict[str, Any]:
    """Size and content hash of the input, streamed in 1 MiB blocks.

    A file: its bytes. A directory (Parquet input of several parts): the ``*.parquet`` files below it in
    sorted relative-path order, each contributing its relative path and its bytes.

    Args:
        path: the input file or directory.

    Returns:
        ``{"size": <int, bytes>, "sha256": <hex str>}`` (plus ``"files": <int>`` for a directory).

    Raises:
        InputError: the input does not exist or cannot be read.
    """
    p = Path(path)
    digest = hashlib.sha256()
    try:
        if p.is_dir():
            files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
            size_bytes = 0
            for f in files:
                digest.update(str(f.relative_to(p)).encode() + b"\0")
                size_bytes += _hash_file(f, digest)
            return {"size": size_bytes, "sha256": digest.hexdigest(), "files": len(files)}
        size_bytes = _hash_file(p, digest)
    except FileNotFoundError:
        raise InputError(f"{p}: input file not found") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read input: {exc.strerror or exc}") from None
    return {"size": size_bytes, "sha256": digest.hexdigest()}


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: ``.NAME.tmp`` beside it + fsync + :func:`os.replace` + fsync of the
    dir (the temporary name is hidden from readers of an output directory: :mod:`pipeline.output.reading`).

    Raises:
        OSError: the directory is not writable (disk full, permissions).
    """
    dest = Path(path)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return dest


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def now() -> str:
    """Current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object file written by this package.

    Raises:
        InputError: the file is missing, not valid JSON or not an object (message names the file).
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: {what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} must be a JSON object")
    return data
