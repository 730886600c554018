"""The run's scheduler: where every record is, and what to send where next.

Pure: no process, thread, socket or file. The orchestrator feeds it events (results, lost workers, probe
states, the store's state) with the time ``now`` (monotonic seconds) and carries out what it returns
(:class:`Send`: put these work items into that worker's inbox; :class:`Finish`: make this record's row).
Every rule of record flow lives here and is unit-tested without processes (tests/unit/test_scheduler*.py):

- **Dispatch with in-flight credits.** Each endpoint has a total of requests in flight (``inflight``: RAG
  answers and generations together). Generations go first (they finish records), then new records to the RAG
  workers in micro-batches of ``retrieval.query_batch_size``; a busy RAG worker is sent only full
  micro-batches. At most ``run.queue_size`` RAG results wait for a generation (backpressure on the input).
- **Routing with prefix-cache affinity.** A record's generation goes to the endpoint that made its RAG answer
  while that endpoint is healthy (its KV cache holds the shared prompt prefix), else to the least loaded
  healthy one; waiting generations of an endpoint that turned unhealthy are rerouted.
- **Claims.** A result is used only if its worker incarnation still holds the record (a late duplicate from a
  worker declared dead is dropped). Overload (429/503 for too long) is never a failure: the record is sent
  again. A failure whose cause is the endpoints (``retry_cause`` "llm") or the run's own store (``"store"``)
  becomes a failure row only while the endpoints are healthy (every endpoint of the stage up by probe and
  another request of the stage succeeded since the record was dispatched); otherwise the record goes back to
  its stage's queue (at most ``MAX_DEFERRALS`` times) and the stage pauses briefly.
- **Requeue once.** The records of a worker that died or hung go back to their stage's queue; a record whose
  worker died twice while holding it gets a failure row (a poison record must not stop the run). A worker
  slot that dies more than ``MAX_WORKER_RESTARTS`` times in a row without delivering a result stops the run.
- **Pauses and outages.** A stage pauses while none of its endpoints is up by probe, or for a hold after
  records failed on every endpoint; past ``run.max_outage_s`` without a successful request while in trouble
  the run stops (:class:`pipeline.errors.OutageError`). RAG dispatch also pauses while the run's own Chroma
  server is down.
- **Stopping is not failing.** Once stopping, no new record is read; failures for a retryable cause and the
  records of workers that die are left uncommitted (counted in ``left_uncommitted``) for the resume.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.errors import OutageError, RunError
from pipeline.llm.outcome import LLM_CAUSE
from pipeline.messages import STORE_CAUSE, GenResult, RagResult, WorkItem
from pipeline.run.endpoints import EndpointHealth

log = logging.getLogger(__name__)

MAX_WORKER_RESTARTS = 3
"""Deaths in a row (without a result in between) after which a worker slot stops the run."""
MAX_DEFERRALS = 50
"""A record sent back to the queue this many times for endpoint or store trouble gets its failure row."""
TROUBLE_HOLD_S = 1.0
"""Dispatch pause after a record failed on every endpoint while the endpoints' breakers are not all open."""

RAG = "rag"
GEN = "gen"


@dataclass
class Send:
    """Put ``items`` into the inbox of worker ``worker`` (its slot name)."""

    worker: str
    items: list[WorkItem]


@dataclass
class Finish:
    """Record ``item`` is done: its row is made from the RAG result ``rag`` and the generation result ``gen``
    (None: generation skipped after a RAG hard failure)."""

    item: WorkItem
    rag: RagResult
    gen: GenResult | None


@dataclass
class Lost:
    """What the loss of a worker means: rows to write (records whose worker died twice) and whether the
    worker set starts a replacement now (False while the run stops or the run's store is down)."""

    finishes: list[Finish] = field(default_factory=list)
    replace: bool = False


@dataclass(eq=False)
class WorkerSlot:
    """The scheduler's view of one worker process.

    Attributes:
        name: slot name (``rag-0``, ``gen-3``): a replacement keeps it.
        kind: ``"rag"`` or ``"gen"``.
        incarnation: number of the process in this slot (results of an older one are late duplicates).
        endpoint: a RAG worker's own LLM endpoint, else None.
        credit: work items it may hold (RAG without an LLM answer: 2 micro-batches; generation: its threads).
        assigned: the records it holds, in dispatch order (the first is the oldest).
        accepting: False once it died, hung or is stopping: nothing more is sent to it.
    """

    name: str
    kind: str
    incarnation: int
    endpoint: str | None
    credit: int
    assigned: dict[str, WorkItem] = field(default_factory=dict)
    accepting: bool = True


@dataclass(eq=False)
class StageHealth:
    """Endpoint trouble as one stage sees it (``rag``: the RAG workers' endpoints, ``gen``: generation's).

    Attributes:
        urls: the stage's endpoints.
        last_ok: time of the last result of the stage with a successful LLM request.
        outage_since: the stage's endpoints are in trouble and no request succeeded since, or None.
        hold_until: dispatch of the stage pauses until then.
    """

    name: str
    urls: list[str]
    last_ok: float = 0.0
    outage_since: float | None = None
    hold_until: float = 0.0
    paused_logged: bool = False


def _probe_summary(states: dict[str, str]) -> str:
    """``all up`` when every endpoint's probe is up, else the states."""
    return "all up" if states and all(v == "up" for v in states.values()) else str(states)


class Scheduler:
    """Record flow of one run (see the module docstring for the rules).

    Args:
        cfg: the run's configuration (read only).
        records: the records still to do, each with ``.id`` (str), ``.query`` (str), ``.extra`` (dict).
        inflight: requests in flight allowed per endpoint URL (RAG answers + generations together).
        rag_urls: the RAG workers' endpoints; ``gen_urls``: the generation endpoints.
        health: the run's :class:`EndpointHealth`.
        now: the start time (monotonic seconds).
    """

    def __init__(self, cfg: Config, records: Iterator[Any], *, inflight: dict[str, int], rag_urls: list[str],
                 gen_urls: list[str], health: EndpointHealth, now: float = 0.0) -> None:
        self.cfg = cfg
        self._records = records
        self.inflight = dict(inflight)
        self.gen_urls = list(gen_urls)
        self.health = health
        self.stages = {RAG: StageHealth(RAG, list(rag_urls)), GEN: StageHealth(GEN, list(gen_urls))}
        self.workers: dict[str, WorkerSlot] = {}
        self.exhausted = False
        self.stopping = False
        self.rag_retry: collections.deque[WorkItem] = collections.deque()
        self.gen_queues: dict[str, collections.deque[WorkItem]] = {}
        self.gen_waiting = 0
        self.gen_inflight: collections.Counter[str] = collections.Counter()
        self.requeued: collections.Counter[str] = collections.Counter()
        self.deferred: collections.Counter[str] = collections.Counter()
        self.deaths: collections.Counter[str] = collections.Counter()
        self.retrieved = 0
        self.left_uncommitted = 0
        self.store_down = False
        self.store_restarted_at = float("-inf")
        self.store_shared = False
        self._incarnations: collections.Counter[str] = collections.Counter()
        self._answer = cfg.rag.mode == "retrieve+answer"

    # ------------------------------------------------------------------ workers
    def add_worker(self, name: str, kind: str, endpoint: str | None = None) -> WorkerSlot:
        """A worker process started in slot ``name`` (a replacement keeps the slot's place in dispatch order).

        Returns:
            its :class:`WorkerSlot` (``incarnation`` tags its results).
        """
        self._incarnations[name] += 1
        credit = (2 * self.cfg.retrieval.query_batch_size if kind == RAG
                  else self.gen_threads_per_process())
        slot = WorkerSlot(name, kind, self._incarnations[name], endpoint, credit)
        self.workers[name] = slot
        return slot

    def gen_threads_per_process(self) -> int:
        """Generations in flight per generation process: its share of the generation endpoints' totals."""
        total = sum(self.inflight.get(e, 1) for e in self.gen_urls)
        return max(1, -(-total // max(1, self.cfg.generation.num_processes)))

    def hold(self, name: str) -> None:
        """Send nothing more to worker ``name`` (its process is gone; :meth:`on_worker_lost` follows)."""
        self.workers[name].accepting = False

    def overdue(self, now: float) -> list[tuple[str, str]]:
        """``(slot, reason)`` of accepting workers whose oldest record is past its stage's deadline
        (``run.rag_deadline_s`` / ``run.gen_deadline_s``)."""
        out = []
        for w in self.workers.values():
            if not w.accepting or not w.assigned:
                continue
            oldest = next(iter(w.assigned.values()))
            age_s = now - oldest.t_dispatch
            deadline_s = self.cfg.run.rag_deadline_s if w.kind == RAG else self.cfg.run.gen_deadline_s
            if age_s > deadline_s:
                out.append((w.name, f"hung: record {oldest.id!r} held {age_s:.0f} s "
                                    f"(run.{w.kind}_deadline_s = {deadline_s:g})"))
        return out

    def on_worker_lost(self, name: str, reason: str, now: float) -> Lost:
        """Worker ``name`` died or was killed as hung: requeue its records once, or write their failure rows.

        While the run's own Chroma server is down a RAG worker's records go back without counting (the store,
        not the records, is to blame) and the replacement waits until the server is back: call again then.

        Raises:
            RunError: the slot died more than ``MAX_WORKER_RESTARTS`` times in a row without a result.
        """
        w = self.workers[name]
        w.accepting = False
        if w.kind == RAG and not self.stopping and self.store_down:
            if w.assigned:
                log.warning("%s died (%s) while the run's Chroma server is down: %d records sent again, the "
                            "worker is replaced when the server is back", name, reason, len(w.assigned))
            for item in w.assigned.values():
                item.rag = None
                self.rag_retry.append(item)
            w.assigned.clear()
            return Lost(replace=False)
        if self.stopping:
            if w.assigned:
                log.warning("%s died (%s) while the run stops: %d in-flight records left for the resume",
                            name, reason, len(w.assigned))
            self.left_uncommitted += len(w.assigned)
            w.assigned.clear()
            return Lost(replace=False)
        log.warning("%s %s (%s); requeueing %d in-flight records", name,
                    "is hung" if reason.startswith("hung") else "died", reason, len(w.assigned))
        lost = Lost(replace=True)
        for rid, item in w.assigned.items():
            if w.kind == GEN:
                self._gen_done(item)
            self.requeued[rid] += 1
            if self.requeued[rid] > 1:
                err = f"worker {name} died twice while processing this record ({reason})"
                if w.kind == GEN:
                    lost.finishes.append(Finish(item, item.rag, GenResult(rid, gen_status="failed", gen_error=err)))
                else:
                    lost.finishes.append(Finish(item, RagResult(rid, rag_status="hard_fail", rag_error=err), None))
            elif w.kind == RAG:
                item.rag = None
                self.rag_retry.append(item)
            else:
                self._queue_gen(item, now, front=True)
        w.assigned.clear()
        if self.deaths[name] >= MAX_WORKER_RESTARTS:
            raise RunError(f"{name} died {self.deaths[name] + 1} times in a row; last error: {reason}")
        self.deaths[name] += 1
        return lost

    def stop(self) -> None:
        """The run stops: read no new record; records not started yet are left for the resume."""
        if not self.stopping:
            self.stopping = True
            self.rag_retry.clear()

    def outstanding(self) -> int:
        """Records read from the input that have no row yet (held by workers or waiting in a queue)."""
        return sum(len(w.assigned) for w in self.workers.values()) + self.gen_waiting + len(self.rag_retry)

    def done(self) -> bool:
        """Every record of the input has been read and finished."""
        return self.exhausted and self.outstanding() == 0

    # ------------------------------------------------------------------ endpoints
    def observe_probes(self, states: dict[str, str], now: float) -> list[str]:
        """Take the health probe's ``{url: state}`` (see :class:`pipeline.run.endpoints.EndpointHealth`).

        An endpoint that came back (probed up after being seen otherwise) ends the hold of each stage it
        serves: a hold that waited for endpoints in trouble has nothing left to wait for.

        Returns:
            the endpoints that came back, for the workers' LLM clients
            (:class:`pipeline.messages.EndpointsUp`); usually empty.
        """
        back = self.health.observe_probes(states)
        for h in self.stages.values():
            if any(u in h.urls for u in back) and h.hold_until > now:
                log.debug("%s hold ended: %s answer again", h.name, ", ".join(u for u in back if u in h.urls))
                h.hold_until = now
        return back

    # ------------------------------------------------------------------ store
    def observe_store(self, down: bool, restarted_at: float) -> None:
        """The run's own Chroma server (``store.shared``): ``down`` while dead or being restarted;
        ``restarted_at``: time of its last successful restart."""
        self.store_shared = True
        self.store_down = down
        self.store_restarted_at = restarted_at

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, now: float) -> list[Send]:
        """Work to send now: generations first, then new records to RAG workers in micro-batches.

        Raises:
            OutageError: a stage's endpoints have been in trouble for longer than ``run.max_outage_s``.
        """
        paused = {stage: self._paused(stage, now) for stage in (RAG, GEN)}
        if paused[GEN] and self.stopping and self.gen_waiting:
            for q in self.gen_queues.values():  # no endpoint while stopping: left for the resume
                self.left_uncommitted += len(q)
                q.clear()
            self.gen_waiting = 0
        sends: list[Send] = []
        load = self._loads()
        if not paused[GEN]:
            self._dispatch_gen(load, now, sends)
        if paused[RAG]:
            return sends
        batch_size = self.cfg.retrieval.query_batch_size
        for w in self.workers.values():
            if w.kind != RAG or not w.accepting:
                continue
            while self.gen_waiting < self.cfg.run.queue_size:
                if self._answer and w.endpoint:
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
                    it.t_dispatch = now
                    it.t_first_dispatch = it.t_first_dispatch or now
                    w.assigned[it.id] = it
                if w.endpoint:
                    load[w.endpoint] += len(items)
                sends.append(Send(w.name, items))
        return sends

    def _next_record(self) -> WorkItem | None:
        if self.rag_retry:
            return self.rag_retry.popleft()
        if self.exhausted or self.stopping:
            return None
        try:
            rec = next(self._records)
        except StopIteration:
            self.exhausted = True
            return None
        return WorkItem(rec.id, rec.query, rec.extra, index=rec.index)

    def _dispatch_gen(self, load: collections.Counter[str], now: float, sends: list[Send]) -> None:
        gen = [w for w in self.workers.values() if w.kind == GEN and w.accepting]
        if not gen or not self.gen_waiting:
            return
        any_healthy = any(self.health.healthy(e, now) for e in self.gen_urls)
        for e in list(self.gen_queues):
            q = self.gen_queues[e]
            if q and any_healthy and not self.health.healthy(e, now):  # its endpoint failed meanwhile: reroute
                moved = list(q)
                q.clear()
                self.gen_waiting -= len(moved)
                for item in moved:
                    self._queue_gen(item, now)
        for e, q in self.gen_queues.items():
            free = self.inflight.get(e, 1) - load[e]
            while q and free > 0:
                w = min(gen, key=lambda g: len(g.assigned))
                if len(w.assigned) >= w.credit:
                    return
                item = q.popleft()
                self.gen_waiting -= 1
                item.t_dispatch = now
                w.assigned[item.id] = item
                self.gen_inflight[e] += 1
                load[e] += 1
                free -= 1
                sends.append(Send(w.name, [item]))

    def _paused(self, stage: str, now: float) -> bool:
        h = self.stages[stage]
        if stage == RAG and self.store_down:
            return True
        if stage == RAG and not self._answer:
            return False
        down = not self.health.any_up(h.urls)
        if down and h.outage_since is None:
            h.outage_since = now
        if h.outage_since is not None and now - h.outage_since > self.cfg.run.max_outage_s:
            raise OutageError(
                f"no {stage} LLM endpoint served a request for {now - h.outage_since:.0f} s "
                f"(run.max_outage_s = {self.cfg.run.max_outage_s:g}); endpoint states: "
                f"{self.health.states(h.urls)}")
        paused = down or now < h.hold_until
        if paused and not h.paused_logged:
            if down:
                log.warning("%s endpoints unavailable (%s): %s dispatch paused until one answers (at most "
                            "run.max_outage_s = %g s)", stage, self.health.states(h.urls), stage,
                            self.cfg.run.max_outage_s)
            else:  # the probes answer, but records failed on every endpoint: a hold, not an outage
                log.warning("%s dispatch paused: held for %.0f s after records failed on every endpoint (probes: %s)",
                            stage, h.hold_until - now, _probe_summary(self.health.states(h.urls)),
                            extra={"repeat_key": f"{stage} dispatch held after failures"})
            h.paused_logged = True
        elif not paused and h.paused_logged:
            log.warning("%s dispatch resumed", stage, extra={"repeat_key": f"{stage} dispatch resumed"})
            h.paused_logged = False
        return paused

    def paused(self, stage: str, now: float) -> str | None:
        """Why dispatch of ``stage`` (``rag`` / ``gen``) is paused now (``"store down"``, ``"endpoints down"``,
        ``"held N s"``), or None; read only (no outage clock, no log)."""
        h = self.stages[stage]
        if stage == RAG and self.store_down:
            return "store down"
        if stage == RAG and not self._answer:
            return None
        if not self.health.any_up(h.urls):
            return "endpoints down"
        if now < h.hold_until:
            return f"held {h.hold_until - now:.0f} s"
        return None

    # ------------------------------------------------------------------ routing
    def _loads(self) -> collections.Counter[str]:
        """Records in flight per endpoint: generations sent there + records held by its RAG worker (when RAG
        workers ask their endpoint for an answer)."""
        load = collections.Counter(self.gen_inflight)
        if self._answer:
            for w in self.workers.values():
                if w.kind == RAG and w.endpoint:
                    load[w.endpoint] += len(w.assigned)
        return load

    def in_flight(self) -> dict[str, int]:
        """Requests in flight per endpoint now (every endpoint with a total, 0 included): generations sent there
        plus the records its RAG worker holds when RAG workers ask for answers."""
        load = self._loads()
        return {e: load[e] for e in self.inflight}

    def route(self, item: WorkItem, now: float) -> str:
        """The generation endpoint of a record: the endpoint of its RAG answer while healthy, else the least
        loaded healthy one (all of them when none is healthy)."""
        rag_ep = item.rag.endpoint if item.rag is not None else None
        if rag_ep in self.inflight and rag_ep in self.gen_urls and self.health.healthy(rag_ep, now):
            return rag_ep
        healthy = [e for e in self.gen_urls if self.health.healthy(e, now)] or self.gen_urls
        load = self._loads()
        return min(healthy, key=lambda e: (load[e] + len(self.gen_queues.get(e, ()))) / self.inflight.get(e, 1))

    def _queue_gen(self, item: WorkItem, now: float, front: bool = False) -> None:
        item.target = self.route(item, now)
        q = self.gen_queues.setdefault(item.target, collections.deque())
        if front:
            q.appendleft(item)
        else:
            q.append(item)
        self.gen_waiting += 1

    def _gen_done(self, item: WorkItem) -> None:
        if item.target:
            self.gen_inflight[item.target] -= 1

    # ------------------------------------------------------------------ results
    def on_results(self, name: str, incarnation: int, stage: str, results: list[RagResult] | list[GenResult],
                   now: float) -> list[Finish]:
        """Results of stage ``stage`` from worker ``name`` (process ``incarnation``).

        Returns:
            the records finished by them (RAG hard failures, generations).
        """
        w = self.workers.get(name)
        current = w is not None and w.incarnation == incarnation
        finishes: list[Finish] = []
        for res in results:
            self.health.report(res.endpoint, res.bad_endpoints, now)
            item = self._claim(w if current else None, res, stage, now)
            if item is None:
                continue
            if stage == RAG:
                self.retrieved += 1
                if res.failed:
                    finishes.append(Finish(item, res, None))
                else:
                    item.rag = res
                    self._queue_gen(item, now)
            else:
                finishes.append(Finish(item, item.rag, res))
        return finishes

    def _claim(self, w: WorkerSlot | None, res: RagResult | GenResult, stage: str, now: float) -> WorkItem | None:
        """The in-flight record a result belongs to, or None when the result is not to be used now (a late
        duplicate; a retryable failure while stopping; a failure caused by the endpoints or the store)."""
        item = w.assigned.pop(res.id, None) if w is not None else None
        if item is None:
            log.warning("dropping a late %s result for %s from %s", stage, res.id, w.name if w else "a lost worker")
            return None
        self.deaths[w.name] = 0
        if stage == GEN:
            self._gen_done(item)
        if res.overloaded:  # the server is up but full: never a failure row, send the record again
            if stage == RAG:
                self.rag_retry.append(item)
            else:
                self._queue_gen(item, now)
            return None
        h = self.stages[stage]
        failed = res.failed
        if not failed and res.endpoint:
            h.last_ok = now
            h.outage_since = None
        cause = res.retry_cause
        if cause and self.stopping:
            self.left_uncommitted += 1
            log.info("%s: %s failure while the run stops: left for the resume", res.id, stage)
            return None
        if cause == STORE_CAUSE and failed and stage == RAG and self._store_trouble(item):
            item.rag = None
            self.rag_retry.append(item)
            return None
        if cause == LLM_CAUSE and failed and self._endpoint_trouble(item, res, h, now):
            if stage == RAG:
                item.rag = None
                self.rag_retry.append(item)
            else:
                self._queue_gen(item, now, front=True)
            return None
        return item

    def _endpoint_trouble(self, item: WorkItem, res: RagResult | GenResult, h: StageHealth, now: float) -> bool:
        """True if a record whose LLM request failed for retryable reasons goes back to the queue: the endpoints
        were not healthy (not all up by probe, or no other request of the stage succeeded after its dispatch).
        Dispatch of the stage then holds (``llm.breaker_cooldown_s`` when every breaker was open, else
        TROUBLE_HOLD_S) and the outage clock starts if it is not running."""
        t_dispatch = item.t_dispatch
        healthy = not res.unavailable and h.last_ok > t_dispatch and self.health.all_up(h.urls)
        if healthy or self.deferred[item.id] >= MAX_DEFERRALS:
            return False
        self.deferred[item.id] += 1
        if h.outage_since is None and h.last_ok < t_dispatch:
            h.outage_since = now
        hold = self.cfg.llm.breaker_cooldown_s if res.unavailable else TROUBLE_HOLD_S
        h.hold_until = max(h.hold_until, now + hold)
        return True

    def _store_trouble(self, item: WorkItem) -> bool:
        """True if a record whose retrieval failed on a store error goes back to the queue: the run's own Chroma
        server was down or restarted since the record was dispatched (bounded by MAX_DEFERRALS)."""
        if not self.store_shared or self.deferred[item.id] >= MAX_DEFERRALS:
            return False
        if not (self.store_down or self.store_restarted_at > item.t_dispatch):
            return False
        self.deferred[item.id] += 1
        return True

