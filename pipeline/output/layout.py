"""Where an output directory keeps what is not rows: one hidden folder, ``.rag-pipeline/``.

Layout of a run directory (``--output``, a shard ``ROOT/shard-I-of-N``, or a merge's ``ROOT.merged``)::

    part-00000.parquet ...      the committed rows: the only files outside .rag-pipeline/
    .rag-pipeline/
        run.json                input, fingerprint, shard, identity, settings (pipeline.output.rundir)
        manifest.json           the run's report, written at the end of every invocation
        state.json              the live state (pipeline.run.state), read by ``status``
        lock.json               the one-writer lock and its heartbeat (pipeline.output.lock)
        rejected.jsonl          bad input records (``--on-bad-record skip``)
        retry-00000.pending     replacement rows of ``--retry-failed`` until they are applied
        report.html             ``rag-pipeline report``'s default page
        logs/                   one log per process (main.log, rag-0.log, ...)

and of a sharded root, beside its ``shard-I-of-N`` directories: ``.rag-pipeline/input_scan.json`` (the scan the
shards share) and ``.rag-pipeline/slurm/`` (``submit``'s batch scripts, task records and Slurm logs).

Why hidden: the readers of a Parquet directory skip different names. pyarrow and pandas skip ``_`` and ``.``
prefixes; Hugging Face ``datasets.load_dataset("parquet", data_dir=D)`` skips only ``.``-prefixed files and
folders (and ``__``-prefixed folders) and reads every other file as Parquet; DuckDB's ``D/**/*.parquet`` takes
the suffix only. A ``.``-prefixed folder whose files do not end in ``.parquet`` is skipped by all of them, so
each record reads exactly once however the directory is read.

Directories written by earlier versions kept these files at the top with a ``_`` prefix (``_run.json``,
``_logs/``, ...). :func:`locate` finds either (read-only commands work on both), and
:func:`pipeline.output.migrate.migrate` moves the old names into ``.rag-pipeline/`` before a command writes the
directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

META_DIR = ".rag-pipeline"
"""The folder of an output directory that holds everything but the committed rows."""

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"
LOCK_FILE = "lock.json"
REJECTED_FILE = "rejected.jsonl"
REPORT_FILE = "report.html"
LOGS_DIR = "logs"
INPUT_SCAN_FILE = "input_scan.json"
SLURM_DIR = "slurm"

#: a retry part: ``retry-NNNNN.pending`` in :data:`META_DIR` (earlier versions: ``_retry-NNNNN.pending`` or
#: ``retry-NNNNN.parquet`` at the top of the directory).
RETRY_PART_RE = re.compile(r"^(?:retry-(\d{5,})\.pending|_retry-(\d{5,})\.pending|retry-(\d{5,})\.parquet)$")

#: each name above as earlier versions wrote it at the top of the directory.
LEGACY_NAMES = {
    RUN_FILE: "_run.json",
    MANIFEST_FILE: "_manifest.json",
    STATE_FILE: "_state.json",
    LOCK_FILE: "_lock.json",
    REJECTED_FILE: "_rejected.jsonl",
    REPORT_FILE: "_report.html",
    LOGS_DIR: "_logs",
    INPUT_SCAN_FILE: "_input_scan.json",
    SLURM_DIR: "_slurm",
}


def meta_dir(directory: str | Path) -> Path:
    """``directory/.rag-pipeline`` (not created here)."""
    return Path(directory) / META_DIR


def meta_path(directory: str | Path, name: str) -> Path:
    """Where ``name`` (one of the ``*_FILE`` / ``*_DIR`` constants) lives in ``directory``: ``.rag-pipeline/name``.

    Writers use this path; the folder is created by whoever writes first (``OutputDir.prepare``, the lock,
    ``submit``).
    """
    return meta_dir(directory) / name


def locate(directory: str | Path, name: str) -> Path:
    """The path of ``name`` in ``directory`` for a reader: :func:`meta_path`, unless only the earlier
    version's top-level name (:data:`LEGACY_NAMES`) exists, then that one.

    Args:
        directory: a run directory or sharded root; ``name``: one of the ``*_FILE`` / ``*_DIR`` constants.

    Returns:
        A path that may not exist (then :func:`meta_path`'s).
    """
    new = meta_path(directory, name)
    legacy = LEGACY_NAMES.get(name)
    if legacy is None or os.path.lexists(new):
        return new
    old = Path(directory) / legacy
    return old if os.path.lexists(old) else new


def retry_part_index(name: str) -> int | None:
    """The index NNNNN of a retry part's file name (:data:`RETRY_PART_RE`), or None for another name."""
    m = RETRY_PART_RE.match(name)
    return None if m is None else int(next(g for g in m.groups() if g is not None))


def retry_part_path(directory: str | Path, index: int) -> Path:
    """``directory/.rag-pipeline/retry-NNNNN.pending``."""
    return meta_path(directory, f"retry-{index:05d}.pending")


__all__ = [
    "INPUT_SCAN_FILE", "LEGACY_NAMES", "LOCK_FILE", "LOGS_DIR", "MANIFEST_FILE", "META_DIR", "REJECTED_FILE",
    "REPORT_FILE", "RETRY_PART_RE", "RUN_FILE", "SLURM_DIR", "STATE_FILE", "locate", "meta_dir", "meta_path",
    "retry_part_index", "retry_part_path",
]
