"""The report as one self-contained HTML page: inline CSS, figures as ``data:image/png;base64`` URIs, no script.

Nothing on the page is fetched when it is viewed (no network, no JavaScript, no external font or style sheet).
Every text taken from the output (error messages, endpoints, statuses, models, paths) is HTML-escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Iterable, Sequence
from typing import Any

from pipeline.report.aggregate import ReportStats

#: ids of the page's sections, in order (the browser test checks them).
SECTIONS = ("summary", "throughput", "latency", "endpoints", "statuses", "errors", "tokens")
NO_TOKENS = "no token columns in this output"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1250px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f6f8; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font-size: 0.92em; word-break: break-word; }
img { max-width: 100%; height: auto; display: block; margin: 0.6em 0; }
.note { color: #666; font-size: 0.88em; }
.empty { color: #666; font-style: italic; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _n(v: float | int | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}" if digits or isinstance(v, float) else f"{v:,}"


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _time(t: float | None) -> str:
    if t is None:
        return "-"
    return _dt.datetime.fromtimestamp(t).astimezone().isoformat(sep=" ", timespec="seconds")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def _table(head: Sequence[str] | None, rows: Iterable[Sequence[str]], numeric: Sequence[bool] | None = None) -> str:
    """A table of already-escaped cell strings (no header row when ``head`` is None); ``numeric[i]``
    right-aligns column i."""
    rows = [list(r) for r in rows]
    width = len(head) if head is not None else max((len(r) for r in rows), default=0)
    numeric = list(numeric or [False] * width)
    out = ["<table>"]
    if head is not None:
        out += ["<thead><tr>", *(f"<th>{h}</th>" for h in head), "</tr></thead>"]
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="n">{c}</td>' if numeric[i] else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _img(figures: dict[str, bytes], name: str, alt: str) -> str:
    png = figures.get(name)
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="fig-{name}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _summary(stats: ReportStats, source: str) -> str:
    info = stats.info
    rows = [("output", f"<code>{_e(source)}</code>"),
            ("run directories", f"{info.dirs:,}" + (f" ({info.complete_dirs:,} complete)" if info.dirs else "")),
            ("input", "<br>".join(f"<code>{_e(i)}</code>" for i in info.inputs) or "-"),
            ("rows committed", f"{stats.rows:,} of {info.total_records:,} records expected "
                               f"({_pct(stats.rows, info.total_records)})"),
            ("rejected input records", f"{info.rejected:,}"),
            ("committed parts", f"{stats.parts:,}"),
            ("first / last commit", f"{_time(stats.first_commit)} / {_time(stats.last_commit)}")]
    if stats.first_commit is not None and stats.last_commit is not None:
        rate = stats.mean_rate()
        rate_text = (f"; {rate:,.2f} committed rows/s on average after the first commit" if rate is not None
                     else "")
        rows.append(("commit span", f"{_duration(stats.last_commit - stats.first_commit)}{rate_text}"))
    models = ", ".join(f"<code>{_e(m)}</code> ({n:,})" for m, n in stats.models.most_common(10))
    rows.append(("models (rows)", models or "-"))
    return _table(None, [(f"<b>{_e(k)}</b>", v) for k, v in rows])


def _throughput(stats: ReportStats, figures: dict[str, bytes]) -> str:
    if not stats.rows:
        return '<p class="empty">no rows committed yet</p>'
    return (_img(figures, "throughput", "rows committed over time")
            + '<p class="note">A row counts at the time its part file was committed (the part\'s mtime): rows carry '
              "no time stamp of their own, and the run commits a part at least every 30 s, so the resolution is "
              "about 30 s. A part rewritten by <code>run --retry-failed</code> counts at the time of the rewrite; "
              "gaps are time between invocations (a resume).</p>")


def _latency(stats: ReportStats, figures: dict[str, bytes]) -> str:
    rows = []
    for stage, hist in stats.latency.items():
        s = hist.summary()
        col = {"retrieve": "retrieve_ms", "rag_llm": "rag_llm_ms", "generate": "generate_ms"}.get(stage, stage)
        rows.append([f"<code>{_e(col)}</code>", _n(s["n"]), _n(stats.rows - int(s["n"] or 0)),
                     *(_n(s[k], 1) for k in ("min", "p50", "p95", "p99", "max", "mean"))])
    table = _table(["column", "rows with a value", "null", "min", "p50", "p95", "p99", "max", "mean"], rows,
                   [False] + [True] * 8)
    return (_img(figures, "latency", "latency histograms per stage") + table
            + '<p class="note">Milliseconds. Percentiles are read from fixed log-spaced bins (0.1 % wide): within '
              "0.05 % of the exact value (the manifest's exact percentiles may differ in the last digit); min, "
              "max and mean are exact. Null: the stage did not run for the row (e.g. generate_ms after a RAG "
              "hard failure).</p>")


def _endpoints(stats: ReportStats, figures: dict[str, bytes]) -> str:
    totals = stats.endpoint_rows()
    if not totals:
        return '<p class="empty">no rows committed yet</p>'
    statuses = sorted({g for _, g in stats.endpoint_status})
    rows = []
    for ep, n in totals.items():
        rows.append([f"<code>{_e(ep)}</code>", _n(n), _pct(n, stats.rows),
                     *(_n(stats.endpoint_status.get((ep, g), 0)) for g in statuses)])
    return (_img(figures, "endpoints", "rows per endpoint")
            + _table(["endpoint", "rows", "share", *(f"gen_status {_e(g)}" for g in statuses)], rows,
                     [False] + [True] * (2 + len(statuses))))


def _statuses(stats: ReportStats, figures: dict[str, bytes]) -> str:
    rag, gen, counts = stats.status_table()
    if not counts.size:
        return '<p class="empty">no rows committed yet</p>'
    rows = []
    for i, r in enumerate(rag):
        rows.append([f"<b>{_e(r)}</b>", *(_n(int(counts[i, j])) for j in range(len(gen))), _n(int(counts[i].sum()))])
    rows.append(["<b>total</b>", *(_n(int(counts[:, j].sum())) for j in range(len(gen))), _n(int(counts.sum()))])
    head = ["rag_status \\ gen_status", *(_e(g) for g in gen), "total"]
    return (_img(figures, "statuses", "rows per rag_status and gen_status")
            + _table(head, rows, [False] + [True] * (len(gen) + 1)))


def _errors(stats: ReportStats, top: int) -> str:
    groups = stats.errors.groups(top)
    if not groups:
        return '<p class="empty">no errors (no row has a rag_error or gen_error)</p>'
    rows = [[_n(g["count"]), _pct(g["count"], stats.rows), f"<code>{_e(g['error'])}</code>"] for g in groups]
    shown = len([g for g in groups if g["error"] != "(other errors)"])
    kinds = len(stats.errors.errors)
    return (_table(["rows", "share of rows", "error (column: first 200 characters)"], rows, [True, True, False])
            + f'<p class="note">{stats.errors.total():,} error values in all ({_n(kinds)} distinct kinds held); the '
              f"{shown} most frequent shown, grouped as in the manifest (same column and same first 200 "
              "characters).</p>")


def _tokens(stats: ReportStats, figures: dict[str, bytes]) -> str:
    if not stats.token_columns and not stats.finish_columns:
        return f'<p class="empty" id="no-tokens">{NO_TOKENS}</p>'
    out = []
    if stats.token_columns:
        rows = []
        for c, hist in stats.tokens.items():
            s = hist.summary()
            rows.append([f"<code>{_e(c)}</code>", _n(s["n"]), _n(s["sum"], 0),
                         *(_n(s[k], 1 if k == "mean" else 0) for k in ("mean", "p50", "p95", "p99", "max"))])
        out.append(_img(figures, "tokens", "token count histograms"))
        out.append(_table(["column", "rows with a value", "total", "mean", "p50", "p95", "p99", "max"], rows,
                          [False] + [True] * 7))
    else:
        out.append('<p class="empty">no token count columns in this output</p>')
    if stats.finish_columns:
        out.append(_img(figures, "finish", "rows per finish reason"))
        for c, counts in stats.finish.items():
            rows = [[f"<code>{_e(k)}</code>", _n(v), _pct(v, stats.rows)] for k, v in counts.most_common()]
            out.append(f"<h3><code>{_e(c)}</code></h3>"
                       + _table(["finish reason", "rows", "share"], rows, [False, True, True]))
        out.append('<p class="note"><code>length</code> = the reply was cut at the max_tokens limit.</p>')
    return "".join(out)


def build_html(stats: ReportStats, figures: dict[str, bytes], *, source: str, generated_at: float,
               top_errors: int = 20) -> str:
    """The report page.

    Args:
        stats: the aggregates (:func:`pipeline.report.aggregate.scan_report`).
        figures: PNG bytes per figure name (:func:`pipeline.report.plots.all_figures`); a missing name draws
            nothing.
        source: the output directory, as the user named it (shown, escaped).
        generated_at: seconds since the epoch (shown in local time).
        top_errors: error groups listed.

    Returns:
        The HTML document (str), one section per :data:`SECTIONS` id.
    """
    bodies = {
        "summary": ("Summary", _summary(stats, source)),
        "throughput": ("Throughput", _throughput(stats, figures)),
        "latency": ("Latency per stage", _latency(stats, figures)),
        "endpoints": ("Load per endpoint", _endpoints(stats, figures)),
        "statuses": ("Statuses", _statuses(stats, figures)),
        "errors": ("Error groups", _errors(stats, top_errors)),
        "tokens": ("Tokens", _tokens(stats, figures)),
    }
    nav = " ".join(f'<a href="#{k}">{_e(title)}</a>' for k, (title, _) in bodies.items())
    sections = "\n".join(f'<section id="{k}"><h2>{_e(title)}</h2>\n{body}\n</section>'
                         for k, (title, body) in bodies.items())
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f"<title>rag-pipeline report: {_e(source)}</title>\n<style>{_CSS}</style></head>\n<body>\n"
        f"<h1>rag-pipeline report</h1>\n<p class=\"note\">{_e(source)}: generated {_time(generated_at)}, "
        f"{stats.rows:,} committed rows</p>\n<nav>{nav}</nav>\n{sections}\n</body></html>\n"
    )
