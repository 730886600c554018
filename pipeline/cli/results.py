"""`rag-pipeline status` and `rag-pipeline merge`: inspect and combine run outputs."""

from __future__ import annotations

import json
from typing import Any

import click

from pipeline.cli.options import handle_errors


def _counts(counts: dict[str, int]) -> str:
    return "  ".join(f"{k}={v}" for k, v in counts.items()) or "-"


def _line(name: str, st: dict[str, Any]) -> list[str]:
    total = st["total"]
    pct = f" ({100.0 * st['done'] / total:.1f}%)" if total else ""
    state = "complete" if st["complete"] else "incomplete"
    rej = f", {st['rejected']} rejected" if st.get("rejected") else ""
    return [
        f"{name}: {st['done']}/{total} records done{pct}{rej}, {state}",
        f"  rag_status  {_counts(st['rag_status'])}",
        f"  gen_status  {_counts(st['gen_status'])}",
    ]


def format_status(st: dict[str, Any]) -> str:
    """Human-readable text of :func:`pipeline.output.run_status`."""
    lines = _line(st["path"], st)
    if st.get("sharded"):
        n = st["n_shards"]
        for sh in st["shards"]:
            done, total = sh["done"], sh["total"]
            state = "complete" if sh["complete"] else ("running or stopped" if sh["manifest"] else "started")
            lines.append(f"  shard {sh['index']}/{n}: {done}/{total} done, {state}")
        for i in st["missing_shards"]:
            lines.append(f"  shard {i}/{n}: not started (no shard-{i}-of-{n}/)")
        merged = st.get("merged")
        if merged:
            state = "complete" if merged["complete"] else "incomplete"
            lines.append(f"  merged: {merged['done']}/{merged['total']} rows, {state} ({merged['path']})")
        else:
            lines.append("  merged: not yet (rag-pipeline merge)")
    return "\n".join(lines)


@click.command("status")
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@handle_errors
def status_cmd(output_dir: str, as_json: bool) -> None:
    """Records done / total, counts per status, per shard, and whether OUTPUT_DIR is complete.

    OUTPUT_DIR is a run directory or the root of a sharded run (shard-I-of-N/ directories).
    Exit status 0 whether or not the run is complete (see "complete" in the output).
    """
    from pipeline.output import run_status

    st = run_status(output_dir)
    if as_json:
        click.echo(json.dumps(st, indent=2))
    else:
        click.echo(format_status(st))


@click.command("merge")
@click.argument("dir_", metavar="DIR", type=click.Path(file_okay=False))
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    default=None,
    help="Merged directory (default DIR/merged; an earlier merge output there is replaced).",
)
@handle_errors
def merge_cmd(dir_: str, output: str | None) -> None:
    """Combine the shards of DIR into one output, verifying every input id appears exactly once.

    Reads the input named in the shards' _run.json; a duplicate, missing or unknown id is an error that
    lists a few of them (nothing is written then). Prints counts per status.
    """
    from pathlib import Path

    from pipeline.output import merge_shards

    out = Path(output) if output else Path(dir_) / "merged"
    m = merge_shards(dir_, out)
    click.echo(
        f"merged {m['rows']} rows of {m['total_records']} records from {m['n_shards']} shard(s) into {out}"
        + (f" ({m['rejected']} rejected input lines)" if m["rejected"] else "")
    )
    for col, counts in m["counts"].items():
        click.echo(f"  {col:<11} {_counts(counts)}")
