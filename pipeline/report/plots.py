"""The report's figures, drawn with matplotlib's Agg canvas into PNG bytes.

matplotlib is imported inside the functions (``rag-pipeline --help`` and the library never load it); figures
are made with ``matplotlib.figure.Figure`` and ``FigureCanvasAgg`` directly, not pyplot, so nothing depends on
a global backend or state. Each function takes the aggregates of :mod:`pipeline.report.aggregate` and returns
one PNG (bytes), or None when there is nothing to draw.
"""

from __future__ import annotations

import datetime as _dt
import io
from typing import Any

import numpy as np

from pipeline.report.aggregate import LogHistogram, ReportStats

DPI = 100
#: colour of each known gen_status in the endpoint bars; other values take the tab10 cycle.
STATUS_COLOURS = {"ok": "#2ca02c", "failed": "#d62728", "invalid_output": "#ff7f0e", "skipped": "#7f7f7f",
                  "null": "#c7c7c7"}
STAGE_TITLES = {"retrieve": "retrieve_ms (retrieval micro-batch)", "rag_llm": "rag_llm_ms (RAG answer request)",
                "generate": "generate_ms (generation request)"}
PERCENTILE_STYLES = (("p50", "#1f77b4", "-"), ("p95", "#ff7f0e", "--"), ("p99", "#d62728", ":"))


def _figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _width_label(width_s: int) -> str:
    if width_s % 86_400 == 0:
        return f"{width_s // 86_400} d"
    if width_s % 3600 == 0:
        return f"{width_s // 3600} h"
    return f"{width_s // 60} min" if width_s % 60 == 0 else f"{width_s} s"


def throughput_png(stats: ReportStats) -> bytes | None:
    """Committed rows/s per time bin (bars) and cumulative rows at each commit (step line), local time."""
    import matplotlib.dates as mdates

    starts, rows, width = stats.throughput()
    if not rows.size:
        return None
    tz = _dt.datetime.now().astimezone().tzinfo
    times = [_dt.datetime.fromtimestamp(float(t), tz) for t in starts]
    fig = _figure(10, 3.6)
    ax = fig.add_subplot()
    ax.bar(times, rows / width, width=width / 86_400.0, align="edge", color="#1f77b4", alpha=0.75,
           label=f"rows/s (mean over {_width_label(width)})")
    ax.set_ylabel("committed rows/s")
    ax2 = ax.twinx()
    t_commit, n_commit = stats.commits()
    t_line = [times[0]] + [_dt.datetime.fromtimestamp(float(t), tz) for t in t_commit]
    ax2.step(t_line, np.concatenate([[0], np.cumsum(n_commit)]), where="post", color="#d62728", linewidth=1.5,
             label="cumulative rows")
    ax2.set_ylabel("cumulative rows")
    ax2.set_ylim(bottom=0)
    for axis in (ax.yaxis, ax2.yaxis):
        axis.set_major_formatter(_thousands())
    locator = mdates.AutoDateLocator(tz=tz)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=tz))
    ax.set_xlim(times[0], times[-1] + _dt.timedelta(seconds=width))
    offset = _dt.datetime.now(tz).strftime("%z")
    ax.set_xlabel(f"commit time (part file mtime; local time, UTC{offset[:3]}:{offset[3:]})")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.set_title("Throughput: rows committed over time")
    return _png(fig)


def _log_axis(ax: Any, lo: float, hi: float) -> None:
    """A log x axis labelled with plain numbers: 1, 2, 5 per decade over up to 1.5 decades, 1, 3 up to 3, else 1."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ratio = hi / lo
    subs = (1.0, 2.0, 5.0) if ratio <= 30 else ((1.0, 3.0) if ratio <= 1e3 else (1.0,))
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.10g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _thousands() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{v:,.10g}")


def _max_n_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(nbins=5)


def _histogram_panel(ax: Any, hist: LogHistogram, title: str, unit: str, digits: int) -> None:
    edges, counts, log = hist.display_bins()
    if not counts.size:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ax.stairs(counts, edges, fill=True, color="#9ecae1", edgecolor="#3182bd")
    if log:
        _log_axis(ax, float(edges[0]), float(edges[-1]))
    else:
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.xaxis.set_major_locator(_max_n_locator())
    pct = hist.percentiles()
    for key, colour, style in PERCENTILE_STYLES:
        v = pct[key]
        if v is not None and v > 0:
            ax.axvline(v, color=colour, linestyle=style, linewidth=1.5, label=f"{key} {_fmt(v, digits)} {unit}")
    ax.set_xlabel(unit)
    ax.set_ylabel("rows")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right")


def latency_png(stats: ReportStats) -> bytes | None:
    """One histogram per stage (log-spaced bins, log x axis), p50 / p95 / p99 marked."""
    if not any(h.n for h in stats.latency.values()):
        return None
    fig = _figure(12, 3.4)
    axes = fig.subplots(1, len(stats.latency))
    for ax, (stage, hist) in zip(np.atleast_1d(axes), stats.latency.items(), strict=True):
        _histogram_panel(ax, hist, STAGE_TITLES.get(stage, stage), "ms", 1)
    return _png(fig)


def endpoints_png(stats: ReportStats, top: int = 20) -> bytes | None:
    """Rows per endpoint (horizontal bars, the ``top`` busiest), split by gen_status."""
    totals = stats.endpoint_rows()
    if not totals:
        return None
    names = list(totals)[:top]
    rest = set(list(totals)[top:])
    statuses = sorted({g for _, g in stats.endpoint_status},
                      key=lambda g: (list(STATUS_COLOURS).index(g) if g in STATUS_COLOURS else 99, g))
    labels = names + ([f"({len(rest)} more endpoints)"] if rest else [])
    data = np.zeros((len(labels), len(statuses)))
    for (ep, g), n in stats.endpoint_status.items():
        row = names.index(ep) if ep in names else len(names)
        data[row, statuses.index(g)] += n
    fig = _figure(10, 1.2 + 0.35 * len(labels))
    ax = fig.add_subplot()
    y = np.arange(len(labels))
    left = np.zeros(len(labels))
    import matplotlib

    cycle = matplotlib.colormaps["tab10"].colors
    for j, g in enumerate(statuses):
        colour = STATUS_COLOURS.get(g, cycle[j % len(cycle)])
        ax.barh(y, data[:, j], left=left, color=colour, label=f"gen_status {g}")
        left += data[:, j]
    for yi, total in zip(y, left, strict=True):
        ax.text(total, yi, f" {int(total):,}", va="center", fontsize=8)
    ax.set_yticks(y, [lbl if len(lbl) <= 60 else lbl[:57] + "..." for lbl in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    ax.set_xlim(0, max(left.max(), 1) * 1.12)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Load per endpoint (rows by the endpoint that produced the generation, else the RAG answer)")
    return _png(fig)


def status_png(stats: ReportStats) -> bytes | None:
    """rag_status x gen_status row counts as an annotated heat map."""
    rag, gen, counts = stats.status_table()
    if not counts.size:
        return None
    fig = _figure(1.8 + 1.5 * len(gen), 1.2 + 0.6 * len(rag))
    ax = fig.add_subplot()
    shade = np.log1p(counts.astype(np.float64))
    ax.imshow(shade, cmap="Blues", aspect="auto", vmin=0, vmax=max(float(shade.max()), 1.0) * 1.25)
    total = max(int(counts.sum()), 1)
    for i in range(len(rag)):
        for j in range(len(gen)):
            n = int(counts[i, j])
            dark = shade[i, j] > 0.6 * max(float(shade.max()), 1.0) * 1.25
            ax.text(j, i, f"{n:,}\n{100.0 * n / total:.1f}%", ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(gen)), gen)
    ax.set_yticks(range(len(rag)), rag)
    ax.set_xlabel("gen_status")
    ax.set_ylabel("rag_status")
    ax.set_title("Rows per rag_status x gen_status", fontsize=10)
    return _png(fig)


def tokens_png(stats: ReportStats) -> bytes | None:
    """One histogram per token column present (log x axis), p50 / p95 / p99 marked."""
    if not stats.tokens:
        return None
    cols = list(stats.tokens)
    ncols = 2 if len(cols) > 1 else 1
    nrows = (len(cols) + ncols - 1) // ncols
    fig = _figure(10, 3.0 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax, c in zip(axes, cols, strict=False):
        _histogram_panel(ax, stats.tokens[c], c, "tokens", 0)
    for ax in axes[len(cols):]:
        ax.set_visible(False)
    return _png(fig)


def finish_png(stats: ReportStats) -> bytes | None:
    """Rows per finish reason, one bar group per finish reason column present."""
    present = {c: counts for c, counts in stats.finish.items() if counts}
    if not present:
        return None
    fig = _figure(10, 3.0)
    axes = np.atleast_1d(fig.subplots(1, len(present)))
    for ax, (c, counts) in zip(axes, present.items(), strict=True):
        items = counts.most_common(12)
        names = [k for k, _ in items]
        values = [v for _, v in items]
        colours = ["#d62728" if k == "length" else "#1f77b4" for k in names]
        ax.barh(range(len(names)), values, color=colours)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,}", va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.2)
        ax.set_xlabel("rows")
        ax.set_title(c, fontsize=10)
    return _png(fig)


def all_figures(stats: ReportStats) -> dict[str, bytes]:
    """Every figure that has something to draw: ``{"throughput", "latency", "endpoints", "statuses",
    "tokens", "finish"}`` -> PNG bytes (absent keys: nothing to draw)."""
    makers = {"throughput": throughput_png, "latency": latency_png, "endpoints": endpoints_png,
              "statuses": status_png, "tokens": tokens_png, "finish": finish_png}
    out: dict[str, bytes] = {}
    for name, make in makers.items():
        png = make(stats)
        if png is not None:
            out[name] = png
    return out
