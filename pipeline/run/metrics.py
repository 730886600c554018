"""Prometheus metrics of a run (``run.metrics_port``): what the run is doing, scraped while it runs.

One :class:`RunMetrics` per run, in the main process, with its own ``prometheus_client.CollectorRegistry`` (not
the library's global one: two runs in one process, or a test, never share series), served by
prometheus_client's own HTTP server thread on ``run.metrics_host:port``. Every update comes from the main
thread: :meth:`RunMetrics.row_finished` when the row writer makes a row (:mod:`pipeline.run.rows`) and
:meth:`RunMetrics.tick` once per turn of the scheduling loop (in-flight loads, restarts and outage time, read
from the scheduler and the endpoint monitor, which only the main thread changes). The HTTP thread only reads
prometheus_client's own thread-safe values.

The series (:data:`METRICS`; README "Metrics"):

==========================================  =========  ===========================================================
``rag_pipeline_records_total``              counter    rows made, by ``stage`` (rag, gen) and that stage's
                                                       ``status`` (the row's rag_status / gen_status)
``rag_pipeline_inflight``                   gauge      requests in flight per ``endpoint`` (RAG answers +
                                                       generations, as main counts them against its totals)
``rag_pipeline_request_seconds``            histogram  per ``stage`` (retrieve, rag_llm, generate): the rows'
                                                       retrieve_ms / rag_llm_ms / generate_ms, in seconds
``rag_pipeline_tokens_total``               counter    tokens by ``stage`` (rag, gen) and ``kind`` (prompt,
                                                       completion), from the servers' usage
``rag_pipeline_retries_total``              counter    LLM request attempts beyond the first of each request
                                                       (failover, another pass after backoff, overload re-sends)
``rag_pipeline_restarts_total``             counter    by ``kind``: ``worker`` (a RAG worker or generation
                                                       process replaced), ``server`` (a managed server restarted)
``rag_pipeline_outage_seconds_total``       counter    seconds during which an LLM stage was in outage (its
                                                       endpoints all in trouble: the ``run.max_outage_s`` clock)
``rag_pipeline_overhead_seconds``           histogram  per row: wall time from the record's first dispatch to
                                                       its row, less retrieve_ms, rag_llm_ms and generate_ms
                                                       (:func:`overhead_s`)
==========================================  =========  ===========================================================

Port: ``run.metrics_port`` -1 = off, 0 = any free port, P > 0 = P + the job's port slot
(:func:`pipeline.servers.plan.job_port_slot`: ``SLURM_JOB_ID % 100`` under Slurm, so array tasks sharing a node
do not collide; 0 outside Slurm). A port already taken is a :class:`pipeline.errors.ConfigError` (exit 2), raised
before any LLM server starts.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from pipeline.config import Config
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "rag_pipeline_"

METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "rag_pipeline_records_total": ("counter", ("stage", "status"), "Rows made, by stage (rag, gen) and status."),
    "rag_pipeline_inflight": ("gauge", ("endpoint",), "LLM requests in flight per endpoint (RAG answers + generations)."),
    "rag_pipeline_request_seconds": (
        "histogram", ("stage",), "Per-row latency of each stage (retrieve, rag_llm, generate), seconds."),
    "rag_pipeline_tokens_total": ("counter", ("stage", "kind"), "Tokens by stage (rag, gen) and kind (prompt, completion)."),
    "rag_pipeline_retries_total": ("counter", (), "LLM request attempts beyond the first of each request."),
    "rag_pipeline_restarts_total": ("counter", ("kind",), "Restarts by kind: worker (process replaced), server."),
    "rag_pipeline_outage_seconds_total": ("counter", (), "Seconds an LLM stage was in outage (endpoints in trouble)."),
    "rag_pipeline_overhead_seconds": (
        "histogram", (), "Per row: first dispatch to row, less retrieval and LLM request time, seconds."),
}
"""Every series: name (as scraped; counters end in ``_total``) -> (type, label names, help)."""

REQUEST_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Histogram buckets of ``rag_pipeline_request_seconds``: a retrieval takes milliseconds, an LLM request with
retries up to minutes (the client's worst case with default timeouts is ~380 s)."""
OVERHEAD_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Histogram buckets of ``rag_pipeline_overhead_seconds``: milliseconds of hand-offs normally; seconds when
records wait for a free in-flight slot or were requeued."""

_LATENCY = (("retrieve", "retrieve_ms"), ("rag_llm", "rag_llm_ms"), ("generate", "generate_ms"))
_TOKENS = (("rag", "prompt", "rag_prompt_tokens"), ("rag", "completion", "rag_completion_tokens"),
           ("gen", "prompt", "gen_prompt_tokens"), ("gen", "completion", "gen_completion_tokens"))


def overhead_s(t_first_dispatch: float, t_row: float, retrieve_ms: float | None, rag_llm_ms: float | None,
               generate_ms: float | None) -> float | None:
    """Seconds a record spent in the pipeline outside retrieval and LLM requests.

    ``(t_row - t_first_dispatch) - (retrieve_ms + rag_llm_ms + generate_ms) / 1000``, missing latencies counted
    as 0: waiting in queues and inboxes for a free slot, pickling and pipes between processes, building prompts,
    and a requeued record's lost first attempt. Clamped at 0 (the latencies are measured in the workers, the
    wall time in main; both are monotonic clocks of one machine, so only rounding can make it negative).

    Args:
        t_first_dispatch: monotonic seconds when main first sent the record to a RAG worker (0.0: never).
        t_row: monotonic seconds when its row was made.
        retrieve_ms, rag_llm_ms, generate_ms: the row's latencies, milliseconds (None: the stage did not run).

    Returns:
        Seconds >= 0, or None when the record was never dispatched (no wall time to measure).
    """
    if t_first_dispatch <= 0.0:
        return None
    busy_ms = sum(v for v in (retrieve_ms, rag_llm_ms, generate_ms) if v is not None)
    return max(0.0, (t_row - t_first_dispatch) - busy_ms / 1000.0)


def resolve_port(cfg: Config) -> int | None:
    """The port the run's metrics bind: None when off (``run.metrics_port`` = -1), 0 for any free port, else
    ``run.metrics_port`` + the job's port slot (:func:`pipeline.servers.plan.job_port_slot`).

    Raises:
        ConfigError: the shifted port is above 65535.
    """
    port = cfg.run.metrics_port
    if port < 0:
        return None
    if port == 0:
        return 0
    from pipeline.servers.plan import job_port_slot

    shifted = port + job_port_slot(cfg)
    if shifted > 65535:
        raise ConfigError(f"[run] metrics_port: {port} + port slot {shifted - port} = {shifted} is above 65535")
    return shifted


class RunMetrics:
    """The run's Prometheus series in a dedicated registry, and the HTTP server that serves them.

    Attributes:
        registry: the ``prometheus_client.CollectorRegistry`` holding every series of :data:`METRICS`.
        url: ``http://host:port/metrics`` once :meth:`serve` bound the port, else None.
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def doc(name: str) -> str:
            return METRICS[name][2]

        self.records = Counter("rag_pipeline_records", doc("rag_pipeline_records_total"), ("stage", "status"),
                               registry=r)
        self.inflight = Gauge("rag_pipeline_inflight", doc("rag_pipeline_inflight"), ("endpoint",), registry=r)
        self.request_seconds = Histogram("rag_pipeline_request_seconds", doc("rag_pipeline_request_seconds"),
                                         ("stage",), buckets=REQUEST_BUCKETS_S, registry=r)
        self.tokens = Counter("rag_pipeline_tokens", doc("rag_pipeline_tokens_total"), ("stage", "kind"), registry=r)
        self.retries = Counter("rag_pipeline_retries", doc("rag_pipeline_retries_total"), registry=r)
        self.restarts = Counter("rag_pipeline_restarts", doc("rag_pipeline_restarts_total"), ("kind",), registry=r)
        self.outage_seconds = Counter("rag_pipeline_outage_seconds", doc("rag_pipeline_outage_seconds_total"),
                                      registry=r)
        self.overhead_seconds = Histogram("rag_pipeline_overhead_seconds", doc("rag_pipeline_overhead_seconds"),
                                          buckets=OVERHEAD_BUCKETS_S, registry=r)
        for kind in ("worker", "server"):
            self.restarts.labels(kind=kind)  # present (at 0) from the first scrape
        # labelled children resolved once (a .labels() call costs a lock and validation: ~10 us each)
        self._latency_children = [(self.request_seconds.labels(stage=stage), column) for stage, column in _LATENCY]
        self._token_children = [(self.tokens.labels(stage=stage, kind=kind), column) for stage, kind, column in _TOKENS]
        self._record_children: dict[tuple[str, str], Any] = {}
        self.url: str | None = None
        self._httpd: Any = None
        self._seen_restarts = {"worker": 0, "server": 0}
        self._last_tick: float | None = None

    # ------------------------------------------------------------------ serving
    def serve(self, host: str, port: int) -> str:
        """Serve the registry on ``host:port`` (0 = any free port) from a daemon thread.

        Returns:
            the URL, ``http://host:port/metrics`` (also in :attr:`url`).

        Raises:
            ConfigError: the port is taken (naming its owner when visible) or the address cannot be bound.
        """
        from prometheus_client import start_http_server

        try:
            self._httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                from pipeline.servers.process import port_owner

                owner = port_owner(port)
                raise ConfigError(
                    f"[run] metrics_port: port {port} on {host} is already in use"
                    + (f" by {owner}" if owner else "")
                    + " (stop that process, choose another --metrics-port, or 0 for any free port)"
                ) from None
            raise ConfigError(f"[run] metrics_host: cannot bind {host}:{port}: {exc.strerror or exc}") from None
        bound = self._httpd.server_address[1]
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{bound}/metrics"
        log.warning("run metrics (Prometheus) on %s", self.url)  # the user asked for them: say where
        return self.url

    def stop(self) -> None:
        """Stop serving and free the port (idempotent)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # ------------------------------------------------------------------ updates (main thread)
    def row_finished(self, item: Any, rag: Any, gen: Any, row: dict[str, Any], now: float) -> None:
        """A record's row was made.

        Args:
            item: its :class:`pipeline.messages.WorkItem` (``t_first_dispatch``).
            rag, gen: its :class:`pipeline.messages.RagResult` and :class:`GenResult` (None: skipped).
            row: the row (column -> value).
            now: monotonic seconds.
        """
        for key in (("rag", row["rag_status"]), ("gen", row["gen_status"])):
            child = self._record_children.get(key)
            if child is None:
                child = self._record_children[key] = self.records.labels(stage=key[0], status=str(key[1]))
            child.inc()
        for child, column in self._latency_children:
            value = row.get(column)
            if value is not None:
                child.observe(value / 1000.0)
        for child, column in self._token_children:
            value = row.get(column)
            if value:
                child.inc(value)
        retries = sum(max(0, r.attempts - r.requests) for r in (rag, gen) if r is not None)
        if retries:
            self.retries.inc(retries)
        spent = overhead_s(item.t_first_dispatch, now, row.get("retrieve_ms"), row.get("rag_llm_ms"),
                           row.get("generate_ms"))
        if spent is not None:
            self.overhead_seconds.observe(spent)

    def tick(self, scheduler: Any, monitor: Any, now: float) -> None:
        """One turn of the scheduling loop: in-flight loads, restarts so far, outage time since the last turn.

        Args:
            scheduler: the run's :class:`pipeline.run.scheduler.Scheduler` (``in_flight()``, ``workers``,
                ``stages``).
            monitor: the :class:`pipeline.servers.health.EndpointMonitor` (``total_restarts``), or None.
            now: monotonic seconds.
        """
        for endpoint, n in scheduler.in_flight().items():
            self.inflight.labels(endpoint=endpoint).set(n)
        seen = {"worker": sum(max(0, w.incarnation - 1) for w in scheduler.workers.values()),
                "server": getattr(monitor, "total_restarts", 0) if monitor is not None else 0}
        for kind, total in seen.items():
            if total > self._seen_restarts[kind]:
                self.restarts.labels(kind=kind).inc(total - self._seen_restarts[kind])
                self._seen_restarts[kind] = total
        if self._last_tick is not None and any(h.outage_since is not None for h in scheduler.stages.values()):
            self.outage_seconds.inc(max(0.0, now - self._last_tick))
        self._last_tick = now


def start_metrics(cfg: Config, stack: Any) -> RunMetrics | None:
    """Start the run's metrics server when ``run.metrics_port`` is not -1; it stops when ``stack`` (the
    orchestrator's ``contextlib.ExitStack``) closes.

    Returns:
        the :class:`RunMetrics` (its ``url`` set), or None when metrics are off.

    Raises:
        ConfigError: the port is taken or cannot be bound (before any LLM server starts).
    """
    port = resolve_port(cfg)
    if port is None:
        return None
    metrics = RunMetrics()
    metrics.serve(cfg.run.metrics_host, port)
    stack.callback(metrics.stop)
    return metrics


def server_metrics_urls(pool: Any) -> list[str]:
    """``/metrics`` URLs of the managed servers (SGLang ``--enable-metrics``, llama.cpp ``--metrics``), or ``[]``
    in attach mode (``pool`` None)."""
    if pool is None:
        return []
    return [f"{spec.url}/metrics" for spec in pool.specs]


def metrics_report(metrics: RunMetrics | None, pool: Any) -> dict[str, Any]:
    """The manifest's ``metrics``: ``{"url": the run's /metrics URL or None (off), "servers": [managed servers'
    /metrics URLs]}``."""
    return {"url": metrics.url if metrics is not None else None, "servers": server_metrics_urls(pool)}


__all__ = ["METRICS", "OVERHEAD_BUCKETS_S", "REQUEST_BUCKETS_S", "RunMetrics", "metrics_report", "overhead_s",
           "resolve_port", "server_metrics_urls", "start_metrics"]
