"""Every message that crosses a process boundary in a run, as a typed dataclass (pickled by multiprocessing).

Main -> worker inbox: a ``list[WorkItem]``; an :class:`EndpointsUp` (main's probe sees endpoints answer again: the
worker's LLM client probes them at once instead of waiting out its circuit breaker's cool-down); or ``None`` (the
sentinel: finish in-flight work, then exit).

Worker -> main, on the worker's own result pipe (:mod:`workers.protocol` writes, :mod:`pipeline.run.channels`
reads):

==================  ==============================================================================
:class:`Heartbeat`  every ``run.heartbeat_interval_s`` (a sign of life; not forwarded to the scheduler)
:class:`Ready`      start-up finished (rank0: the store is ready), with a detail dict for the log
:class:`Fatal`      the worker failed as a whole; the traceback crosses the process as text
:class:`RagResults` one :class:`RagResult` per record of a micro-batch (or one, when its LLM answer came back)
:class:`GenResults` one :class:`GenResult` per record
:class:`LogLine`    a log record of the worker that the run's stderr shows (:mod:`pipeline.logs`); logged by
                    main's channel reader, never forwarded to the scheduler
==================  ==============================================================================

A failed result carries ``retry_cause``: ``"llm"`` when its LLM request failed with retryable errors only
(the endpoints were in trouble, not the record), ``"store"`` for a vector-store error, None otherwise. Main
decides from it whether the failure is the record's (a failure row) or the run's (the record is sent again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STORE_CAUSE = "store"
"""``retry_cause`` of a result whose retrieval failed on a vector-store error (the LLM one is
:data:`pipeline.llm.outcome.LLM_CAUSE`)."""


@dataclass(kw_only=True)
class LLMStageResult:
    """What one LLM stage (the RAG answer or the generation) reports about its requests, beside its text.

    Attributes:
        attempts: HTTP attempts of the stage's requests, retries included.
        endpoint: the endpoint that answered (a RAG answer's endpoint is where the record's generation goes);
            ``model``: the model name it reported.
        bad_endpoints: endpoints on which an attempt failed with a connection error, timeout or 5xx.
        unavailable: no endpoint was reachable; ``overloaded``: overload outlasted ``llm.overload_timeout_s``.
        retry_cause: ``"llm"``, ``"store"`` or None (see the module docstring).
        requests: LLM requests made (a re-ask of ``generation.response_format`` is one more).
        prompt_tokens, completion_tokens: the ``usage`` the server reported, summed over the stage's replies;
            None when no reply carried usage.
        finish_reason: why the reply in the row ended, as the server says (``"stop"``, ``"length"`` = cut by
            the stage's ``max_tokens``, ...); None without a reply.
        contexts_used: how many of the record's first retrieved passages the stage's prompt carried (the
            context budget of :mod:`pipeline.llm.context`); None when the stage built no prompt with passages
            (no LLM call, or the query alone after a soft failure).
    """

    attempts: int = 0
    endpoint: str | None = None
    model: str | None = None
    bad_endpoints: list[str] = field(default_factory=list)
    unavailable: bool = False
    overloaded: bool = False
    retry_cause: str | None = None
    requests: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    contexts_used: int | None = None


@dataclass
class RagResult(LLMStageResult):
    """What a RAG worker made of one record (and, from :class:`LLMStageResult`, its answer request's report).

    Attributes:
        id: the record id.
        contexts: retrieved chunks, best first: ``{doc_id, chunk_id, text, score (float), dense_rank,
            bm25_rank (int | None)}`` (the ``contexts`` column of the row).
        rag_answer: the grounded answer (``rag.mode = "retrieve+answer"``), or None.
        rag_status: ``ok`` | ``soft_fail`` | ``hard_fail``; ``rag_error``: why, for failures.
        retrieve_ms: wall time of the record's retrieval micro-batch; ``rag_llm_ms``: the answer request's
            latency (retries included), milliseconds.
    """

    id: str
    contexts: list[dict[str, Any]] = field(default_factory=list)
    rag_answer: str | None = None
    rag_status: str = "ok"
    rag_error: str | None = None
    retrieve_ms: float | None = None
    rag_llm_ms: float | None = None

    @property
    def failed(self) -> bool:
        """The record's RAG stage failed hard (its generation is skipped unless the failure is retried)."""
        return self.rag_status == "hard_fail"


@dataclass
class GenResult(LLMStageResult):
    """What a generation process made of one record (and, from :class:`LLMStageResult`, its requests' report).

    Attributes:
        id: the record id.
        generation: the generated text (the raw reply for ``invalid_output``), or None.
        generation_json: with ``generation.response_format``: the validated reply as compact JSON, else None.
        gen_status: ``ok`` | ``failed`` | ``invalid_output`` (``skipped`` is decided by main, never sent).
        gen_error: why, for failures.
        generate_ms: the request's latency (retries and re-asks included), milliseconds.
    """

    id: str
    generation: str | None = None
    generation_json: str | None = None
    gen_status: str = "ok"
    gen_error: str | None = None
    generate_ms: float | None = None

    @property
    def failed(self) -> bool:
        """The generation failed after retries and failover."""
        return self.gen_status == "failed"


@dataclass
class WorkItem:
    """One record on its way through the run.

    Attributes:
        id: the record id (str); ``query``: its query; ``extra``: its other input fields (passed through).
        t_dispatch: when main last sent it to a worker (monotonic seconds; deadlines and health run from it).
        t_first_dispatch: when main first sent it to a RAG worker in this invocation (monotonic seconds; 0.0 before;
            the pipeline's overhead per record is measured from it).
        rag: its RAG result, once it has one (a generation item carries it: the prompt is built from it).
        target: the endpoint its generation is routed to.
        index: the record's 0-based position among the valid records of the input, global across shards
            (:class:`pipeline.dataset.records.Record` ``index``; written as the row's ``input_index``); -1 unknown.
    """

    id: str
    query: str
    extra: dict[str, Any] = field(default_factory=dict)
    t_dispatch: float = 0.0
    t_first_dispatch: float = 0.0
    rag: RagResult | None = None
    target: str | None = None
    index: int = -1


@dataclass
class EndpointsUp:
    """Main -> every worker: the health probe saw these endpoints (base URLs) come back up after being down.

    The worker's LLM client ends the cool-down of their open circuit breakers: its next request to each is the
    half-open probe (:meth:`pipeline.llm.client.LLMClient.endpoints_up`)."""

    urls: tuple[str, ...]


@dataclass
class Heartbeat:
    """A worker is alive and scheduled."""

    worker: str


@dataclass
class Ready:
    """A worker finished its start-up (rank0: the store is ready; ``detail`` for the log)."""

    worker: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fatal:
    """A worker failed as a whole; ``traceback`` is the formatted text of the exception."""

    worker: str
    traceback: str


@dataclass
class RagResults:
    """Results of the RAG stage from worker ``worker``."""

    worker: str
    results: list[RagResult]


@dataclass
class GenResults:
    """Results of the generation stage from worker ``worker``."""

    worker: str
    results: list[GenResult]


@dataclass
class LogLine:
    """A worker's log record, sent to main to be shown on the run's stderr (:func:`pipeline.logs.emit_forwarded`).

    Attributes:
        role: the worker's role and rank (``gen-2``); ``created``: when it was logged (seconds since the epoch);
        levelno: the :mod:`logging` level; ``name``: the logger; ``text``: the formatted message (with the
        traceback, if any); ``repeat_key``: the aggregation key of a repeated event, or None.
    """

    role: str
    created: float
    levelno: int
    name: str
    text: str
    repeat_key: str | None = None


WorkerMessage = Heartbeat | Ready | Fatal | RagResults | GenResults | LogLine
"""Anything a worker sends to main."""
