"""Sharding: record ``index`` is the 0-based position of a record among the valid records of the input
(:func:`pipeline.dataset.records.iter_records`: blank and rejected lines/rows are not records; ``--limit`` keeps
``index < limit``); shard ``I/N`` owns the records with ``index % N == I``."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import InputError

SHARD_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")
MERGED_SUFFIX = ".merged"
"""The default merge output of ``ROOT`` is the sibling ``ROOT.merged`` (:func:`default_merge_dir`)."""
_SHARD_ARG_RE = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")


def parse_shard(spec: str) -> tuple[int, int]:
    """Parse ``"I/N"`` (partition I of N, 0-based) into ``(i, n)``.

    Raises:
        InputError: not of the form I/N with integers, N < 1, I < 0 or I >= N.
    """
    m = _SHARD_ARG_RE.match(spec or "")
    if not m:
        raise InputError(f"--shard {spec!r}: expected I/N, e.g. 0/4 (partition I of N, 0-based)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise InputError(f"--shard {spec!r}: N must be >= 1, got {n}")
    if i < 0 or i >= n:
        raise InputError(f"--shard {spec!r}: I must satisfy 0 <= I < N ({n}), got {i}")
    return i, n


def shard_dir(root: str | Path, i: int, n: int) -> Path:
    """Directory of shard ``i`` of ``n`` under the output root: ``root / "shard-{i}-of-{n}"``."""
    return Path(root) / f"shard-{i}-of-{n}"


def in_shard(index: int, i: int, n: int) -> bool:
    """True if the record at 0-based ``index`` belongs to shard ``i`` of ``n`` (``index % n == i``)."""
    return index % n == i


def shard_size(n_records: int, i: int, n: int) -> int:
    """Number of indices ``0 <= index < n_records`` with ``index % n == i`` (records of shard i/n)."""
    return 0 if n_records <= i else (n_records - i + n - 1) // n


def shard_dirs(root: str | Path) -> list[tuple[int, int, Path]]:
    """The ``shard-I-of-N`` directories directly under ``root`` as ``(i, n, path)``, sorted by (n, i)."""
    out = []
    r = Path(root)
    if not r.is_dir():
        return out
    for child in r.iterdir():
        m = SHARD_RE.match(child.name)
        if m and child.is_dir():
            out.append((int(m.group(1)), int(m.group(2)), child))
    return sorted(out, key=lambda t: (t[1], t[0]))


def default_merge_dir(root: str | Path) -> Path:
    """``ROOT.merged``, beside the root (absolute): outside it, so that reading the root and reading the merge
    output each give every record once, whatever reader is used."""
    r = Path(root).resolve()
    return r.with_name(r.name + MERGED_SUFFIX)
