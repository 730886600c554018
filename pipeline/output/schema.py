"""The output row schema: the ONE place that defines the columns of a result row.

Every other module (the run's commit, input validation's reserved names, status, merge, ARCHITECTURE.md)
refers to :data:`FIXED_COLUMNS` / :func:`row_schema` here. One Parquet row per valid input record::

    id, query, <passthrough columns of the input>, contexts, contexts_used, rag_answer, rag_status, rag_error,
    generation, generation_json, gen_status, gen_error, attempts, endpoint, retrieve_ms, rag_llm_ms, generate_ms, model,
    rag_prompt_tokens, rag_completion_tokens, rag_finish_reason, gen_prompt_tokens, gen_completion_tokens,
    gen_finish_reason, input_index

Passthrough columns keep their input type: for JSONL the type is unified over the whole input
(string, int64, float64, bool; nested or mixed values as a JSON string); for Parquet input the column's own
Arrow type. A passthrough field named like an output column is stored as ``input_<name>``.

The token and finish-reason columns (:data:`USAGE_COLUMNS`), ``input_index`` (:data:`INDEX_COLUMN`) and
``contexts_used`` came later than the others (:data:`LATER_COLUMNS`): parts written before them lack them, and a run
directory keeps the columns it started with (:func:`schema_of_run`), so an older run resumed by this version goes on
without them. Readers (status, merge, manifest, eval-answers) read such parts as nulls; ``merge --ordered`` refuses
them.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

#: element of the ``contexts`` list: one retrieved chunk.
CONTEXT_TYPE = pa.struct(
    [("doc_id", pa.string()), ("chunk_id", pa.string()), ("text", pa.string()), ("score", pa.float32()),
     ("dense_rank", pa.int32()), ("bm25_rank", pa.int32())]
)

#: (name, Arrow type, meaning) of the columns every row has; ``id`` and ``query`` come first, then the
#: passthrough columns, then the rest in this order.
FIXED_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("id", pa.string(), "the record id (run.id_field), as a string"),
    ("query", pa.string(), "the query (run.query_field)"),
    ("contexts", pa.list_(CONTEXT_TYPE),
     "retrieved chunks, best first: score float32 (cosine similarity in dense mode, the fused RRF score in hybrid, "
     "BM25 in bm25 mode), dense_rank / bm25_rank int32 (1-based rank in each source ranking, null if absent)"),
    ("contexts_used", pa.int32(),
     "how many of the first contexts the record's prompts carried: the passages that fit the model's context "
     "window (and rag.context_chars), whole, best first; fewer than len(contexts) = context cut to fit; null = no "
     "prompt carried passages (nothing retrieved, or the query went alone after a soft failure)"),
    ("rag_answer", pa.string(), "grounded answer from the RAG worker's own endpoint (rag.mode retrieve+answer)"),
    ("rag_status", pa.string(),
     "ok | soft_fail (no passage above min_score, answer too short, a failing extra source) | hard_fail "
     "(store error, LLM timeout / connection error / 5xx after retries and failover)"),
    ("rag_error", pa.string(), "why, for soft and hard failures"),
    ("generation", pa.string(), "the generated text"),
    ("generation_json", pa.string(),
     "with generation.response_format: the reply parsed and validated against the JSON Schema, as compact JSON"),
    ("gen_status", pa.string(),
     "ok | failed (after retries/failover) | skipped (after a RAG hard failure) | invalid_output (the reply never "
     "matched generation.response_format)"),
    ("gen_error", pa.string(), "why"),
    ("attempts", pa.int32(), "LLM request attempts for the record (RAG answer + generation, retries included)"),
    ("endpoint", pa.string(), "endpoint that produced the generation (else the RAG answer)"),
    ("retrieve_ms", pa.float64(), "wall time of the retrieval micro-batch the record was in, ms"),
    ("rag_llm_ms", pa.float64(), "RAG-answer request latency (retries included), ms"),
    ("generate_ms", pa.float64(), "generation request latency (retries included), ms"),
    ("model", pa.string(),
     "the model's name: the id the endpoint reports, a file path reduced to its file name (no .gguf)"),
    ("rag_prompt_tokens", pa.int32(),
     "prompt tokens of the RAG answer (the server's usage, summed over its replies); null without a reply"),
    ("rag_completion_tokens", pa.int32(), "completion tokens of the RAG answer; null without a reply"),
    ("rag_finish_reason", pa.string(),
     "why the RAG answer ended, as the server says: stop | length (cut by rag.max_tokens) | ...; null without "
     "a reply"),
    ("gen_prompt_tokens", pa.int32(),
     "prompt tokens of the generation, summed over its replies (re-asks included); null without a reply"),
    ("gen_completion_tokens", pa.int32(), "completion tokens of the generation, summed over its replies"),
    ("gen_finish_reason", pa.string(),
     "why the last generation reply ended: stop | length (cut by generation.max_tokens) | ...; null without a "
     "reply"),
    ("input_index", pa.int64(),
     "0-based position of the record among the input's valid records (blank and rejected lines are not records), "
     "global across shards: sorting by it gives the input order"),
)

_HEAD = ("id", "query")
COLUMN_TYPES: dict[str, pa.DataType] = {name: t for name, t, _ in FIXED_COLUMNS}
COLUMN_DOCS: dict[str, str] = {name: doc for name, _, doc in FIXED_COLUMNS}

#: output column names a passthrough input field may not shadow (it is stored as ``input_<name>``).
RESERVED_COLUMNS = frozenset(COLUMN_TYPES)

#: the status columns counted by status, merge and the manifest.
STATUS_COLUMNS = ("rag_status", "gen_status")
#: the per-stage latency columns summarised in the manifest.
LATENCY_COLUMNS = {"retrieve": "retrieve_ms", "rag_llm": "rag_llm_ms", "generate": "generate_ms"}
#: the error columns grouped in the manifest.
ERROR_COLUMNS = ("rag_error", "gen_error")
#: per LLM stage: (prompt tokens, completion tokens, finish reason) columns, summed and counted in the manifest.
STAGE_USAGE_COLUMNS = {
    "rag": ("rag_prompt_tokens", "rag_completion_tokens", "rag_finish_reason"),
    "gen": ("gen_prompt_tokens", "gen_completion_tokens", "gen_finish_reason"),
}
#: the latency column of each LLM stage of :data:`STAGE_USAGE_COLUMNS` (tokens per second of request time).
STAGE_LATENCY_COLUMNS = {"rag": "rag_llm_ms", "gen": "generate_ms"}
#: the setting that bounds each LLM stage's reply (raise it when replies end with finish_reason "length").
STAGE_MAX_TOKENS_SETTING = {"rag": "rag.max_tokens", "gen": "generation.max_tokens"}
#: every token and finish-reason column (absent from parts written before they existed).
USAGE_COLUMNS = tuple(c for cols in STAGE_USAGE_COLUMNS.values() for c in cols)
#: the record's position in the input (absent from parts written before it existed; ``merge --ordered`` needs it).
INDEX_COLUMN = "input_index"
#: the columns a run directory started by an earlier version may lack (it keeps the columns it started with).
LATER_COLUMNS = (*USAGE_COLUMNS, INDEX_COLUMN, "contexts_used")

#: Arrow type of each JSONL passthrough type name (records.py infers these; "json" = nested/mixed values as
#: a JSON string).
JSON_TYPE_NAMES: dict[str, pa.DataType] = {
    "string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(), "json": pa.string(),
}


def passthrough_name(field: str) -> str:
    """Output column of an input field: the field's name, or ``input_<name>`` if it is an output column."""
    return f"input_{field}" if field in RESERVED_COLUMNS else field


def arrow_type(t: str | pa.DataType) -> pa.DataType:
    """Arrow type of a passthrough column: a JSONL type name (:data:`JSON_TYPE_NAMES`) or an Arrow type.

    Raises:
        KeyError: an unknown type name.
    """
    return t if isinstance(t, pa.DataType) else JSON_TYPE_NAMES[t]


def row_schema(extra_types: dict[str, Any] | None = None) -> pa.Schema:
    """Arrow schema of a result row: ``id, query, <passthrough...>, contexts, ..., model``.

    Args:
        extra_types: passthrough output column -> JSONL type name or Arrow type, in input order.

    Returns:
        The schema (Parquet parts of one run all have it).
    """
    fields = [pa.field(n, COLUMN_TYPES[n]) for n in _HEAD]
    fields += [pa.field(k, arrow_type(t)) for k, t in (extra_types or {}).items()]
    fields += [pa.field(n, t) for n, t, _ in FIXED_COLUMNS if n not in _HEAD]
    return pa.schema(fields)


def schema_of_run(extra_types: dict[str, Any] | None, existing: pa.Schema | None) -> pa.Schema:
    """The schema new rows of a run directory are written with: :func:`row_schema`, less the
    :data:`LATER_COLUMNS` that the directory's committed parts lack.

    A run directory keeps the columns it started with, so that every part of it has one schema (tools that
    read a directory with the first part's schema, or refuse differing parts, see all rows the same way).

    Args:
        extra_types: as for :func:`row_schema`.
        existing: the schema of a committed part of the directory, or None when it has none yet.

    Returns:
        The schema; equal to ``row_schema(extra_types)`` for a new directory.
    """
    schema = row_schema(extra_types)
    if existing is None:
        return schema
    names = set(existing.names)
    for name in LATER_COLUMNS:
        if name not in names:
            schema = schema.remove(schema.get_field_index(name))
    return schema
