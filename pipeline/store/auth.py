"""The token sent to a user's own Chroma server (``store.chroma_url``, behind an authenticating proxy).

Chroma 1.x ships no authentication, so a server reachable from the network must sit behind a proxy that checks a
token; the client sends it in a header read from an environment variable (``store.token_env``), never from the
configuration, so that it is neither logged nor written to ``run.json`` or the manifest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlparse

from pipeline.servers.process import is_loopback

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import StoreConfig


def token_headers(store_cfg: StoreConfig) -> dict[str, str]:
    """The HTTP headers sent to ``store.chroma_url``: ``{store.token_header: token}`` with the token read from the
    environment variable ``store.token_env`` (``Authorization`` gets ``Bearer <token>``); ``{}`` without
    ``token_env``. The token is never logged and never put into a message.

    Raises:
        pipeline.errors.ConfigError: ``token_env`` names an unset or empty variable, ``token_header`` is empty,
            or the token would be sent in clear text (``http://`` to a host other than loopback).
    """
    import os

    from pipeline.errors import ConfigError

    if not store_cfg.token_env:
        return {}
    token = os.environ.get(store_cfg.token_env, "")
    if not token:
        raise ConfigError(f"[store] token_env: environment variable {store_cfg.token_env} is not set or empty")
    header = store_cfg.token_header.strip()
    if not header:
        raise ConfigError("[store] token_header: empty (e.g. Authorization or X-Chroma-Token)")
    url = urlparse(store_cfg.chroma_url)
    if store_cfg.chroma_url and url.scheme != "https" and not is_loopback(url.hostname or ""):
        raise ConfigError(f"[store] token_env: the token would travel unencrypted to {store_cfg.chroma_url}; "
                          "use an https:// URL (or a proxy on this machine's loopback)")
    return {header: f"Bearer {token}" if header.lower() == "authorization" else token}


def redact(text: str, headers: dict[str, str]) -> str:
    """``text`` with every header value (and the bare token of ``Bearer <token>``) replaced by ``***``."""
    secrets = {s for value in headers.values() for s in (value, value.removeprefix("Bearer ")) if s}
    for secret in sorted(secrets, key=len, reverse=True):  # "Bearer <token>" before the bare token
        text = text.replace(secret, "***")
    return text


__all__ = ["redact", "token_headers"]
