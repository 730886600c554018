"""Thread-safe client for OpenAI-compatible LLM servers: retries, failover, circuit breaker, concurrency limit.

Used by RAG workers (``prefer`` = the worker's own server) and by the CPU generation processes, so it
imports neither torch, chromadb, sentence_transformers nor :mod:`pipeline.servers.pool` (tested).

Request life (one call of :meth:`LLMClient.chat` / :meth:`LLMClient.complete`):

1. A *pass* tries the endpoints in order: ``prefer`` first, then the others, least in-flight first
   (round-robin among equals). An endpoint whose circuit breaker is open is skipped. A retryable failure
   (:func:`pipeline.llm.outcome.is_retryable`: timeout, connection error, HTTP 408/429/500/502/503/504) moves on
   to the next endpoint at once (failover); any other status (or an unparsable 200) raises
   :class:`RequestFailed` at once, never retried.
2. If a whole pass fails, tenacity waits (exponential backoff with jitter: before pass n+1,
   ``min(backoff_initial_s * 2**(n-1), backoff_max_s) + U(0, backoff_initial_s)`` seconds, tenacity's
   ``wait_exponential + wait_random``; additive jitter as in "Exponential Backoff And Jitter", AWS
   Architecture Blog, 2015) and runs another pass, up to ``llm.max_attempts`` passes.
3. Every HTTP attempt is recorded as an :class:`Attempt` (endpoint, outcome, latency) in the result or
   in the exception.

Circuit breaker (per endpoint): ``llm.breaker_failures`` consecutive retryable failures open it for
``llm.breaker_cooldown_s`` seconds; then one request probes it (half-open); success closes it.

Overload (HTTP 429 or 503, with or without ``Retry-After``) is not a failure: the server is up and asks for
fewer requests. The request waits (``Retry-After`` if given, else exponential backoff with jitter) and is sent
again to the *same* endpoint (its prefix cache holds the record's context), through tenacity, without using
one of ``llm.max_attempts`` and without counting toward the circuit breaker; after ``llm.overload_timeout_s``
of overload it raises :class:`Overloaded` and the record is requeued by main, never failed. Meanwhile the
endpoint gets fewer requests from this process (adaptive concurrency, AIMD as in TCP congestion control,
RFC 5681 / RFC 9438): each endpoint has a concurrency limit, initially ``max_concurrency``; an overload
answer cuts it to ``BETA`` (0.9) times the requests in flight (once per round trip: only a
request sent after the last cut can cut again), a ``Retry-After`` also holds every request of this process to
that endpoint until then, and each success raises the limit by ``1 / limit`` (about +1 per round trip) back up
to ``max_concurrency``. Retries are therefore clocked by completions and backoffs: no retry storm.

Errors (defined in :mod:`pipeline.llm.outcome`, with :class:`Attempt`; importable from here too):
:class:`RequestFailed` (this request failed; the record gets an error, the run goes on),
:class:`Overloaded` (overload outlasted ``llm.overload_timeout_s``: the record is requeued) and
:class:`NoEndpointAvailable` (every endpoint has an open breaker, or every endpoint refused the
connection in the last pass: fatal for the run). Bound on the time to NoEndpointAvailable when every
endpoint refuses connections: ``max_attempts`` passes of ``n_endpoints`` refused connects (milliseconds
each; at most ``connect_timeout_s`` each for unroutable hosts) plus at most ``max_attempts - 1`` backoffs;
once the breakers are open it is immediate.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)
from urllib3.exceptions import MaxRetryError, NewConnectionError

from pipeline.config import DETERMINISTIC_SEED, Config, LLMConfig
from pipeline.llm.outcome import (
    BAD_RESPONSE,
    CONNECT_ERROR,
    CONNECTION_ERROR,
    OK,
    TIMEOUT,
    Attempt,
    LLMError,
    NoEndpointAvailable,
    Overloaded,
    RequestFailed,
    http_outcome,
    is_overload,
    is_retryable,
)
from pipeline.llm.usage import model_name, parse_finish_reason, parse_usage

log = logging.getLogger(__name__)

DEFAULT_BATCH = 256
"""Requests a server batches when it does not say (SGLang's ``max_running_requests`` is read from the server,
llama.cpp's slot count too): vLLM's default ``max_num_seqs`` is 256, and SGLang's automatic
``max_running_requests`` is of that order or more on one GPU."""

INFLIGHT_HEADROOM = 1.25
"""In flight per endpoint = batch x this: the extra quarter waits in the server's own queue, so a finished
sequence is replaced at once, while main moves the record between stages (its RAG answer, then its generation)."""

BETA = 0.9
"""Multiplicative decrease of the concurrency limit on an overload answer. Gentler than TCP's 0.5 / CUBIC's 0.7
(RFC 5681 / RFC 9438): a 429 costs the server almost nothing, while every cut leaves slots idle until the limit
grows back (bench/saturation.py, one endpoint answering 429 above capacity: 0.73 of the ideal with 0.7)."""


# ----------------------------------------------------------------------------------------------
# Results, and failed attempts inside the client (the errors it raises: pipeline.llm.outcome)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """A successful generation.

    Attributes:
        text: generated text (``choices[0].message.content`` or ``choices[0].text``).
        endpoint: base URL that answered.
        model: the model's name: the id sent in the request, or the file name when that id is a file path
            (:func:`model_name`).
        attempts: every attempt, the successful one last.
        latency_ms: wall time of the whole call, milliseconds (waits and backoffs included).
        prompt_tokens, completion_tokens: ``usage`` reported by the server (None if absent).
        finish_reason: ``choices[0].finish_reason`` (``"stop"``, ``"length"``, ...), None if absent.
    """

    text: str
    endpoint: str
    model: str
    attempts: list[Attempt]
    latency_ms: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


class _AttemptError(Exception):
    """A failed attempt; whether it is retried or an overload follows from its outcome (pipeline.llm.outcome)."""

    def __init__(self, outcome: str, detail: str, *, connect_failure: bool = False,
                 retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.retryable = is_retryable(outcome)
        self.connect_failure = connect_failure
        self.overload = is_overload(outcome)
        self.retry_after_s = retry_after_s


class _OverloadSignal(_AttemptError):
    """An overload answer (429/503): wait and send again to the same endpoint."""


class _PassFailed(Exception):
    """Every available endpoint failed in one pass with a retryable error."""

    def __init__(self, all_connect_failures: bool) -> None:
        super().__init__("pass failed")
        self.all_connect_failures = all_connect_failures


class _AllOpen(Exception):
    """Every endpoint's breaker is open."""


# ----------------------------------------------------------------------------------------------
# Endpoint state
# ----------------------------------------------------------------------------------------------


class _Endpoint:
    """State of one endpoint in one client: breaker, adaptive concurrency limit, counters."""

    def __init__(self, url: str, concurrency: int) -> None:
        self.url = url
        self.max_limit = float(concurrency)
        self.limit = float(concurrency)  # adaptive (AIMD); requests in flight <= floor(limit)
        self.cond = threading.Condition()
        self.not_before = 0.0  # monotonic; Retry-After holds every request to this endpoint until then
        self.last_cut = 0.0  # monotonic time of the last multiplicative decrease
        self.failures = 0  # consecutive retryable failures
        self.open_until = 0.0  # monotonic time; breaker open while now < open_until
        self.probing = False  # half-open: one request is probing
        self.model: str | None = None
        self.in_flight = 0
        self.peak_in_flight = 0
        self.requests = 0
        self.errors = 0
        self.overloads = 0
        self.last_overload_log = 0.0

    def acquire(self) -> float:
        """Wait for a slot under the adaptive limit (and any Retry-After); returns the monotonic start time."""
        with self.cond:
            while True:
                now = time.monotonic()
                if now < self.not_before:
                    self.cond.wait(self.not_before - now)
                elif self.in_flight >= max(1, int(self.limit)):
                    self.cond.wait()
                else:
                    break
            self.in_flight += 1
            self.requests += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return now

    def release(self, started: float, outcome: str, retry_after_s: float | None = None) -> None:
        """Free the slot; adapt the limit: ``"ok"`` raises it, ``"overload"`` cuts it (once per round trip)."""
        with self.cond:
            if outcome == "ok":
                self.limit = min(self.max_limit, self.limit + 1.0 / max(1.0, self.limit))
            elif outcome == "overload":
                now = time.monotonic()
                self.overloads += 1
                if started >= self.last_cut:  # sent after the last cut: the cut has not been felt by it yet
                    self.limit = max(1.0, min(self.limit, float(self.in_flight)) * BETA)
                    self.last_cut = now
                if retry_after_s:
                    self.not_before = max(self.not_before, now + retry_after_s)
                if now - self.last_overload_log > 30.0:
                    self.last_overload_log = now
                    log.warning("endpoint %s is overloaded (429/503): %d requests in flight from this process "
                                "now (limit %d of %d)", self.url, self.in_flight - 1, int(self.limit),
                                int(self.max_limit))
            self.in_flight -= 1
            self.cond.notify_all()


def inflight_per_endpoint(cfg: LLMConfig, batch: int | None) -> int:
    """Requests kept in flight on one endpoint by the whole run (RAG answers + generations together).

    Args:
        cfg: ``cfg.max_concurrency`` > 0 is used as is (``--max-concurrency``).
        batch: requests the server decodes together (SGLang ``max_running_requests``, llama.cpp slots), or None
            if unknown (then :data:`DEFAULT_BATCH`).

    Returns:
        ``ceil(batch x INFLIGHT_HEADROOM)`` (e.g. 320 for an unknown server, 5 for 4 llama.cpp slots).
    """
    if cfg.max_concurrency > 0:
        return cfg.max_concurrency
    return max(1, math.ceil((batch or DEFAULT_BATCH) * INFLIGHT_HEADROOM))


def request_seed(cfg: Config) -> int | None:
    """The ``seed`` every request of a run carries: :data:`pipeline.config.DETERMINISTIC_SEED` under
    ``run.deterministic``, else None (none sent)."""
    return DETERMINISTIC_SEED if cfg.run.deterministic else None


def probe_batch(url: str, *, api_key: str | None = None, timeout_s: float = 5.0) -> int | None:
    """The batch size an endpoint reports, or None if it reports none.

    Tried in order: SGLang's ``GET /get_server_info`` (renamed ``/server_info`` in newer releases):
    ``max_running_requests`` at the top level (server arguments, None when automatic) or in
    ``internal_states[*]`` (summed over data-parallel ranks); llama.cpp's ``GET /props``: ``total_slots``.
    vLLM and OpenAI-style APIs expose neither (then the caller uses :data:`DEFAULT_BATCH`). Never raises.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = url.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    for path in ("/get_server_info", "/server_info", "/props"):
        try:
            resp = requests.get(base + path, headers=headers, timeout=timeout_s)
            data = resp.json() if resp.status_code == 200 else None
        except (requests.RequestException, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if path == "/props":
            n = data.get("total_slots")
            return n if isinstance(n, int) and n > 0 else None
        n = data.get("max_running_requests")
        if isinstance(n, int) and n > 0:
            return n
        states = data.get("internal_states")
        if isinstance(states, list):
            ns = [st.get("max_running_requests") for st in states if isinstance(st, dict)]
            if ns and all(isinstance(x, int) and x > 0 for x in ns):
                return sum(ns)
    return None


def _classify(exc: requests.RequestException) -> _AttemptError:
    """Map a requests exception to a transport-failure outcome (all of these are retryable)."""
    if isinstance(exc, requests.ConnectTimeout):
        return _AttemptError(TIMEOUT, f"connect timeout: {exc}", connect_failure=True)
    if isinstance(exc, requests.Timeout):
        return _AttemptError(TIMEOUT, "read timeout")
    if isinstance(exc, requests.ConnectionError):
        inner = exc.args[0] if exc.args else None
        if isinstance(inner, MaxRetryError):
            inner = inner.reason
        if isinstance(inner, NewConnectionError):
            return _AttemptError(CONNECT_ERROR, "connection refused or host unreachable", connect_failure=True)
        return _AttemptError(CONNECTION_ERROR, f"connection dropped: {type(inner or exc).__name__}")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return _AttemptError(CONNECTION_ERROR, "response cut short")
    return _AttemptError(CONNECTION_ERROR, f"{type(exc).__name__}")


# ----------------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------------


def _base_url(url: str) -> str:
    """An endpoint's key: its base URL without a trailing ``/`` or ``/v1``."""
    key = url.strip().rstrip("/")
    return key[:-3] if key.endswith("/v1") else key


class LLMClient:
    """Client for a pool of OpenAI-compatible endpoints (``/v1/chat/completions``, ``/v1/completions``).

    Thread-safe: several threads may call :meth:`chat` / :meth:`complete` at once; each endpoint admits
    at most ``max_concurrency`` requests in flight from this client, fewer while it answers 429/503
    (adaptive limit, see the module docstring); callers beyond that wait.

    Args:
        endpoints: base URLs, ``http://host:port`` (a trailing ``/`` or ``/v1`` is ignored).
        cfg: timeouts (s), attempts, backoff (s), breaker settings, temperature, model name.
        api_key: sent as ``Authorization: Bearer <key>``; never logged, never in errors.
        session: a ``requests.Session`` to use (default: one session of this client, shared by its threads;
            urllib3's connection pools are thread-safe; one connection per request in flight, reused).
        max_concurrency: in-flight requests per endpoint; None = ``cfg.max_concurrency`` if > 0 else 1
            (the pipeline sizes it with :func:`inflight_per_endpoint`).
        seed: sampling ``seed`` sent with every request (the OpenAI field; llama.cpp, SGLang and vLLM honour it),
            None = none sent (the server picks). ``run.deterministic`` sets
            :data:`pipeline.config.DETERMINISTIC_SEED`.

    Raises:
        ValueError: no endpoint, or a concurrency < 1.
    """

    def __init__(
        self,
        endpoints: list[str],
        cfg: LLMConfig,
        *,
        api_key: str | None = None,
        session: requests.Session | None = None,
        max_concurrency: int | None = None,
        seed: int | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("LLMClient needs at least one endpoint")
        self.cfg = cfg
        self.seed = seed
        self.max_concurrency = max_concurrency or (cfg.max_concurrency if cfg.max_concurrency > 0 else 1)
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._lock = threading.Lock()
        self._eps: dict[str, _Endpoint] = {}
        for url in endpoints:
            self._endpoint(url)
        self._rr = itertools.count()
        self._own_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=len(self._eps) + 4, pool_maxsize=max(4, self.max_concurrency),
                                  max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        self._http = session

    def __repr__(self) -> str:  # no API key in reprs
        return f"LLMClient(endpoints={self.endpoints!r}, max_concurrency={self.max_concurrency})"

    @property
    def endpoints(self) -> list[str]:
        """Normalised base URLs, in the order given."""
        return list(self._eps)

    # -- public API ------------------------------------------------------------------------
    def chat(
        self,
        prompt: str,
        max_tokens: int,
        *,
        prefer: str | None = None,
        system: str | None = None,
        temperature: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Completion:
        """One chat completion (``POST /v1/chat/completions``) of a single user message.

        Args:
            prompt: the user message.
            max_tokens: most tokens generated.
            prefer: endpoint tried first (a RAG worker's own server); others are failovers. An endpoint
                not in the list joins the pool.
            system: optional system message put before the prompt.
            temperature: overrides ``cfg.temperature``.
            extra: more OpenAI request fields (``stop``, ``seed``, ``top_p``, ...).

        Returns:
            A :class:`Completion`.

        Raises:
            RequestFailed: non-retryable error (e.g. HTTP 400 context length exceeded), or retries
                exhausted while some server answered.
            NoEndpointAvailable: no endpoint reachable (see the module docstring for the time bound).
        """
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        body = {
            "messages": messages,
            "max_tokens": max_tokens,
            **self._sampling(temperature),
            **(extra or {}),
        }
        return self._request("/v1/chat/completions", body, prefer, _chat_text)

    def complete(
        self,
        prompt: str,
        max_tokens: int,
        *,
        prefer: str | None = None,
        temperature: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Completion:
        """One text completion (``POST /v1/completions``); same arguments, result and errors as :meth:`chat`."""
        body = {"prompt": prompt, "max_tokens": max_tokens, **self._sampling(temperature), **(extra or {})}
        return self._request("/v1/completions", body, prefer, _completion_text)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per endpoint: ``requests`` / ``errors`` / ``overloads`` (attempt counts), ``peak_in_flight``,
        ``limit`` (the adaptive concurrency limit now), ``breaker_open``."""
        now = time.monotonic()
        with self._lock:
            return {
                ep.url: {
                    "requests": ep.requests,
                    "errors": ep.errors,
                    "overloads": ep.overloads,
                    "peak_in_flight": ep.peak_in_flight,
                    "limit": int(ep.limit),
                    "breaker_open": ep.failures >= self.cfg.breaker_failures and now < ep.open_until,
                }
                for ep in self._eps.values()
            }

    def endpoints_up(self, urls: list[str] | tuple[str, ...]) -> list[str]:
        """End the cool-down of the open breakers of ``urls`` (another observer, main's health probe, saw them
        answer): the next request to each is the half-open probe, and its success closes the breaker. Endpoints
        this client does not use, and closed breakers, are left as they are.

        Returns:
            the URLs whose cool-down was ended.
        """
        ended = []
        with self._lock:
            for url in urls:
                ep = self._eps.get(_base_url(url))
                if ep is not None and ep.failures >= self.cfg.breaker_failures and ep.open_until > 0.0:
                    ep.open_until = 0.0
                    ended.append(ep.url)
        for url in ended:
            log.debug("endpoint %s is up by main's probe: probed before its cool-down ends", url)
        return ended

    def close(self) -> None:
        """Close the session this client created (not one passed in)."""
        if self._own_session:
            self._http.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------
    def _sampling(self, temperature: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {"temperature": self.cfg.temperature if temperature is None else temperature,
                               "stream": False}
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def _endpoint(self, url: str) -> _Endpoint:
        key = _base_url(url)
        with self._lock:
            ep = self._eps.get(key)
            if ep is None:
                ep = self._eps[key] = _Endpoint(key, self.max_concurrency)
            return ep

    def _session(self) -> requests.Session:
        return self._http

    def _order(self, prefer: str | None) -> list[_Endpoint]:
        eps = list(self._eps.values())
        k = next(self._rr) % len(eps)
        ordered = sorted(eps[k:] + eps[:k], key=lambda e: e.in_flight)  # stable: round-robin among equals
        if prefer:
            first = self._endpoint(prefer)
            ordered = [first] + [e for e in ordered if e is not first]
        return ordered

    def _admit(self, ep: _Endpoint) -> bool:
        """Breaker check: closed -> yes; open -> no; cool-down over -> one probe at a time."""
        with self._lock:
            if ep.failures < self.cfg.breaker_failures:
                return True
            if time.monotonic() < ep.open_until or ep.probing:
                return False
            ep.probing = True
            log.debug("probing endpoint %s after its cool-down", ep.url)
            return True

    def _record(self, ep: _Endpoint, ok: bool, why: str = "") -> None:
        """Count an attempt's outcome for the breaker (``why``: the failed attempt's outcome and detail, shown
        when the breaker opens). Only its state changes are logged (opened: WARNING; closed
        again: WARNING, as the recovery of a warned condition); a failed probe or a failure of a request that was
        already in flight re-arms the cool-down at DEBUG. Both WARNINGs carry a ``repeat_key``: the run's
        processes each log them, main's stderr aggregates them (:mod:`pipeline.logs`)."""
        with self._lock:
            ep.probing = False
            was_open = ep.failures >= self.cfg.breaker_failures
            if ok:
                if was_open:
                    log.warning("endpoint %s answers again: circuit breaker closed", ep.url,
                                extra={"repeat_key": f"endpoint {ep.url} answers again"})
                ep.failures = 0
                return
            ep.errors += 1
            ep.failures += 1
            if ep.failures >= self.cfg.breaker_failures:
                ep.open_until = time.monotonic() + self.cfg.breaker_cooldown_s
                until = time.strftime("%H:%M:%S", time.localtime(time.time() + self.cfg.breaker_cooldown_s))
                if was_open:
                    log.debug("endpoint %s still failing (%d in a row): skipped until %s", ep.url, ep.failures,
                              until)
                else:
                    log.warning("endpoint %s: %d failures in a row (last: %s): skipped until %s "
                                "(llm.breaker_cooldown_s = %g s), then probed", ep.url, ep.failures,
                                why[:200] or "?", until, self.cfg.breaker_cooldown_s,
                                extra={"repeat_key": f"endpoint {ep.url} skipped after failures"})

    def _request(
        self,
        path: str,
        body: dict[str, Any],
        prefer: str | None,
        extract: Callable[[dict[str, Any]], str],
    ) -> Completion:
        t0 = time.perf_counter()
        attempts: list[Attempt] = []
        retrying = Retrying(
            stop=stop_after_attempt(max(1, self.cfg.max_attempts)),
            wait=wait_exponential(multiplier=self.cfg.backoff_initial_s, max=self.cfg.backoff_max_s)
            + wait_random(0, self.cfg.backoff_initial_s),
            retry=retry_if_exception_type(_PassFailed),
            reraise=True,
        )
        try:
            ep, model, data = retrying(self._pass, path, body, prefer, attempts)
        except _AllOpen:
            raise NoEndpointAvailable(
                f"no LLM endpoint available: all {len(self._eps)} have open circuit breakers "
                f"({', '.join(self._eps)})",
                attempts,
            ) from None
        except _PassFailed as exc:
            last = attempts[-1] if attempts else None
            summary = (
                f"{len(attempts)} attempts; last: {last.endpoint} {last.outcome} {last.detail}"
                if last
                else ""
            )
            if exc.all_connect_failures:
                raise NoEndpointAvailable(f"no LLM endpoint reachable ({summary})", attempts) from None
            raise RequestFailed(f"LLM request failed after retries ({summary})", attempts) from None
        try:
            text = extract(data)
        except (KeyError, IndexError, TypeError):
            raise RequestFailed(
                f"{ep.url}{path}: unexpected response shape: {str(data)[:200]!r}", attempts
            ) from None
        prompt_tokens, completion_tokens = parse_usage(data)
        return Completion(
            text=text,
            endpoint=ep.url,
            model=model_name(model),
            attempts=attempts,
            latency_ms=(time.perf_counter() - t0) * 1000.0,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=parse_finish_reason(data),
        )

    def _pass(
        self, path: str, body: dict[str, Any], prefer: str | None, attempts: list[Attempt]
    ) -> tuple[_Endpoint, str, dict[str, Any]]:
        tried = 0
        connect_failures = 0
        for ep in self._order(prefer):
            if not self._admit(ep):
                continue
            tried += 1
            try:
                model, data = self._attempt_through_overload(ep, path, body, attempts)
            except _AttemptError as err:
                if not err.retryable:
                    self._record(ep, ok=True)  # the server answered: it is up
                    raise RequestFailed(f"{ep.url}{path}: {err.outcome}: {err.detail}", attempts) from None
                self._record(ep, ok=False, why=f"{err.outcome}: {err.detail}")
                connect_failures += err.connect_failure
                log.debug("attempt on %s failed (%s): trying the next endpoint", ep.url, err.outcome)
                continue
            self._record(ep, ok=True)
            return ep, model, data
        if tried == 0:
            raise _AllOpen()
        raise _PassFailed(all_connect_failures=connect_failures == tried)

    def _attempt_through_overload(
        self, ep: _Endpoint, path: str, body: dict[str, Any], attempts: list[Attempt]
    ) -> tuple[str, dict[str, Any]]:
        """:meth:`_attempt`, sent again to the same endpoint while it answers 429/503 (tenacity: Retry-After or
        exponential backoff with jitter, for at most ``llm.overload_timeout_s``); raises :class:`Overloaded`
        after that, and any other error at once."""
        retrying = Retrying(
            stop=stop_after_delay(self.cfg.overload_timeout_s),
            wait=self._overload_wait,
            retry=retry_if_exception_type(_OverloadSignal),
            reraise=True,
        )
        try:
            return retrying(self._attempt, ep, path, body, attempts)
        except _OverloadSignal:
            raise Overloaded(
                f"{ep.url} answered 429/503 (overloaded) for {self.cfg.overload_timeout_s:g} s", attempts
            ) from None

    def _overload_wait(self, state: RetryCallState) -> float:
        """Seconds before sending again after an overload answer: its Retry-After, else
        ``min(backoff_initial_s * 2**(n-1), backoff_max_s) + U(0, backoff_initial_s)``."""
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after:
            return float(retry_after) + random.uniform(0, self.cfg.backoff_initial_s)
        n = state.attempt_number
        return min(self.cfg.backoff_initial_s * 2 ** (n - 1), self.cfg.backoff_max_s) + random.uniform(
            0, self.cfg.backoff_initial_s
        )

    def _attempt(
        self, ep: _Endpoint, path: str, body: dict[str, Any], attempts: list[Attempt]
    ) -> tuple[str, dict[str, Any]]:
        timeout = (self.cfg.connect_timeout_s, self.cfg.read_timeout_s)
        started = ep.acquire()
        outcome = "error"
        retry_after: float | None = None
        t0 = time.perf_counter()
        try:
            model = self._model(ep, timeout)
            resp = self._session().post(
                ep.url + path, json={**body, "model": model}, headers=self._headers, timeout=timeout
            )
            data = _check_response(resp)
        except _AttemptError as err:
            attempts.append(Attempt(ep.url, err.outcome, _ms(t0), err.detail))
            if err.overload:
                outcome, retry_after = "overload", err.retry_after_s
                raise _OverloadSignal(err.outcome, err.detail, retry_after_s=err.retry_after_s) from None
            raise
        except requests.RequestException as exc:
            err = _classify(exc)
            attempts.append(Attempt(ep.url, err.outcome, _ms(t0), err.detail))
            raise err from None
        else:
            outcome = "ok"
        finally:
            ep.release(started, outcome, retry_after)
        attempts.append(Attempt(ep.url, OK, _ms(t0)))
        return model, data

    def _model(self, ep: _Endpoint, timeout: tuple[float, float]) -> str:
        """``cfg.model``, else the first id of the endpoint's ``/v1/models`` (cached per endpoint)."""
        if self.cfg.model:
            return self.cfg.model
        if ep.model is None:
            data = _check_response(
                self._session().get(ep.url + "/v1/models", headers=self._headers, timeout=timeout)
            )
            try:
                ep.model = str(data["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise _AttemptError(BAD_RESPONSE, f"/v1/models lists no model: {str(data)[:200]!r}") from None
        return ep.model


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _retry_after_s(resp: requests.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date, RFC 9110 section 10.2.3), capped at 600 s."""
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        secs = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            secs = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(secs, 0.0), 600.0)


def _check_response(resp: requests.Response) -> dict[str, Any]:
    """JSON body of a 200 response; raise _AttemptError (retryable or not, overload or not) for anything else."""
    if resp.status_code != 200:
        outcome = http_outcome(resp.status_code)
        detail = resp.text[:300].replace("\n", " ")
        raise _AttemptError(outcome, detail, retry_after_s=_retry_after_s(resp) if is_overload(outcome) else None)
    try:
        data = resp.json()
    except ValueError:
        raise _AttemptError(BAD_RESPONSE, f"not JSON: {resp.text[:200]!r}") from None
    if not isinstance(data, dict):
        raise _AttemptError(BAD_RESPONSE, f"not a JSON object: {resp.text[:200]!r}")
    return data


def _chat_text(data: dict[str, Any]) -> str:
    return data["choices"][0]["message"]["content"] or ""


def _completion_text(data: dict[str, Any]) -> str:
    return data["choices"][0]["text"] or ""


__all__ = [
    "Attempt",
    "Completion",
    "DEFAULT_BATCH",
    "LLMClient",
    "LLMError",
    "NoEndpointAvailable",
    "Overloaded",
    "RequestFailed",
    "inflight_per_endpoint",
    "probe_batch",
]
