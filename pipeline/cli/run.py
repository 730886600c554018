"""`rag-pipeline run`: the main job."""

from __future__ import annotations

import click

from pipeline.cli.options import build_config, config_file_option, config_option, handle_errors


def summary_table(manifest: dict) -> str:
    """Counts per status, p50/p95/p99 per stage (ms) and records/s as a small text table."""
    lines = [f"rows {manifest['rows']} / {manifest['total_records']}  complete: {manifest['complete']}"]
    for col, counts in manifest["counts"].items():
        lines.append(f"  {col:<11} " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    lines.append(f"  {'stage':<11} {'p50 ms':>10} {'p95 ms':>10} {'p99 ms':>10} {'n':>7}")
    for stage, p in manifest["latency_ms"].items():
        fmt = [("-" if p[k] is None else f"{p[k]:.1f}") for k in ("p50", "p95", "p99")]
        lines.append(f"  {stage:<11} {fmt[0]:>10} {fmt[1]:>10} {fmt[2]:>10} {p['n']:>7}")
    inv = manifest["this_invocation"]
    lines.append(f"  this run: {inv['processed']} records in {inv['wall_s']:.1f} s ({inv['records_per_s'] or 0:.2f} records/s)")
    if "retried" in inv:
        lines.append("  retried: " + (", ".join(f"{n} {k}" for k, n in inv["retried"].items()) or "none"))
    lines += token_lines(manifest)
    lines += context_lines(manifest)
    for err in manifest["errors"][:5]:
        lines.append(f"  error x{err['count']}: {err['error']}")
    return "\n".join(lines)


def token_lines(manifest: dict) -> list[str]:
    """Per LLM stage: token totals, completion tokens/s, and how many replies hit their max_tokens (with the
    setting to raise). Manifests without ``tokens`` (written before they existed) give no line."""
    lines = []
    per_s = manifest["this_invocation"].get("completion_tokens_per_s") or {}
    for stage, t in (manifest.get("tokens") or {}).items():
        if not t["rows_with_usage"]:
            continue
        speed = t["request_completion_tokens_per_s"]
        lines.append(f"  {stage} tokens: prompt {t['prompt_tokens']}  completion {t['completion_tokens']}  "
                     f"({per_s.get(stage) or 0:.1f} tokens/s this run, "
                     f"{'-' if speed is None else f'{speed:.1f}'} tokens/s per request)")
        if t["hit_max_tokens"]:
            what = "RAG answers" if stage == "rag" else "generations"
            lines.append(f"  {t['hit_max_tokens']} {what} hit max_tokens (finish_reason length): raise "
                         f"{t['max_tokens_setting']}")
    return lines


def context_lines(manifest: dict) -> list[str]:
    """One line when some records' context was cut to fit the model's window: how many, and what to raise.
    Manifests without ``contexts`` (written before it existed) give no line."""
    c = manifest.get("contexts") or {}
    if not c.get("cut"):
        return []
    return [f"  {c['cut']} of {c['rows_with_contexts_used']} records had their context cut to fit the model "
            f"(contexts_used < contexts; {c['passages_used']} of {c['passages_retrieved']} passages sent): "
            f"{c['advice']}"]


@click.command("run")
@config_option("--input", "-i", "input_", key="run.input", type=click.Path(),
               help="Input: JSONL (one record a line), a .parquet file or a directory of .parquet parts.")
@config_option("--output", "-o", key="run.output", type=click.Path(file_okay=False),
               help="Output directory (Parquet parts; .rag-pipeline/manifest.json and logs). Re-running resumes.")
@config_option("--num_processes", "--num-processes", "num_processes", key="generation.num_processes", type=int,
               help="Generation processes (CPU).")
@config_file_option
@config_option("--max-concurrency", key="llm.max_concurrency", type=int,
               help="In-flight LLM requests per endpoint, all processes together (0: sized from the backend).")
@config_option("--endpoints", key="servers.endpoints",
               help="Attach to these OpenAI-compatible endpoints (comma-separated) instead of starting servers.")
@config_option("--backend", key="servers.backend", help="Managed server backend.")
@config_option("--model", key="servers.model", help="Model for managed servers (default: SmolLM2 GGUF on CPU).")
@config_option("--model-cache-dir", key="servers.model_cache_dir", type=click.Path(file_okay=False),
               help="Where the default CPU model is fetched to on first use (default: ~/.cache/rag-pipeline/models).")
@config_option("--gpus", key="servers.gpus", type=int, help="GPUs to use (-1: all visible).")
@config_option("--tp-size", key="servers.tp_size", type=int, help="SGLang: GPUs per server (tensor parallel).")
@config_option("--cpu-servers", key="servers.cpu_servers", type=int, help="llama.cpp servers without GPU.")
@config_option("--base-port", key="servers.base_port", type=int, help="Port of server 0 (server i: base+i).")
@config_option("--api-key-env", key="servers.api_key_env",
               help="Environment variable holding the endpoints' API key (managed servers then require it).")
@config_option("--store", key="store.path", type=click.Path(file_okay=False), help="ChromaDB directory.")
@config_option("--chroma-url", key="store.chroma_url",
               help="Your own Chroma server (https://host:port, behind an authenticating proxy) instead of --store.")
@config_option("--store-token-env", key="store.token_env",
               help="Environment variable holding the token sent to --chroma-url (never logged).")
@config_option("--store-token-header", key="store.token_header",
               help="Header carrying the token: Authorization (Bearer <token>, default) or e.g. X-Chroma-Token.")
@config_option("--store-ca-file", key="store.ca_file", metavar="FILE",
               help="PEM bundle of the CA that signed --chroma-url's certificate (e.g. your site's own CA); "
                    "default: the public CAs of certifi.")
@config_option("--store-local-dir", key="store.local_dir", type=click.Path(file_okay=False),
               help="Copy --store to this node-local directory first (once per node and store version) and read "
                    "the copy; submit sets it.")
@config_option("--collection", key="store.collection", help="Collection to retrieve from.")
@config_option("--bm25-path", key="store.bm25_path", type=click.Path(file_okay=False),
               help="BM25 index directory (default <store>/bm25; with --chroma-url a shared path).")
@config_option("--store-shared", key="store.shared",
               help="One Chroma server over the local store for all RAG workers of the node (one index copy): "
                    "on, off, or auto (when the copies would duplicate > 1 GiB).")
@config_option("--ingest", key="run.ingest", type=click.Path(exists=False),
               help="Ingest this source into --collection (rank0, single writer, idempotent) before the run; "
                    "data/example/corpus.jsonl is the bundled example.")
@config_option("--reset-collection/--no-reset-collection", key="run.reset_collection",
               help="Delete and recreate the collection first (rank0).")
@config_option("--rag-mode", key="rag.mode",
               help="retrieve+answer: grounded answer from the RAG worker's endpoint; retrieve: passages only.")
@config_option("--top-k", key="retrieval.top_k", type=int, help="Passages retrieved per record.")
@config_option("--min-score", key="retrieval.min_score", type=float, help="Cosine similarity threshold.")
@config_option("--retrieval-mode", key="retrieval.mode",
               help="dense (embeddings), bm25 (lexical) or hybrid (reciprocal rank fusion of both).")
@config_option("--response-format", key="generation.response_format", type=click.Path(dir_okay=False),
               help="JSON Schema file: generations are JSON matching it (column generation_json).")
@config_option("--query-field", key="run.query_field", help="Record field with the query.")
@config_option("--id-field", key="run.id_field", help="Record field with the unique id.")
@config_option("--limit", key="run.limit", type=int,
               help="Only the first N records (0: all). Resuming with a larger N (or 0) extends the run.")
@config_option("--on-bad-record", key="run.on_bad_record",
               help="fail: stop before any server starts; skip: write bad lines to .rag-pipeline/rejected.jsonl.")
@config_option("--overwrite/--resume", key="run.overwrite", help="Start afresh instead of resuming.")
@config_option("--shard", key="run.shard", help="I/N: process partition I of N of the input.")
@config_option("--retry-failed", key="run.retry_failed", is_flag=True, default=None,
               help="Also re-process committed rows with rag_status hard_fail or gen_status failed or "
                    "invalid_output (replaced once).")
@config_option("--retry-truncated", key="run.retry_truncated", is_flag=True, default=None,
               help="Also re-process committed ok rows whose generation hit max_tokens (gen_finish_reason "
                    "'length'); raise generation.max_tokens first (--allow-config-change).")
@config_option("--allow-config-change", key="run.allow_config_change", is_flag=True, default=None,
               help="Resume although prompts, model, retrieval or generation settings changed.")
@config_option("--deterministic/--no-deterministic", key="run.deterministic", default=None,
               help="Reproducible rows: same input, settings and model give the same rows (seeded requests; "
                    "managed servers without cross-request batching or prompt-cache reuse: slower, see README).")
@config_option("--grace-s", key="run.grace_s", type=float, help="Seconds in-flight records get after SIGTERM.")
@config_option("--metrics-port", key="run.metrics_port", type=int,
               help="Serve Prometheus metrics of the run on this port (0: any free port; default off).")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
@handle_errors
def run_cmd(config_file: str | None, progress: bool, **params) -> None:
    """Run (or resume) retrieval + generation: one Parquet row per input record.

    Needs --input, --output, and a store and collection (--store DIR or --chroma-url URL, --collection NAME, or
    your --config) that exist or that --ingest SOURCE fills: nothing is taken by default.

    Example: rag-pipeline run --input data.jsonl --output out/ --store store/ --collection docs --num_processes 16
    """
    cfg = build_config(config_file, params)
    from pipeline.run.orchestrator import run_pipeline

    result = run_pipeline(cfg, progress=progress)
    from pipeline.output.layout import LOGS_DIR, MANIFEST_FILE, meta_path

    click.echo(summary_table(result.manifest), err=True)
    click.echo(f"manifest {meta_path(result.output_dir, MANIFEST_FILE)}  logs {meta_path(result.output_dir, LOGS_DIR)}/",
               err=True)
    click.echo(str(result.output_dir))
