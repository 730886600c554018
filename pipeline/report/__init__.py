"""`rag-pipeline report`: one self-contained HTML page with plots of a run's committed rows.

Modules, one concern each:

* :mod:`~pipeline.report.aggregate`: one streamed, column-projected scan into fixed-size aggregates (no
  matplotlib; what the unit tests check).
* :mod:`~pipeline.report.plots`: the figures (matplotlib, Agg canvas, imported only when drawing).
* :mod:`~pipeline.report.page`: the HTML page (inline CSS, figures as data URIs, no script, escaped text).

Importing this package loads numpy and pyarrow only; matplotlib is imported by :func:`write_report`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline.errors import OutputError
from pipeline.output.files import atomic_write_bytes
from pipeline.output.layout import REPORT_FILE, meta_path
from pipeline.output.migrate import migrate
from pipeline.report.aggregate import ReportStats, scan_report

log = logging.getLogger(__name__)



def write_report(output: str | Path, html_path: str | Path | None = None, *, top_errors: int = 20) -> dict[str, Any]:
    """Scan an output's committed rows and write the HTML report (atomically: tmp + fsync + rename).

    Args:
        output: a run directory or the root of a sharded run (``shard-I-of-N/``).
        html_path: the file to write; default ``OUTPUT/.rag-pipeline/report.html`` (hidden, like all of the
            directory's bookkeeping, so that a read of the directory takes only rows: :mod:`pipeline.output.layout`).
        top_errors: error groups listed.

    Returns:
        ``{"path": Path written, "rows": committed rows, "bytes": size of the page, "figures": n, "scan_s",
        "draw_s"}``.

    Raises:
        InputError: ``output`` is not an output directory, or its ``run.json`` is invalid.
        RunError: a committed part is unreadable.
        OutputError: the report file cannot be written (missing directory, permissions, disk full).
    """
    from pipeline.report.page import build_html
    from pipeline.report.plots import all_figures

    dest = Path(html_path) if html_path is not None else meta_path(output, REPORT_FILE)
    t0 = time.perf_counter()
    stats: ReportStats = scan_report(output)
    if html_path is None:
        try:  # an earlier version's report at the top of the directory is replaced by this one
            migrate(output, names=(REPORT_FILE,))
            dest.parent.mkdir(exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write the report {dest}: {exc.strerror or exc}") from None
    t1 = time.perf_counter()
    figures = all_figures(stats)
    page = build_html(stats, figures, source=str(output), generated_at=time.time(), top_errors=top_errors)
    data = page.encode("utf-8")
    t2 = time.perf_counter()
    try:
        atomic_write_bytes(dest, data)
    except OSError as exc:
        raise OutputError(f"cannot write the report {dest}: {exc.strerror or exc}") from None
    log.info("report %s: %d rows, scan %.1f s, figures %.1f s", dest, stats.rows, t1 - t0, t2 - t1)
    return {"path": dest, "rows": stats.rows, "bytes": len(data), "figures": len(figures),
            "scan_s": t1 - t0, "draw_s": t2 - t1}


__all__ = ["REPORT_FILE", "ReportStats", "scan_report", "write_report"]
