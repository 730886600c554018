"""`rag-pipeline run`: the orchestrator of the main process.

It acquires the run's parts in order and releases them in reverse (one ``contextlib.ExitStack``):

1. the output directory (created, locked, prepared: the whole input is checked before any server starts);
2. stop signals (:mod:`pipeline.run.signals`);
3. the LLM servers (managed pool or attached endpoints) and their health monitor (:mod:`pipeline.servers`);
4. the store: with ``store.local_dir`` a node-local copy (:mod:`pipeline.store.staging`, taken before the LLM
   servers start); the store mode (:mod:`pipeline.store.mode`): with ``store.shared`` one loopback Chroma server
   for the node's RAG workers, watched by :class:`pipeline.run.store_supervisor.StoreSupervisor`;
5. the worker set (:mod:`pipeline.run.worker_set`): RAG worker 0 alone first (the rank0 barrier: it may reset
   or ingest the collection), then the other RAG workers and the generation processes;
6. the scheduling loop: the pure :class:`pipeline.run.scheduler.Scheduler` decides, the worker set sends, the
   :class:`pipeline.run.rows.RowWriter` makes and commits rows.

Every start-up step returns what it made; the configuration is not replaced during the run (the workers'
configuration, pointing at the shared Chroma server when there is one, is decided before any worker starts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import Interrupted, OutageError, RunError
from pipeline.messages import EndpointsUp
from pipeline.output.layout import INPUT_SCAN_FILE, LOGS_DIR, meta_dir, meta_path
from pipeline.output.migrate import migrate
from pipeline.run.manifest import build_manifest, server_report
from pipeline.run.signals import StopSignals

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run did.

    Attributes:
        output_dir: the run directory (a shard directory with --shard).
        total: valid records in this run's partition of the input.
        done_before: records already committed by earlier (interrupted) runs.
        processed: records committed by this invocation.
        complete: every record of the partition has its row.
        manifest: the manifest.json content.
    """

    output_dir: Path
    total: int
    done_before: int
    processed: int
    complete: bool
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass
class Servers:
    """The LLM servers of a run, as start-up made them.

    Attributes:
        backend: ``sglang``, ``llamacpp`` or ``attached``.
        pool: the managed :class:`pipeline.servers.pool.ServerPool`, or None (attach mode).
        endpoints: the RAG workers' endpoints; ``gen_endpoints``: the generation endpoints.
        rag_targets: managed SGLang servers ready so far (RAG slot k -> the k-th).
        n_gpus: GPUs this process sees.
        inflight: requests in flight allowed per endpoint.
        monitor: the :class:`pipeline.servers.health.EndpointMonitor` probing every endpoint.
    """

    backend: str
    pool: Any
    endpoints: list[str]
    gen_endpoints: list[str]
    rag_targets: list[Any]
    n_gpus: int
    inflight: dict[str, int]
    monitor: Any


def run_pipeline(cfg: Config, *, progress: bool = True) -> RunResult:
    """Run (or resume) the whole pipeline for ``cfg.run.input`` into ``cfg.run.output``.

    Order: the output directory is created and locked first (a second run into it is refused at once), then
    everything that can be checked without a server is (prompt templates, the store and its collection, the
    whole input); only then do servers start. With ``run.retry_failed`` the committed failed rows are
    re-processed too (with ``run.retry_truncated`` the ok rows whose generation hit max_tokens) and replaced
    exactly once (:meth:`pipeline.output.OutputDir.apply_retries`); the rows retried per reason are logged and
    written to the manifest (``this_invocation.retried``).

    Returns:
        RunResult; the rows are in ``output_dir/part-*.parquet``, the report in ``manifest.json``.

    Raises:
        InputError / ConfigError: no input or output named, bad input, prompt template or setting, or an output
            dir that belongs to another input or identity (before any server starts).
        LockHeld: another live run holds the output directory.
        OutputError: the output path cannot be created or written (not a directory, read-only, disk full).
        StoreError: no store or collection named, or they do not exist (before any server starts).
        ServerError: the server pool could not start or an attached endpoint is unreachable.
        RunError: rank0 failed, or a worker kept dying (finished rows are committed first).
        Interrupted: SIGINT/SIGTERM/SIGUSR1 (finished rows committed; run again to resume).
        OutageError: no LLM endpoint served for ``run.max_outage_s`` (finished rows committed; resumable).
    """
    from pipeline.output import parse_shard, shard_dir
    from pipeline.output.lock import DirLock
    from pipeline.run.required import check_response_format, require_run_names

    cfg = require_run_names(cfg)  # no input, output, store or collection by default: one line, nothing created
    _refuse_staged_ingest(cfg)
    check_response_format(cfg)  # a bad schema is a config error before any server starts
    shard = parse_shard(cfg.run.shard) if cfg.run.shard else None
    out_root = Path(cfg.run.output)
    out_dir = shard_dir(out_root, *shard) if shard else out_root
    created = not out_dir.exists()
    with _output_errors(out_dir, "create"):
        out_dir.mkdir(parents=True, exist_ok=True)
        migrate(out_dir, stale_s=cfg.run.lock_stale_s)  # an earlier version's names into .rag-pipeline/
        if shard:
            migrate(out_root, names=(INPUT_SCAN_FILE,))
    lock = DirLock(out_dir, refresh_s=cfg.run.lock_refresh_s, stale_s=cfg.run.lock_stale_s)
    with _output_errors(out_dir, "lock"):
        lock.acquire()
    try:
        return _run_locked(cfg, progress, out_dir, shard, lock)
    finally:
        lock.release()
        if created:  # only if nothing was written (the run stopped before preparing it)
            for d in (meta_dir(out_dir), out_dir):
                with contextlib.suppress(OSError):
                    d.rmdir()


def _refuse_staged_ingest(cfg: Config) -> None:
    """A run that stages its store (``store.local_dir``) reads a copy shared by the node's tasks: it neither
    ingests nor resets the collection.

    Raises:
        ConfigError: ``run.ingest`` or ``run.reset_collection`` together with ``store.local_dir`` (and no
            ``chroma_url``).
    """
    from pipeline.errors import ConfigError

    if not cfg.store.local_dir or cfg.store.chroma_url:
        return
    if cfg.run.ingest:
        raise ConfigError("--ingest with store.local_dir: a run that stages the store reads a node-local copy and "
                          f"cannot ingest; ingest first (rag-pipeline ingest {cfg.run.ingest} --store "
                          f"{cfg.store.path} --collection {cfg.store.collection}), then run")
    if cfg.run.reset_collection:
        raise ConfigError("--reset-collection with store.local_dir: a run that stages the store reads a node-local "
                          "copy shared by the node's tasks and cannot reset it; reset with rag-pipeline ingest "
                          "--reset first, then run")


def _stage_store(cfg: Config, stack: contextlib.ExitStack) -> tuple[Config, Any]:
    """With ``store.local_dir`` (and a local store), copy the store to the node (:mod:`pipeline.store.staging`),
    held until ``stack`` closes.

    Returns:
        ``(cfg, staged)``: the configuration reading the copy and the
        :class:`pipeline.store.staging.StagedStore`; ``(cfg, None)`` unchanged without ``store.local_dir``.

    Raises:
        StoreError: see :func:`pipeline.store.staging.stage_store`.
    """
    if not cfg.store.local_dir or cfg.store.chroma_url:
        return cfg, None
    from pipeline.store.staging import stage_store

    staged = stack.enter_context(stage_store(cfg.store, cfg.store.local_dir, keep_h=cfg.store.local_keep_h))
    log.info("vector store staged: %s -> %s (%s, %.1f MiB, %.1f s)", staged.source, staged.path,
             "copied" if staged.copied else "copy found on this node", staged.bytes / 2**20, staged.seconds)
    return dataclasses.replace(cfg, store=staged.store_config(cfg.store)), staged


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


@dataclass
class _Started:
    """What start-up made so far (each None until made): read by the manifest whatever happened."""

    signals: StopSignals | None = None
    servers: Servers | None = None
    store_mode: Any = None
    staged: Any = None
    scheduler: Any = None
    workers: Any = None
    metrics: Any = None
    progress: Any = None


def _run_locked(cfg: Config, progress: bool, out_dir: Path, shard: tuple[int, int] | None, lock: Any) -> RunResult:
    """:func:`run_pipeline` once the output directory is locked."""
    from pipeline.dataset.records import iter_records, scan_input, scan_input_cached
    from pipeline.logs import log_to_file
    from pipeline.output import OutputDir, input_fingerprint, shard_size
    from pipeline.run.identity import result_settings, run_identity
    from pipeline.run.rows import RowWriter
    from pipeline.run.state import LiveState
    from pipeline.store.preflight import check_store

    t_start = time.monotonic()
    input_path = Path(cfg.run.input)
    settings = result_settings(cfg)  # prompt templates read and checked here
    check_store(cfg)
    fields = {"id_field": cfg.run.id_field, "query_field": cfg.run.query_field,
              "max_query_chars": cfg.run.max_query_chars, "on_bad_record": cfg.run.on_bad_record}
    fingerprint = input_fingerprint(input_path)
    if shard:  # the shards of one input share one scan: a task then parses only its own records
        scan = scan_input_cached(input_path, meta_path(out_dir.parent, INPUT_SCAN_FILE), fingerprint, **fields)
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
            log.warning("%d bad input lines skipped; see %s", len(scan.rejected), od.rejected_file)
    ledger = od.ledger  # loaded once for the whole run (resume: the ids committed by earlier invocations)
    retry = None  # --retry-failed / --retry-truncated: which committed rows are done again (pipeline.output.resume)
    if cfg.run.retry_failed or cfg.run.retry_truncated:
        retry = od.retry_selection(failed=cfg.run.retry_failed, truncated=cfg.run.retry_truncated)
        log.warning("%s: %s", out_dir, retry.describe())
    retry_ids = retry.ids if retry is not None else set()
    n_done_before = len(ledger) - len(retry_ids)
    n_pending = total - n_done_before
    records = (r for r in iter_records(scan, id_field=cfg.run.id_field, query_field=cfg.run.query_field,
                                       max_query_chars=cfg.run.max_query_chars, limit=cfg.run.limit, shard=shard)
               if r.id not in ledger or r.id in retry_ids)
    progress_view: Any = None
    metrics: Any = None

    def on_row(item: Any, rag: Any, gen: Any, row: dict) -> None:
        live.row(row)
        if progress_view is not None:
            progress_view.finished_one(row.get("rag_status"), row.get("gen_status"))
        if metrics is not None:
            metrics.row_finished(item, rag, gen, row, time.monotonic())

    writer = RowWriter(od, scan.extra_types, part_rows=cfg.run.part_rows, retry_ids=retry_ids, lock=lock,
                       on_row=on_row)
    signals = StopSignals()
    started = _Started(signals=signals)  # what start-up made, for the manifest and the live state
    live = LiveState(out_dir, total=total, done_before=n_done_before, interval_s=cfg.run.progress_interval_s,
                     writer=writer, parts=started)
    main_log = contextlib.ExitStack()
    main_log.enter_context(log_to_file(meta_path(out_dir, LOGS_DIR) / "main.log"))
    interrupted: str | None = None
    try:
        with contextlib.ExitStack() as stack:
            signals.install()
            stack.callback(signals.restore)
            if n_pending > 0:
                from pipeline.run.metrics import start_metrics

                metrics = started.metrics = start_metrics(cfg, stack)  # before any server
                live.set_phase("staging the store")
                read_cfg, started.staged = _stage_store(cfg, stack)  # before servers: a full disk fails fast
                live.set_phase("starting servers")
                servers = _start_servers(cfg, out_dir, signals, stack)
                started.servers = servers
                store_mode, worker_cfg, store_sup = _share_store(read_cfg, servers, out_dir, signals, stack)
                started.store_mode = store_mode
                live.set_phase("starting workers")
                scheduler, workers = _start_workers(worker_cfg, servers, records, store_sup, signals, out_dir, stack)
                started.scheduler, started.workers = scheduler, workers
                from pipeline.run.progress import RunProgress

                progress_view = RunProgress(total, n_done_before, enabled=progress,
                                            interval_s=cfg.run.progress_interval_s, rate_source=live.recent)
                started.progress = progress_view
                stack.callback(progress_view.close)

                def commit_at_exit() -> None:
                    scheduler.stop()
                    servers.monitor.freeze()  # no server restarts during shutdown
                    writer.commit()
                    with _output_errors(out_dir, "write"):
                        od.apply_retries()

                stack.callback(commit_at_exit)
                live.set_phase("running")
                log.info("output %s: rows in part-*.parquet; manifest, live state and logs in %s/", out_dir,
                         meta_dir(out_dir))  # once the run runs: a start-up error stays one line
                _schedule(cfg, scheduler, workers, writer, signals, servers, store_sup, progress_view, live, metrics)
            else:
                stack.callback(writer.commit)
    except (Interrupted, RunError, OutageError) as exc:
        interrupted = str(exc) if isinstance(exc, (Interrupted, OutageError)) else None
        rows = len(od.ledger) + len(writer.pending)
        raise type(exc)(f"{exc}\n{rows} of {total} records have their row in {out_dir}; "
                        "run the same command again to resume") from None
    finally:
        left_uncommitted = started.scheduler.left_uncommitted if started.scheduler is not None else 0
        if left_uncommitted:
            log.warning("%d in-flight records were left uncommitted by the stop (the resume does them)",
                        left_uncommitted)
        servers = started.servers
        manifest = build_manifest(cfg, out_dir, total, endpoints=servers.endpoints if servers else [],
                                  wall_s=time.monotonic() - t_start, processed=writer.processed,
                                  interrupted=interrupted or signals.name or None,
                                  backend=servers.backend if servers else "none", tokens_this_invocation=writer.tokens)
        if retry is not None:
            manifest["this_invocation"]["retried"] = retry.counts
        if servers is not None and servers.pool is not None:
            manifest["servers"] = server_report(servers.pool, servers.rag_targets)
        if started.store_mode is not None:
            manifest["store"] = started.store_mode.as_dict()
        if started.staged is not None:
            manifest.setdefault("store", {})["staged"] = started.staged.as_dict()
        if servers is not None:
            from pipeline.run.metrics import metrics_report

            manifest["metrics"] = metrics_report(started.metrics, servers.pool)
        with _output_errors(out_dir, "write"):
            try:
                od.write_manifest(manifest)
            finally:  # the live state's last word, and main.log closed, whatever stopped the run
                stopped_by = sys.exc_info()[1]
                live.finish(complete=manifest["complete"], reason=interrupted or signals.name or (
                    f"{type(stopped_by).__name__}: {(str(stopped_by).splitlines() or [''])[0]}" if stopped_by else None))
                main_log.close()
    result = RunResult(out_dir, total, n_done_before, writer.processed, manifest["complete"], manifest)
    if not result.complete:
        missing = total - manifest["rows"]
        raise RunError(f"bug: {missing} records of {total} have no row after the run")
    return result


def _observe_probes(scheduler: Any, workers: Any, servers: Servers) -> None:
    """The probes as they are now into the scheduler; endpoints that came back are announced to every worker."""
    back = scheduler.observe_probes(servers.monitor.states(), time.monotonic())
    if back:
        workers.broadcast(EndpointsUp(tuple(back)))


def _schedule(cfg: Config, scheduler: Any, workers: Any, writer: Any, signals: StopSignals, servers: Servers,
              store_sup: Any, progress_view: Any, live: Any = None, metrics: Any = None) -> None:
    """The scheduling loop: feed the scheduler its events, carry out its decisions, until every record has a
    row or a signal, a fatal error or an outage stops the run. Every pass ticks ``live``
    (:class:`pipeline.run.state.LiveState`: the state file, the progress line), records or not.

    Raises:
        Interrupted: a stop signal (after the grace period, or at once on the second one).
        OutageError / RunError / StoreError: from the scheduler, the worker set or the store supervisor.
    """
    grace_deadline: float | None = None
    while True:
        if signals.count >= 2:
            raise Interrupted(f"{signals.name} received twice: stopped immediately")
        if signals.count and grace_deadline is None:
            grace_deadline = time.monotonic() + cfg.run.grace_s
            servers.monitor.freeze()  # no server restarts during shutdown
            scheduler.stop()
        if grace_deadline is not None and time.monotonic() > grace_deadline:
            raise Interrupted(f"{signals.name}: grace period of {cfg.run.grace_s:.0f} s over")
        _observe_probes(scheduler, workers, servers)
        if store_sup is not None:
            scheduler.observe_store(store_sup.down(), store_sup.restarted_at)
        workers.hold_dead()
        if metrics is not None:
            metrics.tick(scheduler, servers.monitor, time.monotonic())
        for send in scheduler.dispatch(time.monotonic()):
            workers.send(send)
        if scheduler.done():
            return
        if signals.count and scheduler.outstanding() == 0:
            raise Interrupted(f"{signals.name} received: stopped after finishing in-flight records")
        got = workers.get(0.2)
        while got is not None:
            w, msg = got
            results = workers.note(w, msg)
            if results is not None:
                # the probes as they are now: a failure that arrived after an endpoint went down is not the record's
                _observe_probes(scheduler, workers, servers)
                retrieved = scheduler.retrieved
                for f in scheduler.on_results(w.name, w.incarnation, *results, time.monotonic()):
                    writer.finish(f.item, f.rag, f.gen)
                for _ in range(scheduler.retrieved - retrieved):
                    progress_view.retrieved_one()
            got = workers.get(0.0)
        for f in workers.check(time.monotonic(), store_sup is not None and store_sup.down()):
            writer.finish(f.item, f.rag, f.gen)
        workers.join_servers(servers.pool)
        if store_sup is not None:
            store_sup.watch()
        if writer.due(time.monotonic()):
            writer.commit()
        if live is not None:
            live.tick()


def _start_servers(cfg: Config, out_dir: Path, signals: StopSignals, stack: contextlib.ExitStack) -> Servers:
    """Attach to --endpoints or start the managed pool, size the in-flight totals, start the health monitor.
    The pool and the monitor are stopped when ``stack`` closes.

    Raises:
        ServerError / ConfigError: a server could not start, an attached endpoint does not answer /v1/models,
            or the API-key environment variable is missing.
    """
    from pipeline.run.worker_set import RagTarget
    from pipeline.servers.attach import (
        api_key_from_env,
        normalize_endpoint,
        resolve_endpoints,
        verify_endpoints,
    )
    from pipeline.servers.gpus import detect_gpus
    from pipeline.servers.health import EndpointMonitor
    from pipeline.servers.plan import fetch_default_model
    from pipeline.servers.pool import ServerPool

    n_gpus = detect_gpus(cfg.servers.gpus)
    pool = None
    rag_targets: list[RagTarget] = []
    if cfg.servers.endpoints:
        endpoints = resolve_endpoints(cfg)
        verify_endpoints(endpoints, api_key_from_env(cfg.servers.api_key_env), cfg.llm.connect_timeout_s + 10)
        backend = "attached"
    else:
        log_dir = Path(cfg.servers.log_dir) if cfg.servers.log_dir else meta_path(out_dir, LOGS_DIR)
        fetch_default_model(cfg)  # first use of the default CPU model: into the model cache
        pool = ServerPool(cfg, log_dir)
        stack.callback(pool.stop)  # whatever happens next
        pool.launch()
        if pool.backend == "sglang":
            # degrading startup: go as soon as one server is ready; the others join as they become ready
            # (WorkerSet.join_servers) or are given up (servers.startup_attempts); all planned endpoints are
            # failover targets (a server still loading refuses connections: the client moves on at once).
            first = pool.wait_ready(first_only=True, abort=lambda: signals.count > 0)
            rag_targets = [RagTarget.of(s) for s in pool.specs if s.url in first]
            endpoints = pool.endpoints
        else:
            endpoints = pool.wait_ready(first_only=False, abort=lambda: signals.count > 0)
        backend = pool.backend
    if cfg.generation.endpoints:
        gen_endpoints = [normalize_endpoint(u) for u in cfg.generation.endpoints]
        key_env = cfg.generation.api_key_env or cfg.servers.api_key_env
        verify_endpoints(gen_endpoints, api_key_from_env(key_env), cfg.llm.connect_timeout_s + 10)
    else:
        gen_endpoints = endpoints
    if cfg.run.deterministic and (cfg.servers.endpoints or cfg.generation.endpoints):
        log.warning(
            "deterministic: the endpoints given were not started by this run; rows repeat only if those servers "
            "were started in a deterministic mode (rag-pipeline serve --deterministic; SGLang "
            "--enable-deterministic-inference)"
        )
    inflight = _size_inflight(cfg, endpoints, gen_endpoints, backend)
    monitor = EndpointMonitor(list(dict.fromkeys([*endpoints, *gen_endpoints])), cfg.servers, pool)
    stack.callback(monitor.stop)
    signals.on_first = monitor.freeze  # no server restart once a stop signal arrived, however busy main is
    if signals.count:
        monitor.freeze()
    monitor.start()
    return Servers(backend, pool, endpoints, gen_endpoints, rag_targets, n_gpus, inflight, monitor)


def _share_store(cfg: Config, servers: Servers, out_dir: Path, signals: StopSignals,
                 stack: contextlib.ExitStack) -> tuple[Any, Config, Any]:
    """Decide ``store.shared`` (:mod:`pipeline.store.mode`) and, when shared, start the node's Chroma server over
    the local store (stopped when ``stack`` closes, after the RAG workers).

    Returns:
        ``(mode, worker_cfg, supervisor)``: the :class:`pipeline.store.mode.StoreMode`; the configuration the
        workers run with (``store.chroma_url`` pointing at the server when shared; BM25 indexes and the ingest
        ledger stay in the store directory); the :class:`StoreSupervisor`, or None when not shared.

    Raises:
        StoreError: the Chroma server could not start.
    """
    from pipeline.run.store_supervisor import StoreSupervisor
    from pipeline.store.chroma_files import count_chunks
    from pipeline.store.mode import decide
    from pipeline.store.server import StoreServer

    n_rag = len(servers.pool.specs) if servers.pool is not None and servers.backend == "sglang" \
        else max(1, len(servers.endpoints))
    chunks = None if cfg.store.chroma_url else count_chunks(
        cfg.store.path, [cfg.store.collection, *cfg.retrieval.collections])
    mode = decide(cfg.store.shared, n_rag, chunks, cfg.store.chroma_url)
    log.info("vector store: %s (%s)", mode.mode, mode.reason)
    if not mode.shared:
        return mode, cfg, None
    store_path = Path(cfg.store.path).resolve()
    store_path.mkdir(parents=True, exist_ok=True)
    server = StoreServer(store_path, "127.0.0.1", log_path=meta_path(out_dir, LOGS_DIR) / "chroma-store.log",
                         shutdown_timeout_s=cfg.servers.shutdown_timeout_s)
    supervisor = StoreSupervisor(server, stopping=lambda: signals.count > 0)
    stack.callback(supervisor.stop)
    url = server.start(abort=lambda: signals.count > 0)
    store = dataclasses.replace(cfg.store, chroma_url=url, token_env="", ca_file="",  # plain http, no token
                                bm25_path=cfg.store.bm25_path or str(store_path / "bm25"))
    log.info("vector store shared: one Chroma server %s over %s for %d RAG workers", url, store_path, n_rag)
    return dataclasses.replace(mode, url=url), dataclasses.replace(cfg, store=store), supervisor


def _start_workers(cfg: Config, servers: Servers, records: Iterator[Any], store_sup: Any, signals: StopSignals,
                   out_dir: Path, stack: contextlib.ExitStack) -> tuple[Any, Any]:
    """Make the scheduler and the worker set, pass the rank0 barrier, start the other workers. The workers are
    stopped when ``stack`` closes (at once after a second signal).

    Returns:
        ``(scheduler, workers)``.

    Raises:
        RunError: rank0 failed; Interrupted: a signal arrived while waiting for it.
    """
    from pipeline.run.endpoints import EndpointHealth
    from pipeline.run.scheduler import Scheduler
    from pipeline.run.worker_set import RagTarget, WorkerSet

    health = EndpointHealth(cfg.llm.breaker_failures, cfg.llm.breaker_cooldown_s)
    scheduler = Scheduler(cfg, records, inflight=servers.inflight, rag_urls=servers.endpoints,
                          gen_urls=servers.gen_endpoints, health=health, now=time.monotonic())
    workers = WorkerSet(cfg, scheduler, endpoints=servers.endpoints, gen_endpoints=servers.gen_endpoints,
                        rag_targets=servers.rag_targets, n_gpus=servers.n_gpus, log_dir=meta_path(out_dir, LOGS_DIR))
    stack.callback(lambda: workers.shutdown(force=signals.count >= 2))
    if store_sup is not None:
        scheduler.observe_store(store_sup.down(), store_sup.restarted_at)
    workers.start_rank0(lambda: signals.name if signals.count else "")
    if servers.pool is not None and servers.backend == "sglang":
        for spec in servers.pool.poll_startup():  # servers that became ready while rank0 started
            servers.rag_targets.append(RagTarget.of(spec))
    workers.start_others(len(servers.rag_targets) if servers.rag_targets else max(1, len(servers.endpoints)))
    return scheduler, workers


def _size_inflight(cfg: Config, endpoints: list[str], gen_endpoints: list[str], backend: str) -> dict[str, int]:
    """In-flight total per endpoint: ``llm.max_concurrency``, else 1.25 x the server's batch (managed llama.cpp:
    its slots; SGLang and attached endpoints: what the server reports, else
    :data:`pipeline.llm.client.DEFAULT_BATCH`)."""
    from pipeline.llm.client import inflight_per_endpoint, probe_batch
    from pipeline.servers.attach import api_key_from_env
    from pipeline.servers.llamacpp import slots as llamacpp_slots

    keys = {e: api_key_from_env(cfg.servers.api_key_env) for e in endpoints}
    gen_key = api_key_from_env(cfg.generation.api_key_env or cfg.servers.api_key_env)
    for e in gen_endpoints:
        keys.setdefault(e, gen_key)
    inflight: dict[str, int] = {}
    for e, key in keys.items():
        if cfg.llm.max_concurrency > 0:
            batch = None
        elif backend == "llamacpp" and e in endpoints:
            batch = llamacpp_slots(cfg)  # one request per continuous-batching slot
        else:
            batch = probe_batch(e, api_key=key, timeout_s=cfg.llm.connect_timeout_s)
        inflight[e] = inflight_per_endpoint(cfg.llm, batch)
        log.info("endpoint %s: batch %s, %d requests in flight", e, batch if batch else "unknown", inflight[e])
    total_gen = sum(inflight[e] for e in gen_endpoints)
    log.info("generation: %d processes, %d requests in flight each", cfg.generation.num_processes,
             max(1, math.ceil(total_gen / max(1, cfg.generation.num_processes))))
    return inflight
