"""`rag-pipeline report`: a self-contained HTML report of a run's committed rows, with plots."""

from __future__ import annotations

import click

from pipeline.cli.options import handle_errors


@click.command("report", short_help="Self-contained HTML report with plots.")
@click.argument("output_dir", metavar="OUTPUT", type=click.Path(file_okay=False))
@click.option("--output", "-o", "html_path", type=click.Path(dir_okay=False), default=None,
              help="HTML file to write (default OUTPUT/.rag-pipeline/report.html; replaced if it exists).")
@click.option("--top-errors", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="Error groups listed in the report.")
@handle_errors
def report_cmd(output_dir: str, html_path: str | None, top_errors: int) -> None:
    """One self-contained HTML page of plots about a run's output.

    Throughput over time, latency per stage, load per endpoint, statuses, error groups and tokens.
    OUTPUT is a run directory or the root of a sharded run; only committed parts are read, so it works on a
    running or interrupted run too. The page needs no network to view (figures embedded, no script).
    """
    from pipeline.report import write_report

    res = write_report(output_dir, html_path, top_errors=top_errors)
    click.echo(f"wrote {res['path']} ({res['rows']:,} rows, {res['figures']} figures, {res['bytes'] / 1e6:.2f} MB)")
