"""pipeline.llm.outcome: every attempt outcome, status code and client exception -> its class.

Pure functions only: responses and exceptions are built in memory (no server, no socket).
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import requests
from urllib3.exceptions import MaxRetryError, NewConnectionError

from pipeline.config import Config
from pipeline.llm import client, outcome
from pipeline.llm.outcome import (
    LLM_CAUSE,
    RETRYABLE_OUTCOMES,
    Attempt,
    Kind,
    LLMError,
    NoEndpointAvailable,
    Overloaded,
    RequestFailed,
    bad_endpoints,
    classify,
    http_outcome,
    http_status,
    is_endpoint_fault,
    is_overload,
    is_record_fault,
    is_retryable,
    retry_cause,
)

ROOT = Path(__file__).resolve().parents[2]

# (outcome, kind, retryable, overload, endpoint fault, record fault)
TABLE = [
    ("ok", Kind.OK, False, False, False, False),
    ("timeout", Kind.ENDPOINT, True, False, True, False),
    ("connect_error", Kind.ENDPOINT, True, False, True, False),
    ("connection_error", Kind.ENDPOINT, True, False, True, False),
    ("bad_response", Kind.UNEXPECTED, False, False, False, False),
    ("http_400", Kind.RECORD, False, False, False, True),
    ("http_401", Kind.RECORD, False, False, False, True),
    ("http_404", Kind.RECORD, False, False, False, True),
    ("http_408", Kind.TRANSIENT, True, False, False, False),
    ("http_413", Kind.RECORD, False, False, False, True),
    ("http_422", Kind.RECORD, False, False, False, True),
    ("http_429", Kind.OVERLOAD, True, True, False, False),
    ("http_499", Kind.RECORD, False, False, False, True),
    ("http_500", Kind.ENDPOINT, True, False, True, False),
    ("http_501", Kind.SERVER, False, False, True, False),
    ("http_502", Kind.ENDPOINT, True, False, True, False),
    ("http_503", Kind.OVERLOAD, True, True, False, False),
    ("http_504", Kind.ENDPOINT, True, False, True, False),
    ("http_505", Kind.SERVER, False, False, True, False),
    ("http_507", Kind.SERVER, False, False, True, False),
    ("http_204", Kind.UNEXPECTED, False, False, False, False),
    ("http_302", Kind.UNEXPECTED, False, False, False, False),
    ("error", Kind.UNEXPECTED, False, False, False, False),
    ("", Kind.UNEXPECTED, False, False, False, False),
]


@pytest.mark.parametrize(("name", "kind", "retryable", "overload", "endpoint", "record"), TABLE)
def test_each_outcome_has_one_class(name, kind, retryable, overload, endpoint, record):
    assert classify(name) is kind
    assert is_retryable(name) is retryable
    assert is_overload(name) is overload
    assert is_endpoint_fault(name) is endpoint
    assert is_record_fault(name) is record


def test_retryable_outcomes_are_the_transport_failures_and_408_429_5xx():
    assert RETRYABLE_OUTCOMES == {"timeout", "connect_error", "connection_error", "http_408", "http_429", "http_500",
                                  "http_502", "http_503", "http_504"}


def test_every_status_code():
    for status in range(100, 600):
        name = http_outcome(status)
        assert name == f"http_{status}" and http_status(name) == status
        assert is_retryable(name) == (status in {408, 429, 500, 502, 503, 504}), status
        assert is_overload(name) == (status in {429, 503}), status
        assert is_endpoint_fault(name) == (500 <= status < 600 and status != 503), status
        assert is_record_fault(name) == (400 <= status < 500 and status not in {408, 429}), status


@pytest.mark.parametrize("name", ["http_", "http_5x", "https_500", "timeout", "ok", "http500"])
def test_http_status_of_a_name_without_a_status_is_none(name):
    assert http_status(name) is None


def test_overload_is_retryable_and_not_an_endpoint_fault():
    for status in outcome.OVERLOAD_STATUS:
        name = http_outcome(status)
        assert is_retryable(name) and is_overload(name) and not is_endpoint_fault(name)
    assert outcome.OVERLOAD_STATUS <= outcome.RETRYABLE_STATUS


# -- retry_cause ------------------------------------------------------------------------------------


def _a(*names: str, endpoint: str = "http://a:1") -> list[Attempt]:
    return [Attempt(endpoint, n, 1.0) for n in names]


@pytest.mark.parametrize(("exc", "cause"), [
    (NoEndpointAvailable("none"), LLM_CAUSE),
    (NoEndpointAvailable("none", _a("http_400")), LLM_CAUSE),
    (Overloaded("full", _a("http_429", "http_503")), LLM_CAUSE),
    (Overloaded("full"), LLM_CAUSE),
    (RequestFailed("x", _a("timeout", "http_500", "connect_error", "http_503")), LLM_CAUSE),
    (RequestFailed("x", _a("http_408", "connection_error", "http_502", "http_504")), LLM_CAUSE),
    (RequestFailed("x", _a("timeout", "http_400")), None),
    (RequestFailed("x", _a("http_400")), None),
    (RequestFailed("x", _a("bad_response")), None),
    (RequestFailed("x", _a("http_501")), None),
    (RequestFailed("x", _a("http_500", "ok")), None),
    (RequestFailed("x"), None),
    (LLMError("x", _a("timeout")), LLM_CAUSE),
    (ValueError("x"), None),
    (RuntimeError("x"), None),
])
def test_retry_cause(exc, cause):
    assert retry_cause(exc) == cause


def test_retry_cause_tests_the_class_not_its_name():
    # A foreign exception named like the client's, carrying retryable attempts, is not the client's error.
    foreign = type("NoEndpointAvailable", (Exception,), {})()
    foreign.attempts = _a("timeout")
    assert retry_cause(foreign) is None
    overloaded = type("Overloaded", (Exception,), {})()
    assert retry_cause(overloaded) is None


def test_retry_cause_of_a_subclass():
    class Special(RequestFailed):
        pass

    class Unreachable(NoEndpointAvailable):
        pass

    assert retry_cause(Special("x", _a("http_503"))) == LLM_CAUSE
    assert retry_cause(Special("x", _a("http_404"))) is None
    assert retry_cause(Unreachable("x")) == LLM_CAUSE


def test_errors_survive_pickling_with_their_attempts():
    attempts = _a("connect_error", "http_500")
    for cls in (RequestFailed, NoEndpointAvailable, Overloaded, LLMError):
        err = pickle.loads(pickle.dumps(cls("boom", attempts)))
        assert type(err) is cls and str(err) == "boom" and err.attempts == attempts
        assert retry_cause(err) == LLM_CAUSE
    assert NoEndpointAvailable("x").exit_code == 3


# -- bad_endpoints ----------------------------------------------------------------------------------


def test_bad_endpoints_lists_unhealthy_endpoints_once_sorted():
    attempts = (_a("http_500", "timeout", endpoint="http://c:1") + _a("connect_error", endpoint="http://b:1")
                + _a("http_503", "http_429", "http_400", "http_408", "bad_response", "ok", endpoint="http://a:1")
                + _a("http_501", endpoint="http://d:1") + _a("connection_error", endpoint="http://b:1"))
    assert bad_endpoints(attempts) == ["http://b:1", "http://c:1", "http://d:1"]


def test_bad_endpoints_of_healthy_answers_is_empty():
    assert bad_endpoints(_a("ok", "http_503", "http_429", "http_400", "http_408")) == []
    assert bad_endpoints([]) == []
    assert bad_endpoints(iter(_a("timeout"))) == ["http://a:1"]


# -- the client classifies through outcome ----------------------------------------------------------


def _response(status: int, body: bytes = b"{}", headers: dict[str, str] | None = None) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r._content = body
    r.headers.update(headers or {})
    return r


@pytest.mark.parametrize(("status", "retryable", "overload"), [
    (400, False, False), (404, False, False), (408, True, False), (429, True, True), (500, True, False),
    (501, False, False), (502, True, False), (503, True, True), (504, True, False),
])
def test_client_check_response_takes_its_flags_from_outcome(status, retryable, overload):
    with pytest.raises(client._AttemptError) as err:
        client._check_response(_response(status, b"nope\nmore"))
    e = err.value
    assert e.outcome == f"http_{status}" and e.retryable is retryable and e.overload is overload
    assert e.detail == "nope more"
    assert e.retry_after_s is None


def test_client_reads_retry_after_of_an_overload_answer_only():
    with pytest.raises(client._AttemptError) as err:
        client._check_response(_response(429, headers={"Retry-After": "2"}))
    assert err.value.overload and err.value.retry_after_s == 2.0
    with pytest.raises(client._AttemptError) as err:
        client._check_response(_response(500, headers={"Retry-After": "2"}))
    assert not err.value.overload and err.value.retry_after_s is None


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"text"'])
def test_client_bad_response_is_final(body):
    with pytest.raises(client._AttemptError) as err:
        client._check_response(_response(200, body))
    assert err.value.outcome == "bad_response" and not err.value.retryable and not err.value.overload


def test_client_ok_response_is_its_json_object():
    assert client._check_response(_response(200, b'{"choices": []}')) == {"choices": []}


@pytest.mark.parametrize(("exc", "name", "connect_failure"), [
    (requests.ConnectTimeout("slow"), "timeout", True),
    (requests.ReadTimeout("slow"), "timeout", False),
    (requests.ConnectionError(MaxRetryError(None, "/v1", NewConnectionError(None, "refused"))), "connect_error",
     True),
    (requests.ConnectionError(NewConnectionError(None, "refused")), "connect_error", True),
    (requests.ConnectionError(ConnectionResetError("reset")), "connection_error", False),
    (requests.exceptions.ChunkedEncodingError("cut"), "connection_error", False),
    (requests.exceptions.InvalidURL("bad"), "connection_error", False),
])
def test_client_transport_failures_are_retryable_endpoint_faults(exc, name, connect_failure):
    err = client._classify(exc)
    assert err.outcome == name and err.connect_failure is connect_failure
    assert err.retryable and not err.overload and is_endpoint_fault(err.outcome)


def test_the_client_raises_the_outcome_classes():
    for name in ("Attempt", "LLMError", "RequestFailed", "NoEndpointAvailable", "Overloaded"):
        assert getattr(client, name) is getattr(outcome, name)


# -- the workers use it -----------------------------------------------------------------------------


class _FailingClient:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def chat(self, *args, **kwargs):
        raise self.exc


TEMPLATES = {"no_context": "Q: {query}", "prefix": "{context}\n{query}", "generate": "{rag_answer}",
             "rag_answer": "{context} {query}"}


@pytest.mark.parametrize(("exc", "cause", "bad", "unavailable", "overloaded"), [
    (RequestFailed("x", _a("http_500", endpoint="http://e:1") + _a("timeout", endpoint="http://f:1")), "llm",
     ["http://e:1", "http://f:1"], False, False),
    (RequestFailed("x", _a("http_400")), None, [], False, False),
    (NoEndpointAvailable("x", _a("connect_error")), "llm", ["http://a:1"], True, False),
    (Overloaded("x", _a("http_429")), "llm", [], False, True),
])
def test_generation_failure_result(exc, cause, bad, unavailable, overloaded):
    from pipeline.messages import RagResult, WorkItem
    from workers.generation import generate_one

    item = WorkItem("r1", "q?", rag=RagResult("r1", rag_status="soft_fail"))
    out = generate_one(_FailingClient(exc), Config(), TEMPLATES, item)
    assert out.gen_status == "failed" and out.gen_error.startswith(type(exc).__name__)
    assert out.retry_cause == cause and out.bad_endpoints == bad
    assert out.unavailable is unavailable and out.overloaded is overloaded
    assert out.attempts == len(exc.attempts)


def test_workers_take_the_classification_from_outcome():
    import workers.generation
    import workers.protocol

    assert workers.generation.bad_endpoints is bad_endpoints
    assert workers.generation.retry_cause is retry_cause
    assert not hasattr(workers.protocol, "retry_cause") and not hasattr(workers.protocol, "RETRYABLE_OUTCOMES")


OUTCOME_LITERALS = {"connect_error", "connection_error", "bad_response", "http_5", "http_503", "http_429"}


def test_no_other_module_spells_the_outcome_names():
    """Outcome names are written once, in pipeline/llm/outcome.py (docstrings may describe them)."""
    for path in [*sorted((ROOT / "pipeline").rglob("*.py")), *sorted((ROOT / "workers").rglob("*.py"))]:
        if path == ROOT / "pipeline" / "llm" / "outcome.py":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                assert node.value not in OUTCOME_LITERALS, f"{path}: {node.value!r}"
                assert not node.value.startswith("http_5"), f"{path}: {node.value!r}"
