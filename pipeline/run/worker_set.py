"""The worker set: the RAG worker and generation processes of a run, from spawn to shutdown.

It owns the processes and nothing about records: spawning (spawn start method), the rank0 barrier, result
pipes and heartbeats, deciding that a worker is dead or hung, replacing it, and stopping every worker at the
end (sentinel, deadline, then SIGKILL). What a lost worker's records become is the scheduler's decision
(:meth:`pipeline.run.scheduler.Scheduler.on_worker_lost`).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import Interrupted, RunError
from pipeline.messages import (
    EndpointsUp,
    Fatal,
    GenResult,
    GenResults,
    RagResult,
    RagResults,
    Ready,
    WorkerMessage,
)
from pipeline.run.scheduler import RAG, Finish, Scheduler, Send

log = logging.getLogger(__name__)


@dataclass
class RagTarget:
    """Where the RAG worker of a managed SGLang server runs.

    Attributes:
        endpoint: the server's URL; ``device``: its first GPU as ``cuda:N`` relative to the GPUs this process
        sees (the worker inherits CUDA_VISIBLE_DEVICES); ``gpus``: the server's physical GPU ids;
        ``server``: the server's index in the pool; ``rag_worker`` / ``embedding_device``: set at spawn.
    """

    endpoint: str
    device: str
    gpus: list[str]
    server: int
    rag_worker: str | None = None
    embedding_device: str | None = None

    @classmethod
    def of(cls, spec: Any) -> RagTarget:
        """The target of a :class:`pipeline.servers.pool.ServerSpec`."""
        return cls(spec.url, f"cuda:{spec.visible_gpu or 0}", [str(g) for g in spec.gpus], spec.index)


@dataclass(eq=False)
class WorkerProcess:
    """One worker process: its inbox, its result pipe's reader and why it ended, if it did."""

    name: str
    kind: str
    incarnation: int
    process: Any
    inbox: Any
    reader: Any = None  # pipeline.run.channels.ChannelReader (heartbeat clock: reader.last_seen)
    endpoint: str | None = None
    stopping: bool = False
    last_error: str | None = None  # last line of the traceback it reported, if any
    store_wait: bool = False  # died while the run's Chroma server was down: replaced once it is back


def last_line(tb: str) -> str:
    """The last non-empty line of a traceback text (the exception), for one-line messages."""
    lines = [ln for ln in str(tb).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else str(tb)


class WorkerSet:
    """The run's worker processes.

    Args:
        cfg: the configuration the workers run with (its ``store`` points at the run's Chroma server when shared).
        scheduler: told of every worker started and lost.
        endpoints: the RAG workers' endpoints; ``gen_endpoints``: the generation processes' endpoints.
        rag_targets: managed SGLang servers already ready (RAG slot k -> the k-th); empty otherwise.
        n_gpus: GPUs this process sees (RAG workers beyond the targets embed on ``cuda:slot`` or the CPU).
        log_dir: where rank0's traceback and each worker's log (``<name>.log``) are written.
    """

    def __init__(self, cfg: Config, scheduler: Scheduler, *, endpoints: list[str], gen_endpoints: list[str],
                 rag_targets: list[RagTarget], n_gpus: int, log_dir: Path) -> None:
        self.cfg = cfg
        self.scheduler = scheduler
        self.endpoints = endpoints
        self.gen_endpoints = gen_endpoints
        self.rag_targets = rag_targets
        self.n_gpus = n_gpus
        self.log_dir = log_dir
        self.ctx = mp.get_context("spawn")
        self.results: queue.Queue = queue.Queue()  # (worker, message) from every worker's own result pipe
        self.procs: dict[str, WorkerProcess] = {}

    # ------------------------------------------------------------------ spawning
    def spawn(self, kind: str, slot: int, rank0: bool = False) -> WorkerProcess:
        """Start worker ``{kind}-{slot}`` and register it with the scheduler."""
        from pipeline.logs import child_setup
        from pipeline.run.channels import ChannelReader, open_channel
        from workers.generation import generation_worker_main
        from workers.rag_worker import rag_worker_main

        inbox = self.ctx.Queue()
        read_end, write_end = open_channel(self.ctx)
        name = f"{kind}-{slot}"
        if kind == RAG:
            endpoint = self.endpoints[slot % len(self.endpoints)] if self.endpoints else None
            device = self.cfg.embedding.device
            if slot < len(self.rag_targets):  # managed SGLang: the GPU (and endpoint) of this worker's server
                target = self.rag_targets[slot]
                endpoint = target.endpoint
                if device == "auto":
                    device = target.device
                target.rag_worker, target.embedding_device = name, device
                log.info("%s: server %s on GPU(s) %s, embedding on %s", name, endpoint, ",".join(target.gpus),
                         device)
            elif device == "auto":
                device = f"cuda:{slot}" if slot < self.n_gpus else "cpu"
            threads = self.scheduler.inflight.get(endpoint or "", 1)
            args = (name, rank0, self.cfg, endpoint, self.endpoints, device, self._cpu_threads(), threads,
                    inbox, write_end, os.getpid())
            proc = self.ctx.Process(target=rag_worker_main, args=args, name=name, daemon=True,
                                    kwargs={"log_setup": child_setup(name, self.log_dir)})
        else:
            endpoint = None
            args = (name, self.cfg, self.gen_endpoints, self.scheduler.gen_threads_per_process(), inbox, write_end,
                    os.getpid())
            proc = self.ctx.Process(target=generation_worker_main, args=args, name=name, daemon=True,
                                    kwargs={"log_setup": child_setup(name, self.log_dir)})
        proc.start()
        write_end.close()  # only the worker holds the write end now: its death is end-of-file for the reader
        log.info("started %s (pid %s)", name, proc.pid)
        view = self.scheduler.add_worker(name, kind, endpoint)
        w = WorkerProcess(name=name, kind=kind, incarnation=view.incarnation, process=proc, inbox=inbox,
                          endpoint=endpoint)
        w.reader = ChannelReader(read_end, w, self.results)
        self.procs[name] = w
        return w

    def _cpu_threads(self) -> int:
        """torch threads per RAG worker (on CPU or GPU): embedding.cpu_threads, or cores // (RAG workers + 1)."""
        if self.cfg.embedding.cpu_threads > 0:
            return self.cfg.embedding.cpu_threads
        n_workers = max(1, len(self.rag_targets) or len(self.endpoints))
        return max(1, (os.cpu_count() or 1) // (n_workers + 1))

    def start_rank0(self, interrupted: Any) -> None:
        """Start RAG worker 0 alone and block until it reports READY (the rank0 barrier).

        Args:
            interrupted: returns the name of a stop signal received meanwhile, or "".

        Raises:
            RunError: rank0 failed, exited, hung or was not ready within ``run.ready_timeout_s``.
            Interrupted: a stop signal arrived while waiting.
        """
        w = self.spawn(RAG, 0, rank0=True)
        deadline = time.monotonic() + self.cfg.run.ready_timeout_s
        while True:
            got = self.get(0.2)
            msg = got[1] if got is not None and got[0] is w else None
            if isinstance(msg, Ready):
                log.info("rank0 READY: %s", msg.detail)
                return
            if isinstance(msg, Fatal):
                raise RunError(self._rank0_error(msg.traceback))
            if not w.process.is_alive() and msg is None:
                w.reader.closed.wait(2.0)  # a Fatal message may still be in the pipe
                while (got := self.get(0.0)) is not None:
                    if got[0] is w and isinstance(got[1], Fatal):
                        raise RunError(self._rank0_error(got[1].traceback))
                raise RunError(f"RAG worker 0 (rank0) exited with code {w.process.exitcode} during startup")
            if name := interrupted():
                raise Interrupted(f"{name} received while waiting for rank0")
            silent_s = time.monotonic() - w.reader.last_seen
            if silent_s > self.cfg.run.heartbeat_timeout_s:
                w.process.kill()
                raise RunError(f"RAG worker 0 (rank0) hung during startup: no heartbeat for {silent_s:.0f} s "
                               "(run.heartbeat_timeout_s)")
            if time.monotonic() > deadline:
                raise RunError(f"RAG worker 0 (rank0) not READY after {self.cfg.run.ready_timeout_s:.0f} s")

    def _rank0_error(self, tb: str) -> str:
        """One-line message for rank0's failure; the full traceback (carried over the pipe) goes to a file."""
        path = self.log_dir / "rank0-error.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(tb)
            where = f" (traceback: {path})"
        except OSError:
            where = ""
            log.error("rank0 traceback:\n%s", tb)
        return f"RAG worker 0 (rank0) failed during startup: {last_line(tb)}{where}"

    def start_others(self, n_rag: int) -> None:
        """Start RAG workers 1..n_rag-1 and the generation processes (after the rank0 barrier)."""
        for slot in range(1, n_rag):
            self.spawn(RAG, slot)
        for slot in range(self.cfg.generation.num_processes):
            self.spawn("gen", slot)

    def join_servers(self, pool: Any) -> None:
        """Managed servers that became ready since the last call get their RAG worker (degrading startup)."""
        if pool is None or not pool.starting():
            return
        joined = {t.server for t in self.rag_targets}
        for spec in pool.poll_startup():
            if spec.index in joined:  # a server that was ready before (restarted): its RAG worker is there
                continue
            self.rag_targets.append(RagTarget.of(spec))
            self.spawn(RAG, len(self.rag_targets) - 1)
            log.info("server %s joined the run (%d of %d ready)", spec.url, len(self.rag_targets), len(pool.specs))

    # ------------------------------------------------------------------ messages
    def get(self, timeout_s: float) -> tuple[WorkerProcess, WorkerMessage | None] | None:
        """The next ``(worker, message)`` from any result pipe (message None: that pipe ended), or None."""
        try:
            if timeout_s <= 0:
                return self.results.get_nowait()
            return self.results.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def hold_dead(self) -> None:
        """Tell the scheduler to send nothing to workers whose process is gone (replaced at the next
        :meth:`check`)."""
        for name, w in self.procs.items():
            if not w.stopping and not w.process.is_alive():
                self.scheduler.hold(name)

    def send(self, send: Send) -> None:
        """Put a scheduler's :class:`Send` into its worker's inbox."""
        self.procs[send.worker].inbox.put(send.items)

    def broadcast(self, msg: EndpointsUp) -> None:
        """Put a control message into the inbox of every worker that is not stopping."""
        for w in self.procs.values():
            if not w.stopping and w.process.is_alive():
                w.inbox.put(msg)

    def note(self, w: WorkerProcess, msg: WorkerMessage | None
             ) -> tuple[str, list[RagResult] | list[GenResult]] | None:
        """Take a control message (Ready, Fatal, the end of the pipe) into account; return ``(stage, results)``
        for results."""
        if msg is None:  # its result pipe ended: the worker exited, died, or sent something unreadable
            if not w.stopping and w.process.is_alive() and not w.last_error:
                w.last_error = "its result channel closed"
            return None
        if isinstance(msg, Ready):
            log.info("%s READY", msg.worker)
        elif isinstance(msg, Fatal):
            log.error("%s failed:\n%s", msg.worker, msg.traceback)
            w.last_error = last_line(msg.traceback)
        elif isinstance(msg, RagResults):
            return RAG, msg.results
        elif isinstance(msg, GenResults):
            return "gen", msg.results
        return None

    # ------------------------------------------------------------------ liveness
    def check(self, now: float, store_down: bool) -> list[Finish]:
        """Replace dead or hung workers (silent past ``run.heartbeat_timeout_s``, or holding a record past its
        stage's deadline); the scheduler decides what their records become.

        Args:
            now: monotonic seconds; ``store_down``: the run's own Chroma server is down (RAG replacements wait).

        Returns:
            rows to write (records whose worker died twice).

        Raises:
            RunError: a worker slot kept dying (from the scheduler).
        """
        overdue = dict(self.scheduler.overdue(now))
        finishes: list[Finish] = []
        for name, w in list(self.procs.items()):
            if w.stopping:
                continue
            hung = None
            if w.process.is_alive() and not w.last_error:
                silent_s = now - w.reader.last_seen
                if silent_s > self.cfg.run.heartbeat_timeout_s:
                    hung = f"hung: no heartbeat for {silent_s:.0f} s (run.heartbeat_timeout_s)"
                else:
                    hung = overdue.get(name)
                if hung is None:
                    continue
            reason = hung or w.last_error or f"exit code {w.process.exitcode}"
            if w.process.is_alive():
                w.process.kill()  # also ends a SIGSTOPped process
                w.process.join(timeout=5)
            lost = self.scheduler.on_worker_lost(name, reason, now)
            finishes.extend(lost.finishes)
            if w.kind == RAG and store_down and not lost.replace and not self.scheduler.stopping:
                w.store_wait = True  # replaced once the store is back (checked again next tick)
                continue
            w.stopping = True
            if lost.replace:
                self.spawn(w.kind, int(name.rsplit("-", 1)[1]))
        return finishes

    def shutdown(self, force: bool = False) -> None:
        """Sentinel to every worker, join with a deadline, then kill (no orphans; a SIGSTOPped one too)."""
        workers = list(self.procs.values())
        for w in workers:
            w.stopping = True
            if not force:
                try:
                    w.inbox.put(None)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + (0.5 if force else 10.0)
        for w in workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in workers:  # workers ignore SIGTERM (see workers.protocol): kill the stragglers
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
        for w in workers:
            w.inbox.cancel_join_thread()
