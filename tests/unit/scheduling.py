"""Helpers for driving the pure scheduler in tests: records, configs, fake results, and a simulated run."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from pipeline.config import Config
from pipeline.errors import OutageError, RunError
from pipeline.messages import GenResult, RagResult, WorkItem
from pipeline.run.endpoints import EndpointHealth
from pipeline.run.scheduler import GEN, RAG, Finish, Scheduler

A = "http://a:1"
B = "http://b:2"


@dataclass
class Rec:
    id: str
    query: str
    extra: dict = field(default_factory=dict)
    index: int = 0


def records(n: int) -> list[Rec]:
    return [Rec(f"r{i}", f"question {i}", index=i) for i in range(n)]


def config(**sections: dict) -> Config:
    """Config() with some fields of some sections replaced: ``config(run={"queue_size": 4})``."""
    cfg = Config()
    for name, values in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)})
    return cfg


def make(n: int = 10, *, endpoints=(A,), inflight: int = 8, cfg: Config | None = None, n_gen: int = 1,
         now: float = 0.0) -> Scheduler:
    """A scheduler over ``n`` records with one RAG worker per endpoint and ``n_gen`` generation processes."""
    cfg = cfg or config(generation={"num_processes": n_gen})
    health = EndpointHealth(cfg.llm.breaker_failures, cfg.llm.breaker_cooldown_s)
    s = Scheduler(cfg, iter(records(n)), inflight={e: inflight for e in endpoints}, rag_urls=list(endpoints),
                  gen_urls=list(endpoints), health=health, now=now)
    for i, e in enumerate(endpoints):
        s.add_worker(f"rag-{i}", RAG, e)
    for i in range(n_gen):
        s.add_worker(f"gen-{i}", GEN)
    return s


def rag_ok(item: WorkItem, endpoint: str = A, **kw) -> RagResult:
    return RagResult(item.id, rag_answer="answer", endpoint=endpoint, attempts=1, **kw)


def rag_fail(item: WorkItem, endpoint: str | None = None, cause: str | None = "llm", **kw) -> RagResult:
    kw.setdefault("bad_endpoints", [A] if cause == "llm" else [])
    return RagResult(item.id, rag_status="hard_fail", rag_error="boom", endpoint=endpoint, retry_cause=cause, **kw)


def gen_ok(item: WorkItem, endpoint: str = A, **kw) -> GenResult:
    return GenResult(item.id, generation="text", generate_ms=1.0, attempts=1, endpoint=endpoint, **kw)


def gen_fail(item: WorkItem, cause: str | None = "llm", **kw) -> GenResult:
    kw.setdefault("bad_endpoints", [A] if cause == "llm" else [])
    return GenResult(item.id, gen_status="failed", gen_error="boom", generate_ms=1.0, attempts=3, retry_cause=cause,
                     **kw)


def held(s: Scheduler, name: str) -> list[WorkItem]:
    return list(s.workers[name].assigned.values())


def inc(s: Scheduler, name: str) -> int:
    return s.workers[name].incarnation


@dataclass
class SimReport:
    """What a simulated run decided.

    Attributes:
        finishes: record id -> every Finish the scheduler returned for it.
        llm_failure_rows: ids of failure rows whose failing result blamed the endpoints (``retry_cause`` llm).
        overfull: (time, endpoint, load, limit) whenever a dispatch left more in flight than allowed.
        stopped_by: the exception class that stopped the run, or None.
        scheduler: the scheduler at the end; ``steps``: events played.
    """

    finishes: dict[str, list[Finish]]
    llm_failure_rows: list[str]
    overfull: list[tuple]
    stopped_by: str | None
    scheduler: Scheduler
    steps: int


def simulate(seed: int, *, n: int = 40, endpoints=(A, B), p_death: float = 0.02, p_hang: float = 0.01,
             p_outage: float = 0.03, p_bad: float = 0.02, p_overload: float = 0.03, p_stop: float = 0.0,
             max_steps: int = 5000) -> SimReport:
    """Drive a scheduler through a random sequence of events and return what it decided.

    Each step: probe states may change (outages start and end), the scheduler dispatches, each held record
    may complete (ok; a retryable failure that is the endpoints' fault when its endpoint is down; a failure
    that is the record's own for "bad" records; overload), workers may die or hang (lost), the clock moves.
    """
    rng = random.Random(seed)
    cfg = config(generation={"num_processes": 2}, run={"max_outage_s": 1e9, "queue_size": 16},
                 retrieval={"query_batch_size": 4})
    health = EndpointHealth(cfg.llm.breaker_failures, cfg.llm.breaker_cooldown_s)
    s = Scheduler(cfg, iter(records(n)), inflight={e: 6 for e in endpoints}, rag_urls=list(endpoints),
                  gen_urls=list(endpoints), health=health)
    for i, e in enumerate(endpoints):
        s.add_worker(f"rag-{i}", RAG, e)
    for i in range(2):
        s.add_worker(f"gen-{i}", GEN)
    bad = {f"r{i}" for i in range(n) if rng.random() < p_bad}
    down: set[str] = set()
    finishes: dict[str, list[Finish]] = {}
    llm_failures: list[str] = []
    overfull: list[tuple] = []
    now = 0.0
    stopped_by = None
    step = 0

    def take(fs: list[Finish]) -> None:
        for f in fs:
            finishes.setdefault(f.item.id, []).append(f)
            failing = f.gen if f.gen is not None and f.gen.failed else f.rag
            if failing.retry_cause == "llm" and failing.failed:
                llm_failures.append(f.item.id)

    try:
        for step in range(max_steps):  # noqa: B007 - reported
            now += rng.uniform(0.05, 2.0)
            for e in endpoints:
                if e in down and rng.random() < 0.2:
                    down.discard(e)
                elif e not in down and rng.random() < p_outage:
                    down.add(e)
            s.observe_probes({e: ("down" if e in down else "up") for e in endpoints}, now)
            if p_stop and not s.stopping and rng.random() < p_stop:
                s.stop()
            s.dispatch(now)
            for e, load in s._loads().items():
                if load > s.inflight[e]:
                    overfull.append((now, e, load, s.inflight[e]))
            if s.done() or (s.stopping and s.outstanding() == 0):
                break
            for name, w in list(s.workers.items()):
                if not w.accepting:
                    continue
                roll = rng.random()
                if roll < p_death or roll < p_death + p_hang:
                    reason = "exit code -9" if roll < p_death else "hung: no heartbeat for 61 s"
                    lost = s.on_worker_lost(name, reason, now)
                    take(lost.finishes)
                    if lost.replace:
                        s.add_worker(name, w.kind, w.endpoint)
                    continue
                results = []
                for item in list(w.assigned.values()):
                    if rng.random() < 0.5:
                        continue
                    ep = w.endpoint if w.kind == RAG else item.target
                    if rng.random() < p_overload:
                        res = (rag_ok(item, ep) if w.kind == RAG else gen_ok(item, ep))
                        res.overloaded = True
                    elif ep in down:
                        res = rag_fail(item, cause="llm") if w.kind == RAG else gen_fail(item, cause="llm")
                        res.bad_endpoints = [ep]
                    elif item.id in bad:
                        res = rag_fail(item, ep, cause=None) if w.kind == RAG else gen_fail(item, cause=None)
                    else:
                        res = rag_ok(item, ep) if w.kind == RAG else gen_ok(item, ep)
                    results.append(res)
                if results:
                    take(s.on_results(name, w.incarnation, w.kind, results, now))
    except (RunError, OutageError) as exc:
        stopped_by = type(exc).__name__
    return SimReport(finishes, llm_failures, overfull, stopped_by, s, step)
