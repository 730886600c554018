"""The scheduler under hundreds of random event sequences: deaths, hangs, outages, overload, bad records, stops.

Each sequence is played by :func:`tests.unit.scheduling.simulate` (no process, no clock: events and times are
drawn from a seeded generator) and must keep the run's promises:

- every record gets exactly one row (none lost, none twice), unless the run stopped;
- a row that is a failure because the endpoints failed is written only after MAX_DEFERRALS deferrals;
- "died twice" rows only for records whose worker died twice while holding them;
- no endpoint ever has more requests in flight than its total;
- after a stop: nothing new is read, and every record read is either finished once or left for the resume.
"""

from __future__ import annotations

import pytest

from pipeline.run.scheduler import MAX_DEFERRALS
from tests.unit.scheduling import A, simulate


def _check(rep, n: int) -> None:
    s = rep.scheduler
    twice = {rid: fs for rid, fs in rep.finishes.items() if len(fs) > 1}
    assert not twice, f"records finished more than once: {sorted(twice)}"
    assert not rep.overfull, f"in-flight above the endpoint's total: {rep.overfull[:3]}"
    for rid in rep.llm_failure_rows:
        assert s.deferred[rid] >= MAX_DEFERRALS, f"{rid}: failure row for endpoint trouble while unhealthy"
    for rid, (f,) in rep.finishes.items():
        text = (f.rag.rag_error or "") + ((f.gen.gen_error if f.gen else None) or "")
        if "died twice" in text:
            assert s.requeued[rid] >= 2, f"{rid}: 'died twice' after {s.requeued[rid]} requeues"
    if rep.stopped_by is None and not s.stopping:
        assert len(rep.finishes) == n, f"{n - len(rep.finishes)} records without a row"
        assert s.outstanding() == 0


@pytest.mark.parametrize("seed", range(120))
def test_faults_on_two_endpoints(seed):
    rep = simulate(seed)
    _check(rep, 40)


@pytest.mark.parametrize("seed", range(60))
def test_heavy_faults(seed):
    rep = simulate(1000 + seed, p_death=0.05, p_hang=0.03, p_outage=0.1, p_overload=0.1, p_bad=0.1)
    _check(rep, 40)
    if rep.stopped_by is not None:
        assert rep.stopped_by == "RunError"  # a slot that kept dying: the only reason a run stops here


@pytest.mark.parametrize("seed", range(60))
def test_one_endpoint(seed):
    rep = simulate(2000 + seed, endpoints=(A,), p_outage=0.08)
    _check(rep, 40)


@pytest.mark.parametrize("seed", range(60))
def test_stop_midway(seed):
    rep = simulate(3000 + seed, p_stop=0.05)
    _check(rep, 40)
    s = rep.scheduler
    if s.stopping:
        assert s.outstanding() == 0
        assert not s.rag_retry and s.gen_waiting == 0


@pytest.mark.parametrize("seed", range(30))
def test_no_faults_finishes_everything_ok(seed):
    rep = simulate(4000 + seed, p_death=0, p_hang=0, p_outage=0, p_bad=0, p_overload=0)
    _check(rep, 40)
    assert len(rep.finishes) == 40
    assert all(f.rag.rag_status == "ok" and f.gen.gen_status == "ok"
               for (f,) in rep.finishes.values())
    assert sum(rep.scheduler.requeued.values()) == 0
