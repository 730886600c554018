"""The scheduler's rules one by one: dispatch, routing, claims, requeue-once, pauses, outages, stopping."""

from __future__ import annotations

import pytest

from pipeline.errors import OutageError, RunError
from pipeline.messages import RagResult, WorkItem
from pipeline.run.endpoints import EndpointHealth
from pipeline.run.scheduler import GEN, MAX_DEFERRALS, MAX_WORKER_RESTARTS, RAG, TROUBLE_HOLD_S
from tests.unit.scheduling import A, B, config, gen_fail, gen_ok, held, inc, make, rag_fail, rag_ok


def _items(sends, worker):
    return [it for s in sends if s.worker == worker for it in s.items]


def _rag_round(s, now=1.0, endpoint=A, worker="rag-0"):
    """Dispatch, then answer every record the RAG worker holds with an ok result."""
    s.dispatch(now)
    items = held(s, worker)
    return s.on_results(worker, inc(s, worker), RAG, [rag_ok(it, endpoint) for it in items], now)


# ---------------------------------------------------------------- dispatch
def test_rag_dispatch_is_bounded_by_the_endpoint_total():
    s = make(100, inflight=10)
    sends = s.dispatch(0.0)
    assert len(_items(sends, "rag-0")) == 10
    assert s.dispatch(0.1) == []  # no room left


def test_rag_dispatch_in_micro_batches_of_query_batch_size():
    s = make(100, inflight=100, cfg=config(retrieval={"query_batch_size": 8}, generation={"num_processes": 1}))
    sends = s.dispatch(0.0)
    assert sends and all(len(x.items) == 8 for x in sends if x.worker == "rag-0")


def test_retrieve_mode_uses_the_worker_credit_of_two_micro_batches():
    cfg = config(rag={"mode": "retrieve"}, retrieval={"query_batch_size": 4}, generation={"num_processes": 1})
    s = make(100, inflight=1, cfg=cfg)
    s.dispatch(0.0)
    assert len(held(s, "rag-0")) == 8


def test_a_busy_rag_worker_gets_only_full_micro_batches():
    cfg = config(retrieval={"query_batch_size": 4}, generation={"num_processes": 1})
    s = make(100, inflight=10, cfg=cfg, n_gen=0)
    s.dispatch(0.0)
    assert len(held(s, "rag-0")) == 8  # two full batches; 2 slots left but the worker is busy
    s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_ok(held(s, "rag-0")[0])], 0.5)
    # 3 free slots, the worker still holds >= a batch: wait for a full micro-batch
    assert _items(s.dispatch(0.6), "rag-0") == []
    s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_ok(held(s, "rag-0")[0])], 0.7)
    assert len(_items(s.dispatch(0.8), "rag-0")) == 4


def test_queue_size_stops_reading_new_records():
    cfg = config(run={"queue_size": 3}, retrieval={"query_batch_size": 4}, generation={"num_processes": 1})
    s = make(100, inflight=50, cfg=cfg, n_gen=0)
    _rag_round(s, 0.0)
    assert s.gen_waiting >= 3
    assert _items(s.dispatch(0.1), "rag-0") == []


def test_generations_are_sent_before_new_records():
    s = make(100, inflight=4)
    _rag_round(s, 0.0)
    sends = s.dispatch(0.1)
    assert len(_items(sends, "gen-0")) == 4
    assert _items(sends, "rag-0") == []  # the endpoint's room went to the generations


def test_done_after_every_record_finished():
    s = make(3, inflight=8)
    _rag_round(s, 0.0)
    s.dispatch(0.1)
    fins = s.on_results("gen-0", inc(s, "gen-0"), GEN, [gen_ok(it) for it in held(s, "gen-0")], 0.2)
    assert sorted(f.item.id for f in fins) == ["r0", "r1", "r2"]
    s.dispatch(0.3)
    assert s.done() and s.outstanding() == 0


def test_stop_reads_no_new_record_and_drops_not_started_retries():
    s = make(100, inflight=4)
    s.dispatch(0.0)
    s.on_worker_lost("rag-0", "exit code -9", 0.1)
    assert len(s.rag_retry) == 4
    s.stop()
    s.add_worker("rag-0", RAG, A)
    assert s.dispatch(0.2) == [] and not s.rag_retry


def test_gen_threads_per_process_share_the_generation_total():
    s = make(1, endpoints=(A, B), inflight=10, cfg=config(generation={"num_processes": 3}), n_gen=3)
    assert s.gen_threads_per_process() == 7  # ceil(20 / 3)
    assert s.workers["gen-0"].credit == 7


# ---------------------------------------------------------------- routing
def test_generation_goes_to_the_endpoint_of_its_rag_answer():
    s = make(10, endpoints=(A, B), inflight=8)
    s.dispatch(0.0)
    s.on_results("rag-1", inc(s, "rag-1"), RAG, [rag_ok(it, B) for it in held(s, "rag-1")], 0.1)
    assert set(s.gen_queues) == {B}


def test_generation_avoids_an_endpoint_whose_breaker_is_open():
    s = make(10, endpoints=(A, B), inflight=8)
    for _ in range(s.cfg.llm.breaker_failures):
        s.health.report(None, [B], 0.0)
    assert not s.health.healthy(B, 1.0)
    assert s.route(WorkItem("x", "q", rag=RagResult("x", endpoint=B)), 1.0) == A


def test_waiting_generations_are_rerouted_when_their_endpoint_fails():
    s = make(10, endpoints=(A, B), inflight=8, n_gen=0)
    s.dispatch(0.0)
    s.on_results("rag-1", inc(s, "rag-1"), RAG, [rag_ok(it, B) for it in held(s, "rag-1")], 0.1)
    for _ in range(s.cfg.llm.breaker_failures):
        s.health.report(None, [B], 0.2)
    s.add_worker("gen-0", GEN)
    sends = s.dispatch(0.3)
    assert all(it.target == A for it in _items(sends, "gen-0"))


def test_breaker_reset_by_a_success_on_the_endpoint():
    h = EndpointHealth(3, 30.0)
    h.report(None, [A], 0.0)
    h.report(None, [A], 0.0)
    h.report(A, [], 0.0)
    h.report(None, [A], 0.0)
    h.report(None, [A], 0.0)
    assert h.healthy(A, 0.1)
    h.report(None, [A], 0.0)
    assert not h.healthy(A, 0.1) and h.healthy(A, 30.1)


def test_least_loaded_healthy_endpoint_without_affinity():
    s = make(10, endpoints=(A, B), inflight=8)
    s.gen_inflight[A] = 5
    assert s.route(WorkItem("x", "q"), 0.0) == B


# ---------------------------------------------------------------- claims
def test_late_result_of_a_replaced_worker_is_dropped():
    s = make(4, inflight=4)
    s.dispatch(0.0)
    items = held(s, "rag-0")
    old = inc(s, "rag-0")
    s.on_worker_lost("rag-0", "exit code -9", 0.1)
    s.add_worker("rag-0", RAG, A)
    assert s.on_results("rag-0", old, RAG, [rag_ok(it) for it in items], 0.2) == []
    assert s.gen_waiting == 0 and len(s.rag_retry) == 4


def test_overload_is_never_a_failure_row():
    s = make(2, inflight=4)
    s.dispatch(0.0)
    res = [rag_fail(it, overloaded=True) for it in held(s, "rag-0")]
    assert s.on_results("rag-0", inc(s, "rag-0"), RAG, res, 0.1) == []
    assert len(s.rag_retry) == 2


def test_record_own_rag_failure_is_a_row_with_generation_skipped():
    s = make(1, inflight=4)
    s.dispatch(0.0)
    (item,) = held(s, "rag-0")
    (f,) = s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(item, A, cause=None)], 0.1)
    assert f.gen is None and f.rag.rag_status == "hard_fail"


def test_endpoint_failure_while_an_endpoint_is_down_goes_back():
    s = make(2, endpoints=(A, B), inflight=4)
    s.dispatch(0.0)
    s.health.observe_probes({B: "down"})
    item = held(s, "rag-0")[0]
    s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_ok(held(s, "rag-0")[1])], 0.5)  # a success after dispatch
    assert s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(item)], 1.0) == []
    assert s.deferred[item.id] == 1 and list(s.rag_retry) == [item]


def test_endpoint_failure_while_healthy_is_the_records_row():
    s = make(2, inflight=4)
    s.dispatch(0.0)
    a, b = held(s, "rag-0")
    s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_ok(a)], 0.5)
    (f,) = s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(b)], 1.0)
    assert f.item.id == b.id and f.gen is None


def test_endpoint_failure_without_a_success_since_dispatch_holds_dispatch():
    s = make(2, inflight=4)
    s.dispatch(0.5)
    a = held(s, "rag-0")[0]
    assert s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(a)], 1.0) == []
    assert s.stages[RAG].hold_until == pytest.approx(1.0 + TROUBLE_HOLD_S)
    assert s.stages[RAG].outage_since == 1.0
    assert _items(s.dispatch(1.5), "rag-0") == []  # held


def test_every_breaker_open_holds_for_the_cooldown():
    s = make(1, inflight=4)
    s.dispatch(0.0)
    (a,) = held(s, "rag-0")
    s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(a, unavailable=True)], 2.0)
    assert s.stages[RAG].hold_until == pytest.approx(2.0 + s.cfg.llm.breaker_cooldown_s)


def test_an_endpoint_back_up_ends_the_cooldown_hold():
    """The probe saw the endpoint down, then up: dispatch resumes at once, not after llm.breaker_cooldown_s."""
    s = make(2, inflight=4)
    s.dispatch(0.0)
    a = held(s, "rag-0")[0]
    assert s.observe_probes({A: "down"}, 1.0) == []
    s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(a, unavailable=True)], 2.0)
    assert s.dispatch(3.0) == []
    assert s.observe_probes({A: "up"}, 5.0) == [A]
    assert s.stages[RAG].hold_until == 5.0
    assert _items(s.dispatch(5.1), "rag-0")
    assert s.observe_probes({A: "up"}, 6.0) == []  # still up: nothing came back


def test_a_hold_with_endpoints_up_throughout_keeps_its_length():
    """Records failed on every endpoint while the probe never saw one down: the hold is not ended."""
    s = make(1, inflight=4)
    s.dispatch(0.0)
    (a,) = held(s, "rag-0")
    s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(a, unavailable=True)], 2.0)
    assert s.observe_probes({A: "up"}, 3.0) == []
    assert s.stages[RAG].hold_until == pytest.approx(2.0 + s.cfg.llm.breaker_cooldown_s)


def test_an_endpoint_back_up_closes_its_report_breaker():
    h = EndpointHealth(2, 30.0)
    h.report(None, [A], 0.0)
    h.report(None, [A], 1.0)
    assert not h.healthy(A, 2.0)
    h.observe_probes({A: "restarting"})
    assert h.observe_probes({A: "up"}) == [A]
    assert h.healthy(A, 3.0)


def test_a_record_deferred_too_often_gets_its_failure_row():
    s = make(1, inflight=4)
    item = None
    for k in range(MAX_DEFERRALS):
        s.stages[RAG].hold_until = 0.0
        s.dispatch(10.0 * k)
        (item,) = held(s, "rag-0")
        assert s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(item)], 10.0 * k + 1) == []
    s.stages[RAG].hold_until = 0.0
    s.dispatch(10.0 * MAX_DEFERRALS)
    (item,) = held(s, "rag-0")
    (f,) = s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(item)], 10.0 * MAX_DEFERRALS + 1)
    assert f.item.id == "r0"


def test_retryable_failure_while_stopping_is_left_for_the_resume():
    s = make(1, inflight=4)
    s.dispatch(0.0)
    (a,) = held(s, "rag-0")
    s.stop()
    assert s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(a)], 1.0) == []
    assert s.left_uncommitted == 1 and s.outstanding() == 0


def test_store_failure_goes_back_only_for_the_runs_own_store():
    s = make(2, inflight=4)
    s.dispatch(0.0)
    a, b = held(s, "rag-0")
    (f,) = s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(a, cause="store")], 0.5)  # not shared: a row
    assert f.item.id == a.id
    s.observe_store(down=True, restarted_at=float("-inf"))
    assert s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(b, cause="store")], 0.6) == []
    assert list(s.rag_retry) == [b]


def test_store_restarted_after_dispatch_sends_the_record_again():
    s = make(1, inflight=4)
    s.observe_store(down=False, restarted_at=float("-inf"))
    s.dispatch(0.0)
    (a,) = held(s, "rag-0")
    s.observe_store(down=False, restarted_at=0.5)
    assert s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_fail(a, cause="store")], 1.0) == []


# ---------------------------------------------------------------- lost workers
def test_lost_rag_worker_records_are_requeued_once():
    s = make(4, inflight=4)
    s.dispatch(0.0)
    lost = s.on_worker_lost("rag-0", "exit code -9", 1.0)
    assert lost.replace and lost.finishes == [] and len(s.rag_retry) == 4
    assert all(s.requeued[f"r{i}"] == 1 for i in range(4))


def test_lost_generation_records_go_to_the_front_of_their_queue():
    s = make(3, inflight=8)
    _rag_round(s, 0.0)
    s.dispatch(0.1)
    ids = [it.id for it in held(s, "gen-0")]
    s.on_worker_lost("gen-0", "exit code -9", 0.2)
    assert [it.id for it in s.gen_queues[A]][: len(ids)] == ids[::-1] or \
        sorted(it.id for it in s.gen_queues[A]) == sorted(ids)
    assert s.gen_inflight[A] == 0


def test_a_record_whose_worker_died_twice_gets_a_failure_row():
    s = make(1, inflight=4)
    s.dispatch(0.0)
    s.on_worker_lost("rag-0", "exit code -9", 0.1)
    s.add_worker("rag-0", RAG, A)
    s.dispatch(0.2)
    lost = s.on_worker_lost("rag-0", "exit code -11", 0.3)
    (f,) = lost.finishes
    assert f.rag.rag_status == "hard_fail" and "died twice" in f.rag.rag_error and f.gen is None


def test_generation_record_dying_twice_keeps_its_rag_result():
    s = make(1, inflight=4)
    _rag_round(s, 0.0)
    for t in (0.1, 0.3):
        s.dispatch(t)
        lost = s.on_worker_lost("gen-0", "exit code -9", t + 0.1)
        s.add_worker("gen-0", GEN)
    (f,) = lost.finishes
    assert f.rag.rag_status == "ok" and f.gen.gen_status == "failed"


def test_a_slot_dying_in_a_row_stops_the_run():
    s = make(0, inflight=4)
    for _ in range(MAX_WORKER_RESTARTS):
        s.on_worker_lost("gen-0", "exit code 1", 0.0)
        s.add_worker("gen-0", GEN)
    with pytest.raises(RunError, match="died 4 times in a row"):
        s.on_worker_lost("gen-0", "exit code 1", 0.0)


def test_a_result_resets_the_deaths_in_a_row():
    s = make(5, inflight=4)
    for _ in range(MAX_WORKER_RESTARTS):
        s.on_worker_lost("rag-0", "exit code 1", 0.0)
        s.add_worker("rag-0", RAG, A)
    s.dispatch(1.0)
    s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_ok(held(s, "rag-0")[0])], 1.1)
    assert s.on_worker_lost("rag-0", "exit code 1", 2.0).replace


def test_lost_while_stopping_leaves_records_for_the_resume():
    s = make(4, inflight=4)
    s.dispatch(0.0)
    s.stop()
    lost = s.on_worker_lost("rag-0", "exit code -9", 1.0)
    assert not lost.replace and s.left_uncommitted == 4 and sum(s.requeued.values()) == 0


def test_lost_while_the_store_is_down_does_not_count():
    s = make(4, inflight=4)
    s.dispatch(0.0)
    s.observe_store(down=True, restarted_at=float("-inf"))
    lost = s.on_worker_lost("rag-0", "exit code 1", 1.0)
    assert not lost.replace and len(s.rag_retry) == 4 and sum(s.requeued.values()) == 0
    s.observe_store(down=False, restarted_at=2.0)
    assert s.on_worker_lost("rag-0", "exit code 1", 3.0).replace


def test_overdue_reports_a_record_past_its_stage_deadline():
    cfg = config(run={"rag_deadline_s": 10.0}, generation={"num_processes": 1})
    s = make(2, inflight=4, cfg=cfg)
    s.dispatch(0.0)
    assert s.overdue(9.0) == []
    ((name, reason),) = s.overdue(11.0)
    assert name == "rag-0" and "run.rag_deadline_s = 10" in reason


# ---------------------------------------------------------------- pauses and outages
def test_rag_pauses_while_no_endpoint_is_up():
    s = make(10, inflight=4)
    s.health.observe_probes({A: "down"})
    assert s.dispatch(0.0) == []
    s.health.observe_probes({A: "up"})
    assert _items(s.dispatch(1.0), "rag-0")


def test_retrieve_mode_does_not_pause_for_llm_endpoints():
    cfg = config(rag={"mode": "retrieve"}, generation={"num_processes": 1})
    s = make(10, inflight=4, cfg=cfg)
    s.health.observe_probes({A: "down"})
    assert _items(s.dispatch(0.0), "rag-0")


def test_an_outage_longer_than_max_outage_stops_the_run():
    s = make(10, inflight=4, cfg=config(run={"max_outage_s": 60.0}, generation={"num_processes": 1}))
    s.health.observe_probes({A: "down"})
    s.dispatch(0.0)
    s.dispatch(59.0)
    with pytest.raises(OutageError, match="max_outage_s = 60"):
        s.dispatch(61.0)


def test_a_success_ends_the_outage_clock():
    s = make(10, inflight=4)
    s.dispatch(0.0)
    s.stages[RAG].outage_since = 0.0
    s.on_results("rag-0", inc(s, "rag-0"), RAG, [rag_ok(held(s, "rag-0")[0])], 5.0)
    assert s.stages[RAG].outage_since is None and s.stages[RAG].last_ok == 5.0


def test_the_store_being_down_pauses_rag_dispatch():
    s = make(10, inflight=4)
    s.observe_store(down=True, restarted_at=float("-inf"))
    assert s.dispatch(0.0) == []


def test_waiting_generations_are_left_when_stopping_without_endpoints():
    s = make(4, inflight=8, n_gen=0)
    _rag_round(s, 0.0)
    assert s.gen_waiting == 4
    s.stop()
    s.health.observe_probes({A: "down"})
    s.dispatch(1.0)
    assert s.gen_waiting == 0 and s.left_uncommitted == 4


def test_generation_failure_for_the_endpoints_goes_back_to_the_front():
    s = make(2, inflight=8)
    _rag_round(s, 0.0)
    s.dispatch(0.1)
    a = held(s, "gen-0")[0]
    assert s.on_results("gen-0", inc(s, "gen-0"), GEN, [gen_fail(a)], 0.5) == []
    assert s.gen_queues[A][0].id == a.id


# ---------------------------------------------------------------- endpoint health
def test_never_probed_endpoints_count_as_up():
    h = EndpointHealth(3, 30.0)
    assert h.any_up([A, B]) and h.all_up([A, B])


def test_failed_endpoints_do_not_block_all_up():
    h = EndpointHealth(3, 30.0)
    h.observe_probes({A: "up", B: "failed"})
    assert h.all_up([A, B]) and h.any_up([A, B])
    h.observe_probes({A: "restarting"})
    assert not h.all_up([A, B]) and not h.any_up([A, B])


def test_a_held_worker_is_sent_nothing():
    s = make(100, endpoints=(A, B), inflight=4)
    s.hold("rag-0")
    sends = s.dispatch(0.0)
    assert _items(sends, "rag-0") == [] and len(_items(sends, "rag-1")) == 4
