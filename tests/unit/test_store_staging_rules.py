"""The pure rules of staging a store on a node and of the network listeners: version and copy check, free space,
stale-copy selection, which bind addresses need a credential, the store token's header, the CA bundle of an https
store server and how a TLS failure is named, secret server arguments.

Nothing here copies a store or starts a server: the real staging (two processes sharing one copy) is in
tests/test_store_staging.py, the refusals of the commands in tests/test_network_listeners.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError
from pipeline.servers.base import ServerSpec
from pipeline.servers.plan import plan_servers
from pipeline.servers.process import ALLOW_FLAG, is_loopback, open_listener_problem
from pipeline.store.auth import ca_file, redact, tls_problem, token_headers
from pipeline.store.staging import (
    SPACE_RESERVE_BYTES,
    CopyEntry,
    compare_files,
    select_stale,
    space_needed,
    space_problem,
    version_of,
)

GIB = 2**30


# --- version and copy check -----------------------------------------------------------------------
def test_version_follows_every_size_and_stamp_not_the_order() -> None:
    a = {"chroma.sqlite3": (8192, "state1"), "seg/data_level0.bin": (1000, 17)}
    assert version_of(a) == version_of(dict(reversed(list(a.items()))))
    assert len(version_of(a)) == 16
    assert version_of(a) != version_of({**a, "chroma.sqlite3": (8192, "state2")})  # an ingest wrote
    assert version_of(a) != version_of({**a, "seg/data_level0.bin": (1001, 17)})
    assert version_of(a) != version_of({**a, "bm25/docs/x.npy": (5, 1)})


def test_compare_files_names_each_difference() -> None:
    src = {"chroma.sqlite3": 8192, "seg/header.bin": 100}
    assert compare_files(src, dict(src)) == []
    assert compare_files(src, {**src, "extra.log": 3}) == []  # files of the copy's own are not held against it
    assert compare_files(src, {"chroma.sqlite3": 4096}) == [
        "chroma.sqlite3: 4096 bytes, expected 8192", "seg/header.bin: missing"]
    assert compare_files(src, src, {"docs": 10}, {"docs": 10}) == []
    assert compare_files(src, src, {"docs": 10}, {"docs": 9}) == ["chunks per collection {'docs': 9}, expected {'docs': 10}"]
    assert compare_files(src, src, {"docs": 10}, None) == ["chunks per collection unreadable, expected {'docs': 10}"]


# --- free space -----------------------------------------------------------------------------------
def test_free_space_needs_the_copy_and_a_reserve() -> None:
    assert space_needed(0) == SPACE_RESERVE_BYTES
    assert space_needed(10 * GIB) == 10 * GIB + GIB  # 5 % of 10 GiB < 1 GiB: the fixed reserve
    assert space_needed(100 * GIB) == 105 * GIB  # 5 % of 100 GiB > 1 GiB
    assert space_problem(10 * GIB, 11 * GIB, "/tmp/x") is None
    msg = space_problem(10 * GIB, 11 * GIB - 1, "/tmp/x")
    assert msg is not None and "\n" not in msg
    assert msg.startswith("/tmp/x: not enough free space to stage the store: need 11264 MiB (the copy 10240 MiB")
    assert "11263 MiB free" in msg and "store.local_dir" in msg and "--store-local-dir" in msg


# --- stale copies ---------------------------------------------------------------------------------
def test_stale_copies_are_other_versions_unused_and_unlocked() -> None:
    now, day = 1_000_000.0, 24 * 3600.0
    entries = [
        CopyEntry("current", now - 10 * day, in_use=False),  # the version staged now: never
        CopyEntry("old-free", now - 2 * day, in_use=False),  # selected
        CopyEntry("old-busy", now - 2 * day, in_use=True),  # a run reads it
        CopyEntry("recent", now - 3600.0, in_use=False),  # used an hour ago
        CopyEntry("edge", now - day, in_use=False),  # exactly the idle limit: selected
    ]
    assert select_stale(entries, "current", now, day) == ["edge", "old-free"]
    assert select_stale(entries, "current", now, 0.0) == ["edge", "old-free", "recent"]
    assert select_stale([], "current", now, day) == []


# --- network listeners ----------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.9", "localhost", "::1", "[::1]"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)
    assert open_listener_problem(host, authenticated=False, allowed=False, what="x", instead="y") is None


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "10.1.2.3", "node7"])
def test_other_addresses_need_a_credential_or_the_flag(host: str) -> None:
    assert not is_loopback(host)
    msg = open_listener_problem(host, authenticated=False, allowed=False, what="serve-store --host", instead="use a proxy")
    assert msg is not None and "\n" not in msg and ALLOW_FLAG in msg and "use a proxy" in msg
    assert msg.startswith(f"serve-store --host {host or '0.0.0.0'}: refused")
    assert open_listener_problem(host, authenticated=True, allowed=False, what="x", instead="y") is None
    assert open_listener_problem(host, authenticated=False, allowed=True, what="x", instead="y") is None


def _servers(**fields) -> Config:
    cfg = load_config()
    return dataclasses.replace(cfg, servers=dataclasses.replace(cfg.servers, backend="llamacpp", model="/m.gguf",
                                                                **fields))


def test_managed_servers_on_another_address_need_an_api_key(monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"\[servers\] host 0.0.0.0: refused.*api_key_env"):
        plan_servers(_servers(host="0.0.0.0"))
    (spec,) = plan_servers(_servers(host="0.0.0.0", allow_unauthenticated_network=True))
    assert "--api_key_env" not in spec.argv
    monkeypatch.setenv("RAG_TEST_KEY", "s3cret-value")
    (spec,) = plan_servers(_servers(host="0.0.0.0", api_key_env="RAG_TEST_KEY"))
    argv = list(spec.argv)
    assert argv[argv.index("--api_key_env") + 1] == "RAG_TEST_KEY"  # the server reads it: not on its command line
    assert "s3cret-value" not in spec.shell_command() and "s3cret-value" not in argv


def test_secret_arguments_are_shown_as_variables_and_resolved_at_start() -> None:
    spec = ServerSpec(index=0, backend="sglang", argv=("python", "-m", "sglang.launch_server", "--port", "1"), env={},
                      host="0.0.0.0", port=1, health_path="/health", log_path=__import__("pathlib").Path("/l"),
                      secret_args=(("--api-key", "MY_KEY"),))
    assert spec.shell_command().endswith('--port 1 --api-key "$MY_KEY"')
    assert spec.spawn_argv({"MY_KEY": "tok"})[-2:] == ["--api-key", "tok"]
    with pytest.raises(ConfigError, match="MY_KEY is not set"):
        spec.spawn_argv({})


# --- the store token ------------------------------------------------------------------------------
def _store(**fields):
    return dataclasses.replace(Config().store, **fields)


def test_token_header_forms(monkeypatch) -> None:
    monkeypatch.setenv("CHROMA_TOK", "t0k3n")
    assert token_headers(_store(chroma_url="https://chroma.example:443")) == {}  # no token_env: no header
    assert token_headers(_store(chroma_url="https://h:8443", token_env="CHROMA_TOK")) == {
        "Authorization": "Bearer t0k3n"}
    assert token_headers(_store(chroma_url="https://h", token_env="CHROMA_TOK", token_header="X-Chroma-Token")) == {
        "X-Chroma-Token": "t0k3n"}
    # a proxy on this machine's loopback (an ssh tunnel) may be plain http
    assert token_headers(_store(chroma_url="http://127.0.0.1:9000", token_env="CHROMA_TOK")) == {
        "Authorization": "Bearer t0k3n"}


def test_token_refusals_never_show_the_token(monkeypatch) -> None:
    monkeypatch.setenv("CHROMA_TOK", "t0k3n")
    with pytest.raises(ConfigError, match="unencrypted") as exc:
        token_headers(_store(chroma_url="http://storehost:8000", token_env="CHROMA_TOK"))
    assert "t0k3n" not in str(exc.value)
    with pytest.raises(ConfigError, match="NO_SUCH_VAR is not set"):
        token_headers(_store(chroma_url="https://h", token_env="NO_SUCH_VAR"))
    with pytest.raises(ConfigError, match="token_header: empty"):
        token_headers(_store(chroma_url="https://h", token_env="CHROMA_TOK", token_header=" "))
    assert redact("401 for Bearer t0k3n and t0k3n", {"Authorization": "Bearer t0k3n"}) == "401 for *** and ***"


# --- the CA bundle of an https store server ---------------------------------------------------------------
def test_ca_file_checked_before_use(tmp_path) -> None:
    import certifi  # a PEM bundle that is always installed (requests depends on it)

    https = "https://chroma.example:8443"
    assert ca_file(_store(chroma_url=https)) is None  # the default trust store
    assert ca_file(_store(ca_file=str(tmp_path / "missing.pem"))) is None  # a local store: not used, not checked
    assert ca_file(_store(chroma_url=https, ca_file=certifi.where())) == certifi.where()
    with pytest.raises(ConfigError, match=r"\[store\] ca_file: .*missing.pem: CA bundle not found"):
        ca_file(_store(chroma_url=https, ca_file=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError, match="a directory, expected a PEM file"):
        ca_file(_store(chroma_url=https, ca_file=str(tmp_path)))
    (tmp_path / "notpem.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="notpem.pem: not a readable PEM CA bundle"):
        ca_file(_store(chroma_url=https, ca_file=str(tmp_path / "notpem.pem")))
    with pytest.raises(ConfigError, match="verifies an https:// server, but chroma_url is http://127.0.0.1:8000"):
        ca_file(_store(chroma_url="http://127.0.0.1:8000", ca_file=certifi.where()))


class _Wrapped(Exception):
    """Stands for urllib3's MaxRetryError: the cause sits in ``reason``."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__("max retries")
        self.reason = reason


def test_tls_problem_is_found_among_the_causes() -> None:
    import ssl

    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    verify.verify_message = "unable to get local issuer certificate"
    as_httpx = ConnectionError("connect failed")
    as_httpx.__cause__ = verify
    as_requests = OSError(_Wrapped(verify))  # requests: SSLError(MaxRetryError(reason=...))
    store = _store(chroma_url="https://h:8443")
    for exc in (as_httpx, as_requests):
        line = tls_problem(exc, store)
        assert line is not None and "\n" not in line
        assert line.startswith("TLS certificate not accepted: unable to get local issuer certificate")
        assert "store.ca_file is not set" in line and "--store-ca-file" in line
    line = tls_problem(as_httpx, _store(chroma_url="https://h:8443", ca_file="/etc/site-ca.pem"))
    assert line is not None and "checked against store.ca_file /etc/site-ca.pem" in line
    handshake = ConnectionError("connect failed")
    handshake.__context__ = ssl.SSLError(1, "[SSL] record layer failure")
    assert (tls_problem(handshake, store) or "").startswith("TLS handshake failed")
    assert tls_problem(ConnectionRefusedError(111, "Connection refused"), store) is None
