"""The output row schema: the ONE place that defines the columns of a result row.

Every other module (the run's commit, input validation's reserved names, status, merge, ARCHITECTURE.md)
refers to :data:`FIXED_COLUMNS` / :func:`row_schema` here. One Parquet row per valid input record::

    id, query, <passthrough columns of the input>, contexts, rag_answer, rag_status, rag_error,
    generation, generation_json, gen_status, gen_error, attempts, endpoint, retrieve_ms, rag_llm_ms, generate_ms, model

Passthrough columns keep their input type: for JSONL the type is unified over the whole input
(string, int64, float64, bool; nested or mixed values as a JSON string); for Parquet input the column's own
Arrow type. A passthrough field named like an output column is stored as ``input_<name>``.
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
    ("model", pa.string(), "model id reported by the endpoint"),
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
