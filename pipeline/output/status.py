"""`rag-pipeline status`: records done / total and counts per status, in bounded memory.

Reads only ``rag_status`` and ``gen_status`` of the committed parts, streamed (:mod:`pipeline.output.stats`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.output.reading import is_run_dir, not_an_output
from pipeline.output.rundir import OutputDir
from pipeline.output.sharding import default_merge_dir, shard_dirs
from pipeline.output.stats import scan_stats


def dir_status(path: str | Path) -> dict[str, Any]:
    """Status of one run (or shard, or merged) directory, with whether a run is working on it now.

    Returns:
        ``{"path", "shard", "input", "total", "done", "committed", "rejected", "complete", "manifest",
        "rag_status", "gen_status", "run"}``: ``total`` from ``run.json`` (records expected), ``committed``
        rows in committed parts, ``done`` = committed rows plus, while a run is running, the rows it finished
        and has not committed yet (from its ``state.json``: the counts its progress line shows),
        ``rejected`` lines of ``rejected.jsonl``, ``manifest`` whether ``manifest.json`` exists,
        ``complete`` = the manifest says ``"complete": true`` and committed + rejected >= total; the two
        status fields map each value (``"null"`` for a missing one) to a row count (uncommitted rows of a
        running run included); ``run``: :func:`pipeline.output.livestate.run_liveness` (running / stopped /
        complete, heartbeat age, phase, and for a running run its live state under ``"live"``).

    Raises:
        InputError: ``run.json`` missing or invalid.
        RunError: a committed part is unreadable.
    """
    import time

    from pipeline.output.livestate import live_counts, run_liveness

    d = OutputDir(path)
    info = d.run_info()
    stale_s = float(((info.get("config") or {}).get("run") or {}).get("lock_stale_s") or 60.0)
    for attempt in range(3):
        stats = scan_stats(d.parts())
        manifest = d.manifest()
        rejected = d.rejected_count()
        total = int(info.get("total_records") or 0)
        committed = stats.rows
        complete = bool(manifest and manifest.get("complete") is True and committed + rejected >= total)
        run = run_liveness(d.path, complete=complete, stale_s=stale_s)
        extra = live_counts(run["live"], committed) if run["live"] is not None else None
        if run["live"] is None or extra is not None or attempt == 2:
            break
        time.sleep(0.6)  # a part was committed after the state was written: the run rewrites it within 1 s
    counts = stats.status_counts()
    done = committed
    if run["live"] is not None and extra is None:  # still committing faster than it rewrites: rows only
        done = max(committed, int(run["live"].get("rows") or 0))
    if extra is not None:
        done += extra["rows"]
        for col in ("rag_status", "gen_status"):
            merged = dict(counts[col])
            add_counts(merged, extra[col])
            counts[col] = dict(sorted(merged.items()))
    return {
        "path": str(d.path),
        "shard": info.get("shard"),
        "input": info.get("input"),
        "total": total,
        "done": done,
        "committed": committed,
        "rejected": rejected,
        "complete": complete,
        "manifest": manifest is not None,
        **counts,
        "run": run,
    }


def add_counts(into: dict[str, int], more: dict[str, int]) -> None:
    """Add the counts of ``more`` into ``into``."""
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def single_n(root: Path) -> tuple[int, dict[int, Path]]:
    """The shard count N of the ``shard-I-of-N`` directories of ``root`` and ``{I: path}``.

    Raises:
        InputError: shard directories of different N.
    """
    shards = shard_dirs(root)
    ns = sorted({n for _, n, _ in shards})
    if len(ns) > 1:
        raise InputError(
            f"{root}: holds shards of different counts N ({', '.join(map(str, ns))}); "
            "remove the stale shard-I-of-N directories or use another --output"
        )
    return ns[0], {i: p for i, _, p in shards}


def _rejected_lines(od: OutputDir) -> set[Any]:
    """Line numbers of ``rejected.jsonl``, streamed."""
    out: set[Any] = set()
    if od.rejected_file.exists():
        with od.rejected_file.open() as fh:
            for line in fh:
                try:
                    out.add(json.loads(line).get("line"))
                except (json.JSONDecodeError, AttributeError):
                    continue
    return out


def run_status(path: str | Path) -> dict[str, Any]:
    """Status of an output directory: a run directory or a sharded root (``shard-I-of-N/``).

    Returns:
        For a run directory, :func:`dir_status` plus ``"sharded": False``. For a sharded root:
        ``{"path", "sharded": True, "n_shards", "total", "done", "rejected", "complete", "rag_status",
        "gen_status", "shards": [dir_status + "index"...], "missing_shards": [I...], "merged": dir_status
        of the merge output ``ROOT.merged`` (:func:`pipeline.output.sharding.default_merge_dir`) or None}``; ``complete`` = every shard present and complete; ``total`` sums the
        shards that exist (a missing shard's record count is unknown until it starts).

    Raises:
        InputError: not an output directory, mixed shard counts, an invalid ``run.json``.
        RunError: a committed part is unreadable.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: output directory not found")
    if is_run_dir(root):
        return {**dir_status(root), "sharded": False}
    if not shard_dirs(root):
        raise not_an_output(root)
    n, by_index = single_n(root)
    shards, missing = [], []
    agg: dict[str, Any] = {"total": 0, "done": 0, "rag_status": {}, "gen_status": {}}
    rejected_lines: set[Any] = set()
    for i in range(n):
        if i not in by_index or not is_run_dir(by_index[i]):
            missing.append(i)
            continue
        st = {**dir_status(by_index[i]), "index": i}
        shards.append(st)
        for k in ("total", "done"):
            agg[k] += st[k]
        # every shard lists the bad lines of the whole input: count each line once
        rejected_lines |= _rejected_lines(OutputDir(by_index[i]))
        add_counts(agg["rag_status"], st["rag_status"])
        add_counts(agg["gen_status"], st["gen_status"])
    for k in ("rag_status", "gen_status"):
        agg[k] = dict(sorted(agg[k].items()))
    merged_dir = default_merge_dir(root)
    return {
        "path": str(root),
        "sharded": True,
        "n_shards": n,
        **agg,
        "rejected": len(rejected_lines),
        "complete": not missing and all(s["complete"] for s in shards),
        "shards": shards,
        "missing_shards": missing,
        "merged": dir_status(merged_dir) if is_run_dir(merged_dir) else None,
    }
