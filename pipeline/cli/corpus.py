"""`rag-pipeline ingest` and `rag-pipeline eval-retrieval`: build a collection, measure retrieval quality."""

from __future__ import annotations

import click

from pipeline.cli.options import build_config, config_file_option, config_option, handle_errors
from pipeline.config import choices


def _store_options(fn):
    """--store / --chroma-url (token, CA) / --collection / --bm25-path, shared by both commands."""
    fn = config_option("--bm25-path", key="store.bm25_path", type=click.Path(file_okay=False),
                       help="BM25 index directory (default: <store>/bm25; with --chroma-url: a shared path, "
                            "or none and retrieval builds it in memory).")(fn)
    fn = config_option("--collection", key="store.collection", help="Collection name.")(fn)
    fn = config_option("--store-ca-file", key="store.ca_file", metavar="FILE",
                       help="PEM bundle of the CA that signed --chroma-url's certificate (e.g. your site's own CA); "
                            "default: the public CAs of certifi.")(fn)
    fn = config_option("--store-token-header", key="store.token_header",
                       help="Header carrying the token: Authorization (Bearer <token>) or e.g. X-Chroma-Token.")(fn)
    fn = config_option("--store-token-env", key="store.token_env",
                       help="Environment variable holding the token sent to --chroma-url (never logged).")(fn)
    fn = config_option("--chroma-url", key="store.chroma_url",
                       help="Your own Chroma server (https://host:port, behind an authenticating proxy) instead of "
                            "a local --store directory.")(fn)
    fn = config_option("--store", key="store.path", type=click.Path(file_okay=False),
                       help="ChromaDB directory (PersistentClient).")(fn)
    return fn


def _embedding_options(fn):
    fn = config_option("--batch-size", key="embedding.batch_size", type=click.IntRange(min=0),
                       help="Texts per embedding forward pass; 0 = by device (64 CPU, 256 CUDA).")(fn)
    fn = config_option("--device", key="embedding.device",
                       help="Embedding device: auto (cuda if available), cpu, cuda, cuda:N.")(fn)
    return fn


@click.command("ingest")
@click.argument("source", type=click.Path(path_type=str))
@_store_options
@click.option("--reset", is_flag=True, default=False,
              help="Delete and recreate the collection first (after SOURCE was validated).")
@config_option("--chunk-chars", key="ingest.chunk_chars", type=click.IntRange(min=0),
               help="Chunk size in characters; 0 = one chunk per document.  [config default: 1000]")
@config_option("--chunk-overlap", key="ingest.chunk_overlap", type=click.IntRange(min=0),
               help="Characters shared by consecutive chunks.  [config default: 200]")
@config_option("--on-error", key="ingest.on_error",
               help="Bad file or line: fail (abort before writing anything; default) or skip (and list it).")
@_embedding_options
@config_file_option
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
@handle_errors
def ingest_cmd(source: str, reset: bool, config_file: str | None, progress: bool, **params) -> None:
    """Ingest SOURCE (a folder or a .jsonl/.jsonl.gz BEIR corpus) into a Chroma collection.

    Folders are read recursively: .txt .md .html/.htm .pdf .jsonl .jsonl.gz (BEIR {"_id","title","text"}).
    Re-running is idempotent: unchanged documents are skipped, changed ones replaced, vanished ones removed.

    Example: rag-pipeline ingest data/example/corpus.jsonl --store data/store --collection example
    """
    cfg = build_config(config_file, params)
    from pipeline.corpus.ingest import ingest_source
    from pipeline.retrieval.bm25 import BM25Settings

    summary = ingest_source(source, cfg.store, cfg.ingest, cfg.embedding, reset=reset, progress=progress,
                            bm25=BM25Settings.from_config(cfg.retrieval))
    for item in summary.skipped:
        click.echo(f"skipped: {item}", err=True)
    click.echo(summary.line())


def format_metrics(metrics: dict[str, dict[str, float]], n_queries: int) -> str:
    """The metrics as a text table: one row per metric, one column per retrieval mode."""
    modes = list(metrics)
    names = list(dict.fromkeys(n for m in metrics.values() for n in m))
    lines = [f"{'metric':<12}" + "".join(f"{m:>10}" for m in modes)]
    for name in names:
        cells = []
        for m in modes:
            v = metrics[m].get(name)
            cells.append(f"{'-':>10}" if v is None else f"{v:>10.1f}" if name == "queries/s" else f"{v:>10.4f}")
        lines.append(f"{name:<12}" + "".join(cells))
    lines.append(f"{'queries':<12}" + "".join(f"{n_queries:>10d}" for _ in modes))
    return "\n".join(lines)


def _modes(value: str | None) -> list[str] | None:
    """--mode: one mode, a comma-separated list, or 'all' (dense,bm25,hybrid); None = the config's."""
    if value is None:
        return None
    known = choices("retrieval.mode")
    modes = list(known) if value.strip() == "all" else [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in modes if m not in known]
    if bad or not modes:
        raise click.BadParameter(f"{value!r}: expected {', '.join(known)}, a comma-separated list of them, or all")
    return list(dict.fromkeys(modes))


@click.command("eval-retrieval")
@_store_options
@click.option("--queries", required=True, type=click.Path(dir_okay=False),
              help='BEIR queries JSONL ({"_id", "text"} a line).')
@click.option("--qrels", required=True, type=click.Path(dir_okay=False),
              help="BEIR qrels TSV (header 'query-id corpus-id score').")
@click.option("--mode", "modes", default=None,
              help=f"{', '.join(choices('retrieval.mode'))}, a comma-separated list, or all.  "
                   "[config default: retrieval.mode]")
@config_option("--fusion", key="retrieval.fusion",
               help="Hybrid: fuse chunk or document rankings.  [config default: chunk]")
@config_option("--rrf-k", key="retrieval.rrf_k", type=click.IntRange(min=0),
               help="Hybrid: RRF constant k.  [config default: 60]")
@click.option("--k", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Cutoff of nDCG, Recall and MRR (Recall@100 is always reported).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the metrics to this JSON file.")
@_embedding_options
@config_file_option
@handle_errors
def eval_retrieval_cmd(queries: str, qrels: str, modes: str | None, k: int, json_out: str | None,
                       config_file: str | None, **params) -> None:
    """Measure retrieval on BEIR queries + qrels: nDCG@k, Recall@k, Recall@100, MRR@k and queries/s per mode.

    Documents are ranked by their best chunk. Example (SciFact; published all-MiniLM-L6-v2 nDCG@10 0.645,
    BM25 0.665): rag-pipeline eval-retrieval --store data/store --collection scifact --mode all
    --queries queries.jsonl --qrels test.tsv
    """
    import dataclasses
    import json
    from pathlib import Path

    from pipeline.evaluation.retrieval import evaluate_retriever, load_qrels, load_queries

    cfg = build_config(config_file, params)
    mode_list = _modes(modes) or [cfg.retrieval.mode]
    q = load_queries(queries)
    rels = load_qrels(qrels)
    from pipeline.errors import StoreError
    from pipeline.retrieval.embedding import load_embedder
    from pipeline.retrieval.retriever import Retriever, retriever_options
    from pipeline.store.client import describe, open_collection, store_errors

    # Fail fast on a missing/empty collection, before loading the model.
    col = open_collection(cfg.store, create=False)
    with store_errors(f"count collection {cfg.store.collection!r}"):
        n_chunks = col.count()
    if n_chunks == 0:
        raise StoreError(f"collection {cfg.store.collection!r} in {describe(cfg.store)} is empty")
    embedder = load_embedder(cfg.embedding.device) if mode_list != ["bm25"] else None
    results: dict[str, dict[str, float]] = {}
    for mode in mode_list:
        rcfg = dataclasses.replace(cfg, retrieval=dataclasses.replace(cfg.retrieval, mode=mode))
        retriever = Retriever(cfg.store, embedder, batch_size=cfg.embedding.batch_size, create=False,
                              **retriever_options(rcfg))
        results[mode] = evaluate_retriever(retriever, q, rels, k=k)
    n_queries = sum(1 for qid in rels if any(r > 0 for r in rels[qid].values()))
    click.echo(f"collection {cfg.store.collection!r} in {describe(cfg.store)}: {n_chunks} chunks")
    click.echo(format_metrics(results, n_queries))
    if json_out:
        payload: dict = {m: {name: round(v, 5) for name, v in r.items()} for m, r in results.items()}
        if len(mode_list) == 1:  # the single-mode layout of earlier versions, plus the mode
            payload = {**payload[mode_list[0]], "mode": mode_list[0]}
        payload["queries"] = n_queries
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
