"""Servers bind the loopback unless the user says otherwise, and a user's own Chroma server is reached with a token.

* `serve-store --host 0.0.0.0` is refused without --allow-unauthenticated-network (nothing started), and with
  it Chroma listens on every interface;
* `serve` / `launch_servers.sh` on 0.0.0.0 are refused without an API key; with --api-key-env the real llama.cpp
  server requires the key (401 without it) and the key is on no command line and in no log;
* `ingest` and `run --chroma-url` reach a real Chroma server through an authenticating proxy with the token of
  --store-token-env (Authorization: Bearer, or X-Chroma-Token): the token is sent, and is in no output, log,
  `run.json` or `manifest.json`; without it the run stops with one line, exit 4.

The proxy is a stand-in for the user's own (nginx, Caddy...): a few lines of http.server that check the token and
forward each request to the real Chroma server.
"""

from __future__ import annotations

import http.server
import os
import signal
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
    """Forwards requests carrying the token to ``upstream``; 401 otherwise. Records the header used per request."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen: list[str] = []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


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
