"""What a run directory pins: the run's identity and the settings that make its rows.

* **Identity** (:data:`IDENTITY_KEYS`): decides *which* rows the directory holds. A resume with any other value
  is refused (``--overwrite`` or another ``--output``): e.g. a changed ``run.id_field`` would keep the old ids, a
  lower ``run.limit`` would leave committed rows outside the run. The input fingerprint and the shard are
  checked as well (:meth:`pipeline.output.OutputDir.prepare`).
* **Settings** (:data:`SETTING_KEYS` and the prompt templates' content): decide *what* a row says (prompts,
  model, retrieval, generation lengths). A resume with other values would mix rows made two ways; it is refused
  unless the user passes ``--allow-config-change`` (then the change is logged in ``run.json``).

Operational settings (endpoints, ports, process counts, timeouts, part size) may change freely on resume.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pipeline.config import Config

IDENTITY_KEYS: tuple[str, ...] = (
    "run.id_field", "run.query_field", "run.limit", "run.on_bad_record", "run.max_query_chars",
)

SETTING_KEYS: tuple[str, ...] = (
    "store.collection", "retrieval.collections", "retrieval.top_k", "retrieval.min_score",
    "servers.backend", "servers.model", "llm.model", "llm.temperature",
    "rag.mode", "rag.min_answer_chars", "rag.max_tokens", "rag.context_chars",
    "rag.context_window_tokens",
    "generation.max_tokens", "run.deterministic",
)

#: prompt template settings, pinned by the sha256 of the template's text (a moved but identical file is fine).
PROMPT_KEYS: tuple[str, ...] = (
    "rag.prefix_prompt_file", "rag.prompt_file", "generation.prompt_file", "generation.fallback_prompt_file",
)


def _get(cfg: Config, dotted: str) -> Any:
    sec, _, name = dotted.partition(".")
    value = getattr(getattr(cfg, sec), name)
    return list(value) if isinstance(value, tuple) else value  # as stored in JSON


def run_identity(cfg: Config) -> dict[str, Any]:
    """``{dotted key: value}`` of :data:`IDENTITY_KEYS` (JSON-compatible values)."""
    return {k: _get(cfg, k) for k in IDENTITY_KEYS}


def result_settings(cfg: Config) -> dict[str, Any]:
    """``{dotted key: value}`` of :data:`SETTING_KEYS`, plus ``"sha256:<hex>"`` of each prompt template's text.

    Raises:
        ConfigError: a prompt template is missing or invalid (:func:`pipeline.llm.prompts.load_template`).
    """
    from pipeline.llm.prompts import load_template

    out = {k: _get(cfg, k) for k in SETTING_KEYS}
    for k in PROMPT_KEYS:
        text = load_template(_get(cfg, k))
        out[k] = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    return out
