"""`rag-pipeline ingest` and `rag-pipeline eval-retrieval`: build a collection, measure retrieval quality."""

from __future__ import annotations

import click

from pipeline.commands.options import build_config, config_file_option, config_option, handle_errors


def _store_options(fn):
    """--store / --chroma-url / --collection, shared by both commands."""
    fn = config_option("--collection", key="store.collection", help="Collection name.")(fn)
    fn = config_option("--chroma-url", key="store.chroma_url",
                       help="Chroma server URL (http://host:port) instead of a local --store directory.")(fn)
    fn = config_option("--store", key="store.path", type=click.Path(file_okay=False),
                       help="ChromaDB directory (PersistentClient).")(fn)
    return fn


def _embedding_options(fn):
    fn = config_option("--batch-size", key="embedding.batch_size", type=click.IntRange(min=1),
                       help="Texts per embedding forward pass.")(fn)
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
@config_option("--on-error", key="ingest.on_error", type=click.Choice(["fail", "skip"]),
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
    from workers.ingest import ingest_source

    summary = ingest_source(source, cfg.store, cfg.ingest, cfg.embedding, reset=reset, progress=progress)
    for item in summary.skipped:
        click.echo(f"skipped: {item}", err=True)
    click.echo(summary.line())


def format_metrics(metrics: dict[str, float], n_queries: int) -> str:
    """The metrics as a two-column text table."""
    lines = [f"{'metric':<12}{'value':>8}"]
    lines += [f"{name:<12}{value:>8.4f}" for name, value in metrics.items()]
    lines.append(f"{'queries':<12}{n_queries:>8d}")
    return "\n".join(lines)


@click.command("eval-retrieval")
@_store_options
@click.option("--queries", required=True, type=click.Path(dir_okay=False),
              help='BEIR queries JSONL ({"_id", "text"} a line).')
@click.option("--qrels", required=True, type=click.Path(dir_okay=False),
              help="BEIR qrels TSV (header 'query-id corpus-id score').")
@click.option("--k", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Cutoff of nDCG, Recall and MRR (Recall@100 is always reported).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the metrics to this JSON file.")
@_embedding_options
@config_file_option
@handle_errors
def eval_retrieval_cmd(queries: str, qrels: str, k: int, json_out: str | None, config_file: str | None,
                       **params) -> None:
    """Measure dense retrieval on BEIR queries + qrels: nDCG@k, Recall@k, Recall@100, MRR@k.

    Documents are ranked by their best chunk. Example (SciFact, published all-MiniLM-L6-v2 nDCG@10 0.645):
    rag-pipeline eval-retrieval --store data/store --collection scifact --queries queries.jsonl --qrels test.tsv
    """
    import json
    from pathlib import Path

    from pipeline.evaluate import evaluate_retriever, load_qrels, load_queries

    cfg = build_config(config_file, params)
    q = load_queries(queries)
    rels = load_qrels(qrels)
    from pipeline.errors import StoreError
    from workers.embedding import load_embedder
    from workers.retriever import Retriever
    from workers.store import describe, open_collection, store_errors

    # Fail fast on a missing/empty collection, before loading the model.
    col = open_collection(cfg.store, create=False)
    with store_errors(f"count collection {cfg.store.collection!r}"):
        n_chunks = col.count()
    if n_chunks == 0:
        raise StoreError(f"collection {cfg.store.collection!r} in {describe(cfg.store)} is empty")
    retriever = Retriever(
        cfg.store, load_embedder(cfg.embedding.device), batch_size=cfg.embedding.batch_size, create=False
    )
    metrics = evaluate_retriever(retriever, q, rels, k=k)
    n_queries = sum(1 for qid in rels if any(r > 0 for r in rels[qid].values()))
    click.echo(f"collection {cfg.store.collection!r} in {describe(cfg.store)}: {n_chunks} chunks")
    click.echo(format_metrics(metrics, n_queries))
    if json_out:
        payload = {name: round(value, 5) for name, value in metrics.items()}
        payload["queries"] = n_queries
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
