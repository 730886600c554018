"""Moving what an earlier version wrote at the top of an output directory into ``.rag-pipeline/``
(:mod:`pipeline.output.layout`), before a command writes the directory."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pipeline.output.layout import (
    LEGACY_NAMES,
    LOCK_FILE,
    META_DIR,
    meta_dir,
    meta_path,
    retry_part_index,
    retry_part_path,
)
from pipeline.output.lock import LockHeld, inspect_lock

log = logging.getLogger(__name__)


def legacy_entries(directory: str | Path, names: tuple[str, ...] | None = None) -> list[tuple[Path, Path]]:
    """What an earlier version left at the top of ``directory``, each with where it belongs now:
    ``[(old path, new path)]`` (bookkeeping names and retry parts; nothing when there is none).

    Args:
        directory: a run directory or sharded root; ``names``: only these names (``*_FILE`` / ``*_DIR``
            constants; retry parts are then left out); None = all.
    """
    d = Path(directory)
    moves = [(d / old, meta_path(d, new)) for new, old in LEGACY_NAMES.items()
             if (names is None or new in names) and os.path.lexists(d / old)]
    if names is not None:
        return moves
    try:
        found = sorted(p.name for p in d.iterdir())
    except OSError:
        found = []
    for name in found:
        k = retry_part_index(name)
        if k is not None:
            moves.append((d / name, retry_part_path(d, k)))
    return moves


def migrate(directory: str | Path, *, stale_s: float = 60.0, names: tuple[str, ...] | None = None) -> list[Path]:
    """Move what an earlier version wrote at the top of ``directory`` into ``.rag-pipeline/``
    (:mod:`pipeline.output.layout`), before a command writes the directory.

    Each move is one :func:`os.rename`; an interrupted migration is finished by the next call, and
    :func:`~pipeline.output.layout.locate` reads the mixed state meanwhile. A name present in both places keeps
    the new one (the old one is deleted).

    Args:
        directory: a run directory or sharded root (need not exist).
        stale_s: the run's ``run.lock_stale_s``, to judge an earlier version's lock.
        names: move only these (see :func:`legacy_entries`); None = everything.

    Returns:
        The new paths of what was moved (empty for a directory written by this version).

    Raises:
        LockHeld: an earlier version's run holds the directory (its ``_lock.json`` is live; checked when
            ``names`` is None).
        OSError: a move failed (the directory is read-only, ...).
    """
    d = Path(directory)
    moves = legacy_entries(d, names)
    if not moves:
        return []
    old_lock = d / LEGACY_NAMES[LOCK_FILE]
    holder = inspect_lock(d, stale_s=stale_s, path=old_lock) if names is None and old_lock.exists() else None
    if holder is not None and holder["alive"]:
        raise LockHeld(f"output dir {d} is in use by a run of an earlier rag-pipeline version (host "
                       f"{holder.get('host')}, pid {holder.get('pid')}; lock file {old_lock}); wait for it to end "
                       "or stop it, then run again")
    meta_dir(d).mkdir(exist_ok=True)
    moved = []
    for old, new in moves:
        try:
            if os.path.lexists(new):
                log.warning("%s: %s exists, removing the earlier version's %s", d, new.name, old.name)
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                else:
                    old.unlink()
                continue
            os.rename(old, new)
        except FileNotFoundError:  # moved by a concurrent migration of the same directory
            continue
        moved.append(new)
    if moved:
        log.info("%s: moved %d bookkeeping entries of an earlier version into %s", d, len(moved), META_DIR)
    return moved


__all__ = ["legacy_entries", "migrate"]
