"""Servers bind the loopback unless the user says otherwise, and a user's own Chroma server is reached with a token.

* `serve-store --host 0.0.0.0` is refused without --allow-unauthenticated-network (nothing started), and with
  it Chroma listens on every interface;
* `serve` / `launch_servers.sh` on 0.0.0.0 are refused without an API key; with --api-key-env the real llama.cpp
  server requires the key (401 without it) and the key is on no command line and in no log;
* `ingest` and `run --chroma-url` reach a real Chroma server through an authenticating proxy with the token of
  --store-token-env (Authorization: Bearer, or X-Chroma-Token): the token is sent, and is in no output, log,
  `run.json` or `manifest.json`; without it the run stops with one line, exit 4;
* the same over https, the proxy's certificate signed by a throwaway site CA (made with the `openssl` CLI):
  `ingest` and `run` verify it with --store-ca-file and every row retrieves through it; without the CA, with a
  certificate for another host name, or https to a plain http port, one line naming the TLS problem, exit 4; a
  missing or unusable CA file, one line, exit 2, before anything is sent.

The proxy is a stand-in for the user's own (nginx, Caddy...): a few lines of http.server that check the token and
forward each request to the real Chroma server (over TLS when given a certificate).
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from tests.fixtures.llm import LLAMA_MISSING, free_port_block
from tests.runtools import run_args, write_config, write_records

REPO = Path(__file__).resolve().parents[1]
TOKEN = "tok-9f3c1e7a55d2-secret"


def _cli(*args: str, env: dict | None = None, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, **(env or {})})


def _listeners(pid: int) -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket in LISTEN of ``pid`` and its descendants."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    out = []
    for p in procs:
        try:
            out += [(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    return out


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- serve-store ----------------------------------------------------------------------------------
def test_serve_store_on_every_interface_needs_the_flag(tmp_path: Path) -> None:
    (port,) = [free_port_block(1)]
    res = _cli("serve-store", "--path", str(tmp_path / "db"), "--host", "0.0.0.0", "--port", str(port), timeout_s=60)
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("Error: serve-store --host 0.0.0.0: refused") and "--allow-unauthenticated-network" in line
    assert not (tmp_path / "db").exists()  # nothing started, nothing created

    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve-store", "--path", str(tmp_path / "db"),
                             "--host", "0.0.0.0", "--port", str(port), "--allow-unauthenticated-network"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        lines = iter(proc.stdout.readline, "")
        assert any(line.startswith("Chroma server ready: ") for line in lines)  # chroma prints a banner first
        assert ("0.0.0.0", port) in _listeners(proc.pid)  # what the user accepted
    finally:
        _stop(proc)


# --- serve / launch_servers.sh ----------------------------------------------------------------------
def test_serve_and_launch_servers_on_every_interface_need_an_api_key(tmp_path: Path) -> None:
    port = free_port_block(1)
    res = _cli("serve", "--backend", "llamacpp", "--host", "0.0.0.0", "--base-port", str(port), "--log-dir",
               str(tmp_path / "logs"), timeout_s=60)
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("Error: [servers] host 0.0.0.0: refused") and "api_key_env" in line
    sh = subprocess.run([str(REPO / "launch_servers.sh"), "--backend", "llamacpp", "--host", "0.0.0.0",
                         "--base-port", str(port), "--log-dir", str(tmp_path / "logs")],
                        cwd=REPO, capture_output=True, text=True, timeout=60,
                        env={**os.environ, "PYTHON": sys.executable})
    assert sh.returncode == 2, sh.stderr
    assert "refused" in sh.stderr and "--allow-unauthenticated-network" in sh.stderr
    assert not list((tmp_path / "logs").glob("*.log"))  # no server was started


@pytest.mark.skipif(bool(LLAMA_MISSING), reason=LLAMA_MISSING or "")
def test_llama_server_on_every_interface_requires_the_key(tmp_path: Path) -> None:
    port = free_port_block(1)
    env = {**os.environ, "RAG_TEST_API_KEY": TOKEN, "PYTHON": sys.executable}
    proc = subprocess.Popen([str(REPO / "launch_servers.sh"), "--backend", "llamacpp", "--host", "0.0.0.0",
                             "--base-port", str(port), "--log-dir", str(tmp_path / "logs"), "--api-key-env",
                             "RAG_TEST_API_KEY"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        assert endpoint, proc.stderr.read() if proc.stderr else ""
        assert ("0.0.0.0", port) in _listeners(proc.pid)
        assert requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401
        ok = requests.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=10)
        assert ok.status_code == 200
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert all(TOKEN not in " ".join(p.cmdline()) for p in tree)  # not on any command line
    finally:
        _stop(proc)
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*"))
    assert logs and TOKEN not in logs


# --- a user's own Chroma server behind an authenticating proxy -----------------------------------------
class _Proxy(http.server.ThreadingHTTPServer):
    """Forwards requests carrying the token to ``upstream``; 401 otherwise. Records the header used per request.
    With ``tls`` (an ``ssl.SSLContext`` holding the server certificate) it speaks https, as nginx would."""

    def __init__(self, upstream: str, tls: ssl.SSLContext | None = None) -> None:
        self.upstream = upstream
        self.seen: list[str] = []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        if tls is not None:  # the handshake runs in accept(); a client refusing it is an OSError the server skips
            self.socket = tls.wrap_socket(self.socket, server_side=True)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _Proxy

    def log_message(self, *_args) -> None:  # quiet
        pass

    def _forward(self) -> None:
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            self.server.seen.append("Authorization")
        elif self.headers.get("X-Chroma-Token") == TOKEN:
            self.server.seen.append("X-Chroma-Token")
        else:
            self.server.seen.append("none")
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "authorization", "x-chroma-token", "content-length")}
        r = requests.request(self.command, self.server.upstream + self.path, data=body, headers=headers, timeout=120)
        self.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward


@pytest.fixture
def proxied_chroma(tmp_path: Path) -> Iterator[tuple[str, _Proxy]]:
    """A real Chroma server on the loopback behind the token-checking proxy: yields (proxy URL, proxy)."""
    from pipeline.store.server import StoreServer

    server = StoreServer(tmp_path / "chroma", "127.0.0.1", log_path=tmp_path / "chroma.log")
    server.start()
    proxy = _Proxy(server.url)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}", proxy
    finally:
        proxy.shutdown()
        server.stop()


@pytest.mark.skipif(bool(LLAMA_MISSING), reason=LLAMA_MISSING or "")
def test_token_reaches_the_proxy_and_nowhere_else(tmp_path: Path, proxied_chroma, llama_endpoints) -> None:
    from tests.fixtures.store import write_small_corpus

    url, proxy = proxied_chroma
    env = {"MY_CHROMA_TOKEN": TOKEN}
    corpus = write_small_corpus(tmp_path / "corpus")
    ing = _cli("-v", "ingest", str(corpus), "--chroma-url", url, "--collection", "tokdocs", "--chunk-chars", "0",
               "--no-progress", "--store-token-env", "MY_CHROMA_TOKEN", "--bm25-path", str(tmp_path / "bm25"), env=env)
    assert ing.returncode == 0, ing.stderr[-3000:]
    assert proxy.seen and set(proxy.seen) == {"Authorization"}

    records = write_records(tmp_path, 2)
    cfg = write_config(tmp_path, {"rag": {"mode": "retrieve"}, "generation": {"max_tokens": 4, "num_processes": 1}})
    out = tmp_path / "out"
    args = run_args(records, out, cfg, "--chroma-url", url, "--collection", "tokdocs", "--bm25-path",
                    str(tmp_path / "bm25"), "--endpoints", llama_endpoints[0], "--no-progress")
    proxy.seen.clear()
    res = _cli("-v", "run", *args, "--store-token-env", "MY_CHROMA_TOKEN", "--store-token-header", "X-Chroma-Token",
               env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "X-Chroma-Token" in proxy.seen and "none" not in proxy.seen  # the workers sent it too
    texts = {"stdout/stderr": ing.stdout + ing.stderr + res.stdout + res.stderr}
    for p in out.rglob("*"):
        if p.is_file():
            texts[str(p)] = p.read_bytes().decode("utf-8", errors="replace")
    assert any(name.endswith(".rag-pipeline/manifest.json") for name in texts) and any(name.endswith("main.log") for name in texts)
    leaks = [name for name, text in texts.items() if TOKEN in text]
    assert not leaks, f"the token appears in {leaks}"
    assert "MY_CHROMA_TOKEN" in texts[str(out / ".rag-pipeline/run.json")]  # the variable's name is recorded, not its value

    # without the token the proxy refuses, and the run says so in one line before starting any server
    out2 = tmp_path / "out2"
    res = _cli("run", *run_args(records, out2, cfg, "--chroma-url", url, "--collection", "tokdocs", "--endpoints",
                                llama_endpoints[0], "--no-progress"))
    assert res.returncode == 4, res.stderr[-2000:]
    (line,) = res.stderr.strip().splitlines()
    assert "HTTP 401" in line and "store.token_env" in line
    time.sleep(0)


# --- the same proxy over https, its certificate from the site's own CA -------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _site_ca(d: Path) -> dict[str, Path]:
    """A throwaway CA and two server certificates it signs, made with the openssl CLI in ``d``: ``ca`` (the CA's
    PEM bundle), ``server``/``server_key`` for 127.0.0.1 and localhost, ``other``/``other_key`` for another
    host name only (a certificate that does not name the URL's host)."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=rag-pipeline test site CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    out = {"ca": d / "ca.pem"}
    for name, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("other", "DNS:chroma.other.example")):
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                                       "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
                                       "authorityKeyIdentifier=keyid,issuer\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
        out[name], out[f"{name}_key"] = d / f"{name}.pem", d / f"{name}.key"
    return out


@pytest.fixture
def https_chroma(tmp_path: Path) -> Iterator[dict]:
    """A real Chroma server on the loopback behind two token-checking https proxies whose certificates a throwaway
    site CA signed: ``url`` (certificate for 127.0.0.1 and localhost), ``other_url`` (certificate for another host
    name), ``proxy``/``other`` (the proxies), ``ca`` (the CA's PEM file), ``plain`` (Chroma itself, plain http)."""
    from pipeline.store.server import StoreServer

    certs = _site_ca(tmp_path / "pki")
    server = StoreServer(tmp_path / "chroma", "127.0.0.1", log_path=tmp_path / "chroma.log")
    server.start()
    proxies = []
    for name in ("server", "other"):
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(certs[name], certs[f"{name}_key"])
        proxies.append(_Proxy(server.url, tls))
        threading.Thread(target=proxies[-1].serve_forever, daemon=True).start()
    try:
        yield {"url": f"https://127.0.0.1:{proxies[0].server_address[1]}", "proxy": proxies[0],
               "other_url": f"https://127.0.0.1:{proxies[1].server_address[1]}", "other": proxies[1],
               "ca": certs["ca"], "plain": server.url}
    finally:
        for p in proxies:
            p.shutdown()
        server.stop()


def _https_records(tmp_path: Path) -> Path:
    from tests.fixtures.store import SMALL_QUERIES

    p = tmp_path / "queries.jsonl"
    p.write_text("".join(json.dumps({"id": f"q{i}", "query": q}) + "\n" for i, q in enumerate(SMALL_QUERIES.values())))
    return p


def _one_line_error(res: subprocess.CompletedProcess, code: int) -> str:
    """The command's one error line, its last on stderr (before it only log lines: no traceback), after checking
    its exit code; the token is in no output."""
    assert res.returncode == code, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert [x for x in lines if x.startswith("Error: ")] == lines[-1:], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and TOKEN not in res.stdout + res.stderr
    return lines[-1]


@pytest.mark.skipif(bool(LLAMA_MISSING), reason=LLAMA_MISSING or "")
def test_https_proxy_with_the_site_ca(tmp_path: Path, https_chroma, llama_endpoints) -> None:
    """ingest and run (RAG workers included) verify the proxy's certificate with --store-ca-file and send the
    token over https; every row retrieved its passages through it."""
    from tests.fixtures.store import write_small_corpus
    from tests.runtools import read_rows

    url, proxy, ca = https_chroma["url"], https_chroma["proxy"], str(https_chroma["ca"])
    env = {"MY_CHROMA_TOKEN": TOKEN}
    store = ["--chroma-url", url, "--store-ca-file", ca, "--store-token-env", "MY_CHROMA_TOKEN",
             "--collection", "tlsdocs", "--bm25-path", str(tmp_path / "bm25")]
    ing = _cli("-v", "ingest", str(write_small_corpus(tmp_path / "corpus")), *store, "--chunk-chars", "0",
               "--no-progress", env=env)
    assert ing.returncode == 0, ing.stderr[-3000:]
    assert proxy.seen and set(proxy.seen) == {"Authorization"}

    records = _https_records(tmp_path)
    cfg = write_config(tmp_path, {"rag": {"mode": "retrieve"}, "generation": {"max_tokens": 4, "num_processes": 1},
                                  "retrieval": {"mode": "dense"}})
    out = tmp_path / "out"
    proxy.seen.clear()
    res = _cli("-v", "run", *run_args(records, out, cfg, *store, "--endpoints", llama_endpoints[0], "--no-progress"),
               env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(proxy.seen) > 2 and set(proxy.seen) == {"Authorization"}  # preflight and RAG workers, over TLS
    rows = read_rows(out)
    assert len(rows) == 5 and all(r["rag_status"] == "ok" and r["contexts"] for r in rows), rows
    assert all(r["gen_status"] == "ok" for r in rows)
    texts = [ing.stdout, ing.stderr, res.stdout, res.stderr,
             *(p.read_bytes().decode("utf-8", errors="replace") for p in out.rglob("*") if p.is_file())]
    assert not [t for t in texts if TOKEN in t]


def test_https_certificate_not_accepted(tmp_path: Path, https_chroma) -> None:
    """Without the site's CA (or with a certificate for another host name, or https to a plain http port) ingest
    and run stop with one line that names the TLS problem and the setting, exit 4, before anything is written;
    the token is in no output."""
    from tests.fixtures.store import write_small_corpus

    url, proxy, ca = https_chroma["url"], https_chroma["proxy"], str(https_chroma["ca"])
    env = {"MY_CHROMA_TOKEN": TOKEN}
    token = ["--store-token-env", "MY_CHROMA_TOKEN", "--collection", "tlsdocs"]
    corpus = write_small_corpus(tmp_path / "corpus")

    # ingest (the chromadb client: httpx) without the CA: certifi's public CAs do not know the site's
    line = _one_line_error(_cli("ingest", str(corpus), "--chroma-url", url, *token, "--no-progress", env=env), 4)
    assert "TLS certificate not accepted" in line and "--store-ca-file" in line and url in line, line
    assert "store.ca_file is not set" in line
    # run (the preflight: requests) without the CA: stops before any server starts
    records = _https_records(tmp_path)
    cfg = write_config(tmp_path, {"rag": {"mode": "retrieve"}})
    unreached = ["--endpoints", "http://127.0.0.1:9", "--no-progress"]
    line = _one_line_error(_cli("run", *run_args(records, tmp_path / "out", cfg, "--chroma-url", url, *token,
                                                 *unreached), env=env), 4)
    assert "TLS certificate not accepted" in line and "--store-ca-file" in line, line
    # also when the run would ingest first (its collection need not exist yet)
    line = _one_line_error(_cli("run", *run_args(records, tmp_path / "out1", cfg, "--chroma-url", url, *token,
                                                 "--ingest", str(corpus), *unreached), env=env), 4)
    assert "TLS certificate not accepted" in line, line
    assert proxy.seen == []  # no request got through
    assert not list((tmp_path / "out").rglob("*.parquet")) and not list((tmp_path / "out1").rglob("*.parquet"))

    # the right CA, but a certificate that does not name the URL's host
    other = ["--chroma-url", https_chroma["other_url"], "--store-ca-file", ca, *token]
    line = _one_line_error(_cli("run", *run_args(records, tmp_path / "out2", cfg, *other, *unreached), env=env), 4)
    assert "TLS certificate not accepted" in line and "mismatch" in line and f"store.ca_file {ca}" in line, line
    line = _one_line_error(_cli("ingest", str(corpus), *other, "--no-progress", env=env), 4)
    assert "TLS certificate not accepted" in line and "mismatch" in line, line
    assert https_chroma["other"].seen == []

    # https to Chroma's plain http port: the handshake fails
    plain = https_chroma["plain"].replace("http://", "https://")
    line = _one_line_error(_cli("run", *run_args(records, tmp_path / "out3", cfg, "--chroma-url", plain,
                                                 "--collection", "tlsdocs", *unreached)), 4)
    assert "TLS handshake" in line and "https server" in line, line


def test_unusable_ca_file_refused_before_anything_starts(tmp_path: Path, https_chroma) -> None:
    """A missing CA file, a directory or a file without PEM certificates: one line naming the file and
    store.ca_file, exit 2, nothing sent to the server and no output directory."""
    from tests.fixtures.store import write_small_corpus

    url, proxy = https_chroma["url"], https_chroma["proxy"]
    env = {"MY_CHROMA_TOKEN": TOKEN}
    records = _https_records(tmp_path)
    cfg = write_config(tmp_path, {"rag": {"mode": "retrieve"}})
    corpus = write_small_corpus(tmp_path / "corpus")
    (tmp_path / "notpem.pem").write_text("not a certificate\n")
    for bad, what in ((tmp_path / "missing.pem", "CA bundle not found"), (tmp_path / "corpus", "a directory"),
                      (tmp_path / "notpem.pem", "not a readable PEM CA bundle")):
        store = ["--chroma-url", url, "--store-ca-file", str(bad), "--store-token-env", "MY_CHROMA_TOKEN",
                 "--collection", "tlsdocs"]
        out = tmp_path / f"out-{bad.name}"
        run = _cli("run", *run_args(records, out, cfg, *store, "--endpoints", "http://127.0.0.1:9",
                                    "--no-progress"), env=env)
        ing = _cli("ingest", str(corpus), *store, "--no-progress", env=env)
        for res in (run, ing):
            line = _one_line_error(res, 2)
            assert "[store] ca_file" in line and str(bad) in line and what in line, line
        assert not out.exists()
    assert proxy.seen == []
