"""A small OpenAI-compatible *benchmark* server. It is a bench tool, not a part of the product.

It stands in for a GPU inference server (SGLang) with two numbers only: every request is served after a fixed
**service time** (``--service-ms``), and at most **capacity** requests are in service at once (``--capacity``,
a semaphore: requests beyond it wait in arrival order, as in a server whose batch is full). So one server
completes at most ``capacity / service_s`` requests per second: the ideal the benchmarks compare against.

Endpoints:
    GET  /v1/models             {"object": "list", "data": [{"id": MODEL, ...}]}
    GET  /health                200 "ok"
    POST /v1/chat/completions   a short fixed text in choices[0].message.content, with usage counts
    POST /v1/completions        the same text in choices[0].text
    GET  /stats                 served/waiting/peak/rejected counters; with ?services=1 also (arrival, start,
                                end, label) of every request (time.time() seconds; label = the LAST 40
                                characters of the prompt: both prompts of a record start with the same shared
                                prefix, their stage-specific templates end differently), so a benchmark can
                                compute utilisation and queue lengths per kind of request over a window; with
                                ?prompts=1 the full prompt of every served request (``record_prompts`` only)
    POST /stats/reset           clear the counters
    POST /fault                 inject a fault: ``{"status": 500, "for_s": 20, "retry_after_s": 2}`` makes every
                                completion request answer that HTTP status at once for ``for_s`` seconds
                                (with a ``Retry-After`` header if given); ``{"status": 0}`` clears it;
                                ``"match": "text"`` limits the fault to prompts containing that text;
                                ``{"hang": true, "for_s": 120}``: a stalled server (completions and /health
                                wait until then, requests already queued or in service complete no earlier);
                                ``{"close": true, "for_s": 8}``: every connection is dropped until then

Overload (``--reject-status 429``): a request arriving while all ``capacity`` slots are busy is answered at once
with that status (429 Too Many Requests or 503), with ``Retry-After: --retry-after-s`` if given, instead of
waiting: a server or gateway that sheds load above its batch. Default 0: requests wait (SGLang/vLLM queue them).

Implementation: the standard library's ThreadingHTTPServer (one thread per connection, HTTP/1.1 keep-alive,
TCP_NODELAY, listen backlog 1024), so hundreds of concurrent connections are fine. Several servers can live
in one process (``--n``), each with its own port and its own capacity semaphore; they are independent servers.

Usage:
    python bench/bench_server.py --n 4 --service-ms 400 --capacity 8
prints one JSON line ``{"urls": [...], "pid": PID, ...}`` on stdout once every server listens (free ports
chosen by the kernel), then serves until SIGTERM/SIGINT (or, with --exit-on-stdin-eof, until stdin is closed).

From Python: ``with launch(n, service_ms, capacity) as servers: servers.urls`` (a subprocess, stopped by pid).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MODEL = "bench-model"
TEXT = "The evidence supports the claim, with moderate confidence, based on the retrieved abstracts."


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.served = 0
        self.in_service = 0
        self.waiting = 0
        self.peak_in_service = 0
        self.peak_waiting = 0
        self.bad_requests = 0
        self.rejected = 0
        self.services: list[tuple[float, float, float, str]] = []
        self.prompts: list[str] = []

    def as_dict(self, with_services: bool, with_prompts: bool = False) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = {
                "served": self.served, "in_service": self.in_service, "waiting": self.waiting,
                "peak_in_service": self.peak_in_service, "peak_waiting": self.peak_waiting,
                "bad_requests": self.bad_requests, "rejected": self.rejected,
            }
            if with_services:
                out["services"] = list(self.services)
            if with_prompts:
                out["prompts"] = list(self.prompts)
        return out


class BenchHTTPServer(ThreadingHTTPServer):
    """One benchmark server: fixed service time, fixed capacity."""

    daemon_threads = True
    request_queue_size = 1024  # listen backlog: hundreds of clients connect at once
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], service_s: float, capacity: int, *, reject_status: int = 0,
                 retry_after_s: float | None = None, record_prompts: bool = False) -> None:
        super().__init__(addr, _Handler)
        self.service_s = service_s
        self.capacity = capacity
        self.slots = threading.Semaphore(capacity)  # waiters are woken in FIFO order (threading.Condition)
        self.stats = _Stats()
        self.reject_status = reject_status
        self.retry_after_s = retry_after_s
        self.record_prompts = record_prompts
        # (status, until monotonic, retry_after_s, match: only prompts containing it, or None for all)
        self.fault: tuple[int, float, float | None, str | None] | None = None
        self.hang_until = 0.0  # monotonic: completions and /health wait until then
        self.close_until = 0.0  # monotonic: connections are closed without an answer until then

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: clients dropping connections (timeouts, killed workers, injected faults) are expected here."""
        return

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as LLM clients use pooled connections
    disable_nagle_algorithm = True  # TCP_NODELAY: no 40 ms delayed-ACK stalls on small responses
    server: BenchHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: no line per request
        return

    def _send(self, code: int, payload: Any) -> None:
        body = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if not isinstance(payload, str) else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, status: int, message: str, retry_after_s: float | None) -> None:
        payload = json.dumps({"error": {"message": message}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if retry_after_s is not None:
            self.send_header("Retry-After", f"{retry_after_s:g}")
        self.end_headers()
        self.wfile.write(payload)

    def _faulted(self, path: str) -> bool:
        """Apply a close or hang fault to this request; True if the request is done (connection closed)."""
        if path in ("/fault", "/stats", "/stats/reset"):
            return False
        if time.monotonic() < self.server.close_until:
            self.close_connection = True
            self.connection.shutdown(2)  # socket.SHUT_RDWR: the client sees the connection dropped
            return True
        if path in ("/health", "/v1/chat/completions", "/v1/completions"):
            while time.monotonic() < self.server.hang_until:
                time.sleep(0.05)
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0].rstrip("/")
        if self._faulted(path):
            return
        if path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]})
        elif path == "/health":
            self._send(200, "ok")
        elif path == "/stats":
            self._send(200, self.server.stats.as_dict(with_services="services=1" in self.path,
                                                      with_prompts="prompts=1" in self.path))
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.rstrip("/")
        if self._faulted(path):
            return
        if path == "/stats/reset":
            with self.server.stats.lock:
                self.server.stats.reset()
            self._send(200, {"ok": True})
            return
        if path == "/fault":
            spec = json.loads(raw or b"{}")
            status = int(spec.get("status") or 0)
            until = time.monotonic() + float(spec.get("for_s", 3600))
            self.server.hang_until = until if spec.get("hang") else 0.0
            self.server.close_until = until if spec.get("close") else 0.0
            self.server.fault = (
                (status, time.monotonic() + float(spec.get("for_s", 3600)), spec.get("retry_after_s"),
                 spec.get("match"))
                if status else None
            )
            self._send(200, {"ok": True})
            return
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            with self.server.stats.lock:
                self.server.stats.bad_requests += 1
            self._send(400, {"error": {"message": f"invalid JSON body: {exc}"}})
            return
        if path.endswith("/chat/completions"):
            prompt = " ".join(str(m.get("content", "")) for m in body.get("messages") or [] if isinstance(m, dict))
        else:
            prompt = str(body.get("prompt", ""))
        self._serve(path, body, prompt)

    def _serve(self, path: str, body: dict, prompt: str) -> None:
        srv = self.server
        st = srv.stats
        fault = srv.fault
        if fault and time.monotonic() < fault[1] and (not fault[3] or fault[3] in prompt):
            self._refuse(fault[0], f"injected fault {fault[0]}", fault[2])
            return
        t_arrive = time.time()
        if srv.reject_status:
            if not srv.slots.acquire(blocking=False):
                with st.lock:
                    st.rejected += 1
                self._refuse(srv.reject_status, "server busy: all slots in use", srv.retry_after_s)
                return
        else:
            with st.lock:
                st.waiting += 1
                st.peak_waiting = max(st.peak_waiting, st.waiting)
            srv.slots.acquire()
        try:
            t0 = time.time()
            with st.lock:
                if not srv.reject_status:
                    st.waiting -= 1
                st.in_service += 1
                st.peak_in_service = max(st.peak_in_service, st.in_service)
            time.sleep(srv.service_s)
            while time.monotonic() < srv.hang_until:  # a stalled server: nothing in its batch completes either
                time.sleep(0.05)
            t1 = time.time()
            with st.lock:
                st.in_service -= 1
                st.served += 1
                st.services.append((t_arrive, t0, t1, prompt[-40:]))
                if srv.record_prompts:
                    st.prompts.append(prompt)
        finally:
            srv.slots.release()
        max_tokens = body.get("max_tokens")
        words = TEXT.split()
        if isinstance(max_tokens, int) and max_tokens > 0:
            words = words[:max_tokens]
        text = " ".join(words)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words),
                 "total_tokens": len(prompt.split()) + len(words)}
        created = int(t1)
        if path.endswith("/chat/completions"):
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop"}
            obj = "text_completion"
        self._send(200, {"id": f"bench-{created}-{st.served}", "object": obj, "created": created,
                         "model": body.get("model") or MODEL, "choices": [choice], "usage": usage})


def serve(n: int, service_s: float, capacity: int, host: str = "127.0.0.1", port: int = 0, *,
          reject_status: int = 0, retry_after_s: float | None = None,
          record_prompts: bool = False) -> list[BenchHTTPServer]:
    """Start ``n`` servers in this process (ports: ``port + i``, or kernel-chosen free ports if 0).

    ``reject_status`` (429/503): answer it at once above capacity instead of queueing (with ``Retry-After:
    retry_after_s`` if given); ``record_prompts``: keep every served prompt (``/stats?prompts=1``)."""
    servers = []
    for i in range(n):
        srv = BenchHTTPServer((host, port + i if port else 0), service_s, capacity, reject_status=reject_status,
                              retry_after_s=retry_after_s, record_prompts=record_prompts)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True,
                         name=f"bench-server-{i}").start()
        servers.append(srv)
    return servers


# ------------------------------------------------------------------------------------------------ client side
class BenchServers:
    """Handle on a bench-server subprocess started by :func:`launch`."""

    def __init__(self, proc: subprocess.Popen, urls: list[str], service_s: float, capacity: int) -> None:
        self.proc = proc
        self.urls = urls
        self.service_s = service_s
        self.capacity = capacity

    @property
    def ideal_requests_per_s(self) -> float:
        return len(self.urls) * self.capacity / self.service_s

    def stats(self, services: bool = False) -> list[dict[str, Any]]:
        out = []
        for u in self.urls:
            with urllib.request.urlopen(u + "/stats" + ("?services=1" if services else ""), timeout=30) as r:
                out.append(json.loads(r.read()))
        return out

    def fault(self, spec: dict[str, Any], index: int | None = None) -> None:
        """POST ``spec`` to /fault of server ``index`` (every server if None); see the module docstring."""
        for u in self.urls if index is None else [self.urls[index]]:
            req = urllib.request.Request(u + "/fault", data=json.dumps(spec).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()

    def reset(self) -> None:
        for u in self.urls:
            req = urllib.request.Request(u + "/stats/reset", data=b"{}", method="POST")
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()

    def utilisation(self, t_a: float, t_b: float) -> float:
        """Busy slot-seconds inside [t_a, t_b] over all servers / (n * capacity * (t_b - t_a))."""
        return self.window(t_a, t_b)["util"]

    def window(self, t_a: float, t_b: float) -> dict[str, Any]:
        """Utilisation over [t_a, t_b] (overall and per server), and per request label the mean number of
        requests in the servers (waiting + in service, summed over servers) and the requests completed per s."""
        busy = 0.0
        in_system: dict[str, float] = {}
        done: dict[str, int] = {}
        per_server: list[float] = []
        span = t_b - t_a
        for st in self.stats(services=True):
            mine = 0.0
            for arrive, s0, s1, label in st["services"]:
                mine += max(0.0, min(s1, t_b) - max(s0, t_a))
                in_system[label] = in_system.get(label, 0.0) + max(0.0, min(s1, t_b) - max(arrive, t_a)) / span
                if t_a < s1 <= t_b:
                    done[label] = done.get(label, 0) + 1
            busy += mine
            per_server.append(mine / (self.capacity * span))
        return {"util": busy / (len(self.urls) * self.capacity * span), "in_system": in_system,
                "per_s": {k: v / span for k, v in done.items()}, "util_per_server": per_server}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> BenchServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch(n: int, service_ms: float, capacity: int, host: str = "127.0.0.1", *, reject_status: int = 0,
           retry_after_s: float | None = None) -> BenchServers:
    """Start ``n`` bench servers in one subprocess; return when all listen (``reject_status``: see serve)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--n", str(n), "--service-ms", str(service_ms),
           "--capacity", str(capacity), "--host", host, "--exit-on-stdin-eof", "--reject-status", str(reject_status)]
    if retry_after_s is not None:
        cmd += ["--retry-after-s", str(retry_after_s)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.kill()
        raise RuntimeError(f"bench server did not start (exit code {proc.wait()})")
    info = json.loads(line)
    return BenchServers(proc, info["urls"], service_ms / 1000.0, capacity)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1, help="servers to start (independent, one port each)")
    ap.add_argument("--service-ms", type=float, default=400.0, help="service time of every request, ms")
    ap.add_argument("--capacity", type=int, default=8, help="requests in service at once per server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="port of server 0 (server i: port+i); 0 = free ports")
    ap.add_argument("--exit-on-stdin-eof", action="store_true",
                    help="stop when stdin is closed (used by launch(): the servers die with their parent)")
    ap.add_argument("--reject-status", type=int, default=0,
                    help="answer this status (429/503) at once above capacity instead of queueing; 0 = queue")
    ap.add_argument("--retry-after-s", type=float, default=None, help="Retry-After header of those answers")
    args = ap.parse_args()
    servers = serve(args.n, args.service_ms / 1000.0, args.capacity, args.host, args.port,
                    reject_status=args.reject_status, retry_after_s=args.retry_after_s)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def watch_stdin() -> None:  # the parent closed our stdin (or died): stop
        try:
            sys.stdin.read()
        except (OSError, ValueError):
            pass
        stop.set()

    if args.exit_on_stdin_eof:
        threading.Thread(target=watch_stdin, daemon=True).start()
    print(json.dumps({"urls": [s.url for s in servers], "pid": os.getpid(),
                      "service_ms": args.service_ms, "capacity": args.capacity}), flush=True)
    stop.wait()
    for s in servers:
        s.shutdown()
        s.server_close()


if __name__ == "__main__":
    main()
