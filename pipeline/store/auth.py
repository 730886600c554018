"""The token sent to a user's own Chroma server (``store.chroma_url``, behind an authenticating proxy).

Chroma 1.x ships no authentication, so a server reachable from the network must sit behind a proxy that checks a
token; the client sends it in a header read from an environment variable (``store.token_env``), never from the
configuration, so that it is neither logged nor written to ``run.json`` or the manifest.

The proxy's certificate is verified against ``store.ca_file`` (a cluster's proxy usually has a certificate of the
site's own CA), else against the default trust store of requests and httpx (certifi's public CAs); a failed
verification is named as such (:func:`tls_problem`).
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


def ca_file(store_cfg: StoreConfig) -> str | None:
    """The CA bundle that verifies the certificate of ``store.chroma_url``: ``store.ca_file`` as given (a path,
    relative to the current directory), or None for the default trust store. Checked before anything starts.

    Raises:
        pipeline.errors.ConfigError: ``ca_file`` is set for a ``chroma_url`` that is not ``https://``, or it is
            not a readable file holding PEM certificates (checked by loading it into an ``ssl.SSLContext``).
    """
    import ssl
    from pathlib import Path

    from pipeline.errors import ConfigError

    if not store_cfg.ca_file or not store_cfg.chroma_url:
        return None
    if urlparse(store_cfg.chroma_url).scheme != "https":
        raise ConfigError(f"[store] ca_file: {store_cfg.ca_file} verifies an https:// server, but chroma_url is "
                          f"{store_cfg.chroma_url}")
    path = Path(store_cfg.ca_file).expanduser()
    if not path.is_file():
        what = "a directory, expected a PEM file" if path.is_dir() else "CA bundle not found"
        raise ConfigError(f"[store] ca_file: {path}: {what} (--store-ca-file)")
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: no PEM certificate in the file
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ConfigError(f"[store] ca_file: {path}: not a readable PEM CA bundle ({reason})") from None
    return str(path)


def tls_problem(exc: BaseException, store_cfg: StoreConfig) -> str | None:
    """One line naming a TLS failure found in ``exc`` or its causes (``__cause__``, ``__context__``, urllib3's
    ``reason``, exceptions among ``args`` as requests wraps them): the server's certificate was not accepted
    (unknown CA, expired, a host name it does not name) or the handshake failed (e.g. an ``https://`` URL to a
    plain http port); None when ``exc`` holds no TLS failure. The line names the ssl module's reason and the
    setting to change, never a request header (the token); the caller names the URL.
    """
    import ssl

    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        reason = getattr(e, "verify_message", None) or getattr(e, "reason", None) or e
        if isinstance(e, ssl.SSLCertVerificationError):
            trust = (f"checked against store.ca_file {store_cfg.ca_file}" if store_cfg.ca_file else
                     "checked against the default trust store: store.ca_file is not set")
            return (f"TLS certificate not accepted: {reason} ({trust}); pass the PEM bundle of the CA "
                    "that signed it with --store-ca-file (store.ca_file) and a host name the certificate names")
        if isinstance(e, ssl.SSLError):
            return f"TLS handshake failed: {reason}; is it an https server? (store.chroma_url)"
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
    return None


def redact(text: str, headers: dict[str, str]) -> str:
    """``text`` with every header value (and the bare token of ``Bearer <token>``) replaced by ``***``."""
    secrets = {s for value in headers.values() for s in (value, value.removeprefix("Bearer ")) if s}
    for secret in sorted(secrets, key=len, reverse=True):  # "Bearer <token>" before the bare token
        text = text.replace(secret, "***")
    return text


__all__ = ["ca_file", "redact", "tls_problem", "token_headers"]
