"""`rag-pipeline status` and `rag-pipeline merge`: inspect and combine run outputs."""

from __future__ import annotations

import collections
import json
from typing import Any

import click

from pipeline.cli.options import handle_errors


def _counts(counts: dict[str, int]) -> str:
    return "  ".join(f"{k}={v}" for k, v in counts.items()) or "-"


def _line(name: str, st: dict[str, Any]) -> list[str]:
    total = st["total"]
    pct = f" ({100.0 * st['done'] / total:.1f}%)" if total else ""
    run = st.get("run")
    state = run["state"] if run else ("complete" if st["complete"] else "incomplete")
    rej = f", {st['rejected']} rejected" if st.get("rejected") else ""
    lines = [f"{name}: {st['done']}/{total} records done{pct}{rej}, {state}"]
    if run:
        lines += _run_lines(run, st)
    return lines + [
        f"  rag_status  {_counts(st['rag_status'])}",
        f"  gen_status  {_counts(st['gen_status'])}",
    ]


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds} s" if seconds < 120 else (f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h")


def _run_lines(run: dict[str, Any], st: dict[str, Any]) -> list[str]:
    """What the run is doing (or how it ended): from pipeline.output.livestate.run_liveness."""
    out = []
    where = f"host {run['host']}, pid {run['pid']}" if run.get("host") else ""
    beat = f"last heartbeat {_age(run['heartbeat_age_s'])} ago" if run.get("heartbeat_age_s") is not None else ""
    if run["state"] == "running":
        phase = f"phase {run.get('phase') or '?'}" + (f" since {run['phase_since']}" if run.get("phase_since") else "")
        out.append("  run: " + "; ".join(x for x in (f"running ({where})", phase, beat) if x))
        live = run.get("live") or {}
        rate = live.get("rate") or {}
        if rate:
            eta = rate.get("eta_s")
            rps = rate.get("records_per_s")
            rate_text = (f"{rps:.2f} records/s over the last {_age(rate.get('window_s'))}" if rps is not None
                         else "no rate yet")
            out.append(f"  rate: {rate_text}, ETA {_age(eta) if eta is not None else '-'}; last row "
                       f"{_age(rate.get('idle_s'))} ago; state updated {_age(run.get('updated_age_s'))} ago")
        uncommitted = st["done"] - st.get("committed", st["done"])
        if uncommitted:
            out.append(f"  {st.get('committed')} rows committed, {uncommitted} finished and not committed yet")
        for url, ep in (live.get("endpoints") or {}).items():
            out.append(f"  endpoint {url}: {ep.get('in_flight', 0)}/{ep.get('limit', '?')} in flight, "
                       f"probe {ep.get('probe', '?')}")
        for stage, why in (live.get("paused") or {}).items():
            if why:
                out.append(f"  {stage} dispatch paused: {why}")
    else:
        details = [x for x in (run.get("reason"), where, beat) if x]
        if run["state"] == "stopped" and details:
            out.append("  run: stopped: " + "; ".join(details))
    return out


def format_status(st: dict[str, Any]) -> str:
    """Human-readable text of :func:`pipeline.output.run_status`."""
    lines = _line(st["path"], st)
    if st.get("sharded"):
        n = st["n_shards"]
        for sh in st["shards"]:
            done, total = sh["done"], sh["total"]
            run = sh.get("run") or {}
            state = run.get("state") or ("complete" if sh["complete"] else "incomplete")
            if state == "running" and run.get("heartbeat_age_s") is not None:
                state += f" (last heartbeat {_age(run['heartbeat_age_s'])} ago)"
            elif state == "stopped" and run.get("reason"):
                state += f" ({run['reason']})"
            lines.append(f"  shard {sh['index']}/{n}: {done}/{total} done, {state}")
        for i in st["missing_shards"]:
            lines.append(f"  shard {i}/{n}: not started (no shard-{i}-of-{n}/)")
        merged = st.get("merged")
        if merged:
            state = "complete" if merged["complete"] else "incomplete"
            lines.append(f"  merged: {merged['done']}/{merged['total']} rows, {state} ({merged['path']})")
        else:
            lines.append("  merged: not yet (rag-pipeline merge)")
    else:
        from pipeline.output.layout import LOGS_DIR, MANIFEST_FILE, locate

        lines.append(f"  manifest {locate(st['path'], MANIFEST_FILE)}  logs {locate(st['path'], LOGS_DIR)}/")
    return "\n".join(lines)


TASK_LINES = 20
"""Most array tasks listed one per line by `status` (beyond: counts per state and the tasks not done)."""


def format_slurm(sl: dict[str, Any]) -> list[str]:
    """Text lines of :func:`pipeline.slurm.tasks.slurm_status`: one per array task (a long array: counts per
    state and the tasks not done, at most :data:`TASK_LINES`), one for the merge job."""
    lines = [f"  Slurm: array job {sl['array_job_id']} ({sl['n_shards']} task(s)), merge job "
             f"{sl['merge_job_id'] or '-'}" + ("" if sl["queue_known"] else "; squeue unavailable: states from the "
                                                                            "tasks' own records")]

    def one(label: str, t: dict[str, Any]) -> str:
        state = t["state"]
        if t.get("reason"):
            state += f" ({t['reason']})"
        if t["state"] == "failed":
            state += f", exit {t['exit_code']}"
        if t["state"] in ("running", "done", "failed", "requeued", "lost") and t.get("host"):
            state += f" on {t['host']}"
        if t.get("at") and not t.get("reason"):
            state += f" at {t['at']}"
        if t["state"] in ("failed", "lost", "requeued"):
            state += f"; log {t['log_err']}"
        return f"  {label} ({t['job']}): {state}"

    tasks = sl["tasks"]
    if len(tasks) > TASK_LINES:  # a long array: counts per state, then only the tasks that are not done
        counts = collections.Counter(t["state"] for t in tasks)
        lines.append("  tasks: " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        tasks = [t for t in tasks if t["state"] != "done"]
    lines += [one(f"task {t['index']}", t) for t in tasks[:TASK_LINES]]
    if len(tasks) > TASK_LINES:
        lines.append(f"  ... {len(tasks) - TASK_LINES} more (status --json lists every task)")
    if sl.get("merge"):
        lines.append(one("merge", sl["merge"]) + f" -> {sl['merge_output']}")
    return lines


@click.command("status")
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@handle_errors
def status_cmd(output_dir: str, as_json: bool) -> None:
    """Records done / total, counts per status, per shard, and whether OUTPUT_DIR is complete.

    OUTPUT_DIR is a run directory or the root of a sharded run (shard-I-of-N/ directories). For a root submitted
    with `submit`, each array task (pending, running, done, failed with its exit code and log) and the merge job
    too, also before any task wrote a row. Exit status 0 whether or not the run is complete (see "complete").
    """
    from pipeline.output import is_run_dir, run_status, shard_dirs
    from pipeline.slurm.tasks import is_slurm_root, slurm_status

    sl = slurm_status(output_dir) if is_slurm_root(output_dir) else None
    st: dict[str, Any] | None = None
    if sl is None or shard_dirs(output_dir) or is_run_dir(output_dir):
        st = run_status(output_dir)  # else: submitted, but no task has written its shard directory yet
    if as_json:
        out = st if st is not None else {"path": output_dir, "sharded": True, "complete": False, "shards": []}
        click.echo(json.dumps({**out, "slurm": sl} if sl is not None else out, indent=2))
        return
    lines = [format_status(st)] if st is not None else [f"{output_dir}: no shard has written anything yet"]
    if sl is not None:
        lines += format_slurm(sl)
    click.echo("\n".join(lines))


@click.command("merge")
@click.argument("dir_", metavar="DIR", type=click.Path(file_okay=False))
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    default=None,
    help="Merged directory, outside DIR (default DIR.merged beside it; an earlier merge output there is replaced).",
)
@click.option("--ordered", is_flag=True,
              help="Write the rows in input order (by input_index), sorted out of core in bounded memory.")
@click.option("--memory-limit-mb", default=1024, show_default=True, type=int,
              help="With --ordered: memory of the sort (MiB); it spills to disk beyond.")
@handle_errors
def merge_cmd(dir_: str, output: str | None, ordered: bool, memory_limit_mb: int) -> None:
    """Combine the shards of DIR into one output, verifying every input id appears exactly once.

    Reads the input named in the shards' run.json; a duplicate, missing or unknown id is an error that
    lists a few of them (nothing is written then). Prints counts per status. The merge output lies outside DIR
    (default DIR.merged), so that reading DIR and reading the merge output each give every record once.
    """
    from pathlib import Path

    from pipeline.output import default_merge_dir, merge_shards

    if memory_limit_mb < 64:
        raise click.BadParameter(f"{memory_limit_mb}: must be >= 64", param_hint="--memory-limit-mb")
    out = Path(output) if output else default_merge_dir(dir_)
    m = merge_shards(dir_, out, ordered=ordered, memory_limit_mb=memory_limit_mb)
    click.echo(
        f"merged {m['rows']} rows of {m['total_records']} records from {m['n_shards']} shard(s) into {out}"
        + (" in input order" if ordered else "")
        + (f" ({m['rejected']} rejected input lines)" if m["rejected"] else "")
    )
    for col, counts in m["counts"].items():
        click.echo(f"  {col:<11} {_counts(counts)}")
