"""What an LLM endpoint says about tokens: the model's context window, its chat template's cost, token counts.

Used by the processes that build prompts (RAG workers, generation processes) to size the retrieved context
(:mod:`pipeline.llm.context`). Per endpoint, asked once and cached (thread-safe):

===============  =====================================================  ==============================================
server           context window                                         token counts (one request per prompt)
===============  =====================================================  ==============================================
llama.cpp        ``GET /props``: ``default_generation_settings.n_ctx``  ``POST /tokenize {"content", "with_pieces"}``
                 (the context of one slot)                              on the joined texts, split by the pieces' bytes
SGLang           ``GET /v1/models``: ``data[0].max_model_len``          ``POST /tokenize {"prompt": [texts...]}``:
                                                                        one count per text
vLLM, others     ``/v1/models`` ``max_model_len`` if present, else      estimated: ``ceil(chars / 4)``
                 ``rag.context_window_tokens``                          (:data:`pipeline.llm.budget.CHARS_PER_TOKEN`)
===============  =====================================================  ==============================================

The chat template's tokens (the wrapping of a one-message chat, e.g. 30 tokens for SmolLM2's default system
message) are measured once: llama.cpp ``POST /apply-template`` then ``/tokenize``; SGLang ``POST /tokenize
{"messages"}``; otherwise :data:`TEMPLATE_TOKENS_ESTIMATE`.

A failed probe (endpoint unreachable) gives the fallbacks for :data:`PROBE_RETRY_S` seconds, then the endpoint is
asked again. A failed count falls back to the estimate for that call. Nothing here raises for a server's answer.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests

from pipeline.llm.budget import estimate_tokens

log = logging.getLogger(__name__)

TEMPLATE_TOKENS_ESTIMATE = 64
"""Tokens assumed for the chat template of an endpoint that cannot measure it: more than the templates measured
(SmolLM2 30 with its default system message; Llama 3's ~25 with its date header)."""

PROBE_RETRY_S = 30.0
"""Seconds an unreachable endpoint keeps the fallbacks before it is asked again (its requests fail meanwhile)."""

LLAMACPP = "llama.cpp"
SGLANG = "sglang"
ESTIMATE = "estimate"
UNREACHABLE = "estimate (unreachable)"


@dataclass(frozen=True)
class EndpointTokens:
    """What one endpoint reported.

    Attributes:
        window_tokens: the model's context window for one request, tokens (prompt + reply).
        window_source: where it came from: ``"/props"``, ``"/v1/models"`` or ``"rag.context_window_tokens"``.
        counter: how texts are counted: ``"llama.cpp"``, ``"sglang"`` (the server's tokenizer), ``"estimate"``
            (:func:`pipeline.llm.budget.estimate_tokens`), or ``"estimate (unreachable)"`` (the endpoint did not
            answer: estimated until it is asked again).
        template_tokens: tokens the chat template adds around one user message.
    """

    window_tokens: int
    window_source: str
    counter: str
    template_tokens: int


def endpoint_key(url: str) -> str:
    """An endpoint's base URL as the LLM client keys it: no trailing ``/`` or ``/v1``."""
    key = url.strip().rstrip("/")
    return key[:-3] if key.endswith("/v1") else key


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class ServerTokens:
    """Context windows and token counts of endpoints (the module docstring), for one process.

    Args:
        fallback_window_tokens: the window of an endpoint that reports none (``rag.context_window_tokens``).
        api_key: sent as ``Authorization: Bearer <key>``; never logged.
        timeout_s: connect and read timeout of each request, seconds.
        session: a ``requests.Session`` (default: a new one, shared by the threads of this process).
    """

    def __init__(self, fallback_window_tokens: int, *, api_key: str | None = None, timeout_s: float = 10.0,
                 session: requests.Session | None = None) -> None:
        self.fallback_window_tokens = fallback_window_tokens
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = session or requests.Session()
        self._lock = threading.Lock()
        self._known: dict[str, EndpointTokens] = {}
        self._probe_locks: dict[str, threading.Lock] = {}
        self._retry_at: dict[str, float] = {}

    def __repr__(self) -> str:  # no API key in reprs
        return f"ServerTokens(endpoints={sorted(self._known)!r})"

    # -- per endpoint, cached ------------------------------------------------------------------
    def endpoint(self, url: str) -> EndpointTokens:
        """What ``url`` reports: probed once (by one thread; the others wait for its answer), then cached. An
        unreachable endpoint gets the fallbacks for :data:`PROBE_RETRY_S` seconds, then is asked again."""
        key = endpoint_key(url)
        with self._lock:
            probe_lock = self._probe_locks.setdefault(key, threading.Lock())
        with probe_lock:
            with self._lock:
                known = self._known.get(key)
            if known is not None and (known.counter != UNREACHABLE or time.monotonic() < self._retry_at[key]):
                return known
            try:
                info = self._probe(key)
            except requests.RequestException as exc:
                log.debug("%s: cannot ask for its context window (%s): assuming %d tokens", key,
                          type(exc).__name__, self.fallback_window_tokens)
                info = EndpointTokens(self.fallback_window_tokens, "rag.context_window_tokens", UNREACHABLE,
                                      TEMPLATE_TOKENS_ESTIMATE)
                self._retry_at[key] = time.monotonic() + PROBE_RETRY_S
            else:
                log.info("endpoint %s: context window %d tokens (%s), token counts: %s", key, info.window_tokens,
                         info.window_source, "the server's /tokenize" if info.counter != ESTIMATE else
                         "estimated at 4 characters per token", extra={"repeat_key": f"context window of {key}"})
            with self._lock:
                self._known[key] = info
            return info

    def count(self, url: str, texts: list[str]) -> list[int]:
        """Tokens of each text, as the endpoint's tokenizer counts them (one request), else estimated.

        With llama.cpp the texts are tokenized joined, in one request, and each token is given to the text its
        first byte falls in: a token spanning two texts counts once, in the first (the counts add up to the
        joined text's tokens).

        Returns:
            one count per text (ints >= 0), in order.
        """
        if not texts:
            return []
        info = self.endpoint(url)
        try:
            if info.counter == LLAMACPP:
                return self._count_llamacpp(endpoint_key(url), texts)
            if info.counter == SGLANG:
                return self._count_sglang(endpoint_key(url), texts)
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            log.debug("%s/tokenize failed (%s): estimating token counts", endpoint_key(url), type(exc).__name__)
        return [estimate_tokens(t) for t in texts]

    # -- internals -------------------------------------------------------------------------
    def _get(self, url: str) -> Any:
        resp = self._http.get(url, headers=self._headers, timeout=self.timeout_s)
        return resp.json() if resp.status_code == 200 else None

    def _post(self, url: str, body: dict[str, Any]) -> Any:
        resp = self._http.post(url, json=body, headers=self._headers, timeout=self.timeout_s)
        return resp.json() if resp.status_code == 200 else None

    def _probe(self, base: str) -> EndpointTokens:
        """Ask ``base`` for its window, counter and template tokens. Raises requests.RequestException when the
        endpoint cannot be reached (a server that answers without the information gets the fallbacks)."""
        props = self._json_or_none(self._get, base + "/props")
        if isinstance(props, dict):
            settings = props.get("default_generation_settings")
            n_ctx = _positive_int(settings.get("n_ctx")) if isinstance(settings, dict) else None
            if n_ctx:
                return EndpointTokens(n_ctx, "/props", LLAMACPP, self._llamacpp_template_tokens(base))
        window, source = self.fallback_window_tokens, "rag.context_window_tokens"
        models = self._json_or_none(self._get, base + "/v1/models")
        try:
            n = _positive_int(models["data"][0].get("max_model_len"))  # type: ignore[index]
        except (KeyError, IndexError, TypeError, AttributeError):
            n = None
        if n:
            window, source = n, "/v1/models"
        probe = self._json_or_none(self._post, base + "/tokenize", {"prompt": ["a", "b"], "add_special_tokens": False})
        if isinstance(probe, dict) and isinstance(probe.get("count"), list):
            template = self._json_or_none(self._post, base + "/tokenize",
                                          {"messages": [{"role": "user", "content": ""}]})
            n_template = _positive_int(template.get("count")) if isinstance(template, dict) else None
            return EndpointTokens(window, source, SGLANG, n_template or TEMPLATE_TOKENS_ESTIMATE)
        return EndpointTokens(window, source, ESTIMATE, TEMPLATE_TOKENS_ESTIMATE)

    @staticmethod
    def _json_or_none(call: Any, *args: Any) -> Any:
        """``call(*args)``'s JSON, or None for a body that is not JSON (connection errors propagate)."""
        try:
            return call(*args)
        except ValueError:
            return None

    def _llamacpp_template_tokens(self, base: str) -> int:
        try:
            applied = self._post(base + "/apply-template", {"messages": [{"role": "user", "content": ""}]})
            prompt = applied.get("prompt") if isinstance(applied, dict) else None
            if isinstance(prompt, str):
                data = self._post(base + "/tokenize", {"content": prompt, "add_special": True})
                tokens = data.get("tokens") if isinstance(data, dict) else None
                if isinstance(tokens, list):
                    return len(tokens)
        except ValueError:
            pass
        return TEMPLATE_TOKENS_ESTIMATE

    def _count_llamacpp(self, base: str, texts: list[str]) -> list[int]:
        data = self._post(base + "/tokenize", {"content": "".join(texts), "with_pieces": True})
        return split_pieces(texts, data["tokens"])

    def _count_sglang(self, base: str, texts: list[str]) -> list[int]:
        data = self._post(base + "/tokenize", {"prompt": texts, "add_special_tokens": False})
        counts = data["count"]
        if not isinstance(counts, list) or len(counts) != len(texts):
            raise ValueError(f"/tokenize gave {counts!r} for {len(texts)} texts")
        return [int(c) for c in counts]


def split_pieces(texts: list[str], tokens: list[dict[str, Any]]) -> list[int]:
    """Tokens per text from llama.cpp's ``/tokenize`` ``with_pieces`` answer for ``"".join(texts)``.

    Args:
        texts: the texts, in the order they were joined.
        tokens: ``[{"id": int, "piece": str | list[int]}, ...]``: a piece is the token's text, or its bytes when
            they are not valid UTF-8 on their own.

    Returns:
        one count per text: the tokens whose first byte falls in that text (UTF-8 byte offsets; a token past the
        end, e.g. from a tokenizer's added leading space, counts in the last text).

    Raises:
        KeyError, TypeError: ``tokens`` is not of that shape.
    """
    ends: list[int] = []
    total = 0
    for t in texts:
        total += len(t.encode("utf-8"))
        ends.append(total)
    counts = [0] * len(texts)
    offset = 0
    i = 0
    for tok in tokens:
        piece = tok["piece"]
        size = len(piece.encode("utf-8")) if isinstance(piece, str) else len(piece)
        while i < len(texts) - 1 and offset >= ends[i]:
            i += 1
        counts[i] += 1
        offset += size
    return counts


__all__ = ["ESTIMATE", "LLAMACPP", "PROBE_RETRY_S", "SGLANG", "TEMPLATE_TOKENS_ESTIMATE", "UNREACHABLE",
           "EndpointTokens", "ServerTokens", "endpoint_key", "split_pieces"]
