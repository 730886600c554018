"""Files that ship with the package: default config, prompt templates, the example corpus and records.

In the source tree they live in ``configs/`` and ``data/example/``; ``pyproject.toml`` maps those directories
into the wheel as the packages ``pipeline.bundled.configs`` and ``pipeline.bundled.example``, so a
non-editable ``pip install .`` finds them with :mod:`importlib.resources` from any directory.

Resolution rule for a path in the configuration (:func:`resolve_bundled`): an absolute path, or a relative path
that exists from the current directory, is the user's file and is used as is; otherwise a relative path under
``configs/`` or ``data/example/`` names the bundled copy. So a user's own ``--config`` and prompt files resolve
relative to where the user points, and the defaults work from any directory.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent
"""The source checkout (only meaningful for an editable install or a run from the tree)."""

BUNDLES = {"configs": "pipeline.bundled.configs", "data/example": "pipeline.bundled.example"}
"""Source-tree directory -> package it is installed as (pyproject.toml [tool.setuptools.package-dir])."""


def bundled_file(rel: str) -> Path | None:
    """The installed (or source-tree) copy of a bundled file such as ``configs/prompts/generate.txt``.

    Returns:
        A filesystem path, or None if ``rel`` is not under a bundled directory or the file does not exist.
    """
    rel = rel.replace("\\", "/")
    if rel.startswith("./"):
        rel = rel[2:]
    for prefix, package in BUNDLES.items():
        if rel.startswith(prefix + "/"):
            inner = rel[len(prefix) + 1 :]
            try:
                res = importlib.resources.files(package).joinpath(inner)
                path = Path(str(res))
                if path.is_file():
                    return path
            except ModuleNotFoundError:
                pass
            src = SOURCE_ROOT / rel  # editable install: the mapping may not be importable
            return src if src.is_file() else None
    return None


def resolve_bundled(path: str | Path) -> Path:
    """Resolve a configured path: the user's file if it exists (absolute, or relative to the current
    directory), else the bundled copy of ``configs/...`` or ``data/example/...``, else the path as given (so the
    caller's error names what the user wrote)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return bundled_file(str(path)) or p


def default_config_file() -> Path | None:
    """The bundled ``configs/default.toml`` (None if missing from a broken install)."""
    return bundled_file("configs/default.toml")
