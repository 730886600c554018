"""What the outcome of an LLM request means: one classification for the client, the workers and main.

Every HTTP attempt of a request (:class:`Attempt`) ends with an *outcome* name:

==========================  =========================================================================
``"ok"``                    a 200 with a JSON object body
``"http_<status>"``         any other HTTP status (``"http_429"``, ``"http_500"``, ...)
``"timeout"``               connect or read timeout
``"connect_error"``         connection refused / host unreachable (nothing listens)
``"connection_error"``      the connection dropped after it was made (e.g. the server died mid-request)
``"bad_response"``          a 200 whose body is not a JSON object, or ``/v1/models`` listing no model
==========================  =========================================================================

:func:`classify` puts each outcome in one :class:`Kind`, and everything else follows from the kind:

* **retryable** (:func:`is_retryable`; kinds ``overload``, ``endpoint``, ``transient``): the endpoint's or the
  run's fault, not the record's. The client fails over to the next endpoint and retries (``llm.max_attempts``
  passes); a request that failed with retryable outcomes only is requeued by main (:func:`retry_cause`).
  Statuses: :data:`RETRYABLE_STATUS`.
* **overload** (:func:`is_overload`; 429, 503, :data:`OVERLOAD_STATUS`): the server is up but full; the client
  waits and sends the request again to the same endpoint; not a failure of the endpoint nor of the record.
* **endpoint fault** (:func:`is_endpoint_fault`; kinds ``endpoint`` and ``server``): transport failures and every
  5xx other than 503: the endpoint is unhealthy; main routes records around it for a while
  (:func:`bad_endpoints`).
* **record fault** (:func:`is_record_fault`; kind ``record``): a 4xx other than 408 and 429 (e.g. 400 context
  length exceeded): final, never retried; the record gets a failure row.
* every other outcome is final too (kinds ``server`` and ``unexpected``: a 5xx that retrying will not change
  such as 501, ``bad_response``, a status outside 4xx/5xx): the request fails, the record gets a failure row.

The client's errors (:class:`RequestFailed`, :class:`NoEndpointAvailable`, :class:`Overloaded`) live here too, so
that :func:`retry_cause` tests them by class; :mod:`pipeline.llm.client` raises them. This module imports nothing
but :mod:`pipeline.errors` (the generation processes and main use it without ``requests``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import RagPipelineError, ServerError

OK = "ok"
TIMEOUT = "timeout"
CONNECT_ERROR = "connect_error"
CONNECTION_ERROR = "connection_error"
BAD_RESPONSE = "bad_response"

TRANSPORT_FAILURES = frozenset({TIMEOUT, CONNECT_ERROR, CONNECTION_ERROR})
"""Outcomes without an HTTP answer: the endpoint could not be reached or did not answer in time."""

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses that are retried; every other status is final."""

OVERLOAD_STATUS = frozenset({429, 503})
"""Statuses that mean "too many requests now": the request waits and is sent again to the same endpoint."""

LLM_CAUSE = "llm"
""":func:`retry_cause` of a request that failed through no fault of its record (a worker result's
``retry_cause``; the RAG worker sets ``"store"`` for a vector-store error)."""


class Kind(enum.Enum):
    """The class of an outcome (see the module docstring)."""

    OK = "ok"
    OVERLOAD = "overload"  # retryable, same endpoint after a wait
    ENDPOINT = "endpoint"  # retryable, the endpoint is unhealthy
    TRANSIENT = "transient"  # retryable, the endpoint is healthy (408)
    SERVER = "server"  # final, the endpoint is unhealthy (a 5xx not in RETRYABLE_STATUS)
    RECORD = "record"  # final, the record's fault (4xx other than 408/429)
    UNEXPECTED = "unexpected"  # final: bad_response, another status, an unknown name


RETRYABLE_KINDS = frozenset({Kind.OVERLOAD, Kind.ENDPOINT, Kind.TRANSIENT})
ENDPOINT_FAULT_KINDS = frozenset({Kind.ENDPOINT, Kind.SERVER})


def http_outcome(status: int) -> str:
    """The outcome name of an HTTP answer with ``status`` other than a usable 200 (``"http_<status>"``)."""
    return f"http_{status}"


def http_status(outcome: str) -> int | None:
    """The HTTP status of an ``"http_<status>"`` outcome; None for any other outcome."""
    prefix, _, digits = outcome.partition("_")
    if prefix != "http" or not digits.isdigit():
        return None
    return int(digits)


def classify(outcome: str) -> Kind:
    """The :class:`Kind` of an attempt outcome; never raises (an unknown name is ``Kind.UNEXPECTED``)."""
    if outcome == OK:
        return Kind.OK
    if outcome in TRANSPORT_FAILURES:
        return Kind.ENDPOINT
    status = http_status(outcome)
    if status is None:
        return Kind.UNEXPECTED
    if status in OVERLOAD_STATUS:
        return Kind.OVERLOAD
    if status in RETRYABLE_STATUS:
        return Kind.ENDPOINT if status >= 500 else Kind.TRANSIENT
    if 500 <= status < 600:
        return Kind.SERVER
    if 400 <= status < 500:
        return Kind.RECORD
    return Kind.UNEXPECTED


def is_retryable(outcome: str) -> bool:
    """Whether an attempt that ended with ``outcome`` is tried again (another endpoint, a later pass, or the same
    endpoint after an overload wait): the endpoint or the run failed, not the request."""
    return classify(outcome) in RETRYABLE_KINDS


def is_overload(outcome: str) -> bool:
    """Whether ``outcome`` is an overload answer (HTTP 429 or 503)."""
    return classify(outcome) is Kind.OVERLOAD


def is_endpoint_fault(outcome: str) -> bool:
    """Whether ``outcome`` says the endpoint is unhealthy: a transport failure or a 5xx other than 503."""
    return classify(outcome) in ENDPOINT_FAULT_KINDS


def is_record_fault(outcome: str) -> bool:
    """Whether ``outcome`` is the record's fault: a 4xx other than 408 and 429 (never retried)."""
    return classify(outcome) is Kind.RECORD


RETRYABLE_OUTCOMES = TRANSPORT_FAILURES | frozenset(http_outcome(s) for s in RETRYABLE_STATUS)
"""Every outcome name :func:`is_retryable` accepts."""


# ----------------------------------------------------------------------------------------------
# Attempts and the client's errors
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One HTTP attempt of a request.

    Attributes:
        endpoint: base URL tried.
        outcome: an outcome name (module docstring).
        latency_ms: wall time of the attempt, milliseconds (excludes waiting for a concurrency slot).
        detail: short error text (empty on success); never contains the API key.
    """

    endpoint: str
    outcome: str
    latency_ms: float
    detail: str = ""


class LLMError(RagPipelineError):
    """Base of the client's errors; ``attempts`` lists every HTTP attempt made (picklable)."""

    def __init__(self, message: str, attempts: list[Attempt] | None = None) -> None:
        super().__init__(message)
        self.attempts: list[Attempt] = list(attempts or [])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.attempts))


class RequestFailed(LLMError):
    """This request failed (a final outcome, or retries exhausted while a server was reachable).

    Recoverable: record the error on the row and go on.
    """


class NoEndpointAvailable(LLMError, ServerError):
    """No endpoint can be reached (all refuse connections or have an open circuit breaker). Fatal."""


class Overloaded(LLMError):
    """The endpoint kept answering 429/503 for ``llm.overload_timeout_s``: not a failure of the record (it is
    requeued), the server is up but full."""


def retry_cause(exc: BaseException) -> str | None:
    """Whether a failed LLM request was the run's fault rather than its record's.

    Args:
        exc: the exception a request raised (any; only the client's errors can give a cause).

    Returns:
        :data:`LLM_CAUSE` for :class:`NoEndpointAvailable` and :class:`Overloaded`, and for an :class:`LLMError`
        whose attempts all have retryable outcomes (at least one attempt); None otherwise (the record's failure).
    """
    if isinstance(exc, (NoEndpointAvailable, Overloaded)):
        return LLM_CAUSE
    if isinstance(exc, LLMError) and exc.attempts and all(is_retryable(a.outcome) for a in exc.attempts):
        return LLM_CAUSE
    return None


def bad_endpoints(attempts: Iterable[Attempt]) -> list[str]:
    """Endpoints (sorted, each once) with an attempt whose outcome says the endpoint is unhealthy
    (:func:`is_endpoint_fault`); main routes records around them for a while."""
    return sorted({a.endpoint for a in attempts if is_endpoint_fault(a.outcome)})


__all__ = [
    "Attempt",
    "BAD_RESPONSE",
    "CONNECTION_ERROR",
    "CONNECT_ERROR",
    "Kind",
    "LLMError",
    "LLM_CAUSE",
    "NoEndpointAvailable",
    "OK",
    "OVERLOAD_STATUS",
    "Overloaded",
    "RETRYABLE_OUTCOMES",
    "RETRYABLE_STATUS",
    "RequestFailed",
    "TIMEOUT",
    "TRANSPORT_FAILURES",
    "bad_endpoints",
    "classify",
    "http_outcome",
    "http_status",
    "is_endpoint_fault",
    "is_overload",
    "is_record_fault",
    "is_retryable",
    "retry_cause",
]
