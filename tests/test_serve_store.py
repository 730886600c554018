"""`rag-pipeline serve-store`: a real Chroma server in the foreground, readiness, signal forwarding."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMA = Path(sys.executable).parent / "chroma"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve_store(path: Path, port: int, timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start `rag-pipeline serve-store` and return (process, url) once it prints its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve-store", "--path", str(path), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("Chroma server ready: "):
            return proc, line.split()[3]
    proc.kill()
    raise AssertionError(f"serve-store did not become ready (exit {proc.poll()})")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(not CHROMA.exists(), reason="chroma console script not installed")
def test_serve_store_runs_chroma_until_signalled(tmp_path: Path) -> None:
    port = free_port()
    proc, url = start_serve_store(tmp_path / "db", port)
    try:
        assert url == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{url}/api/v2/heartbeat", timeout=5) as resp:
            assert resp.status == 200 and "nanosecond heartbeat" in json.loads(resp.read())
        (chroma_pid,) = _children(proc.pid)

        # a second server on the same port is refused with one clear line
        busy = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "serve-store", "--path", str(tmp_path / "db2"), "--port", str(port)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert busy.returncode == 4
        assert busy.stderr.startswith(f"Error: store port {port} on 127.0.0.1 is already in use by pid ")
        assert "chroma" in busy.stderr and "choose another --port" in busy.stderr and "Traceback" not in busy.stderr

        # SIGTERM to serve-store only (its own session): chroma is stopped, both exit, the port is free
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while _alive(chroma_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(chroma_pid)
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))  # nothing listens any more
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.skipif(not CHROMA.exists(), reason="chroma console script not installed")
def test_kill_9_of_serve_store_does_not_leave_chroma_running(tmp_path: Path) -> None:
    port = free_port()
    proc, _ = start_serve_store(tmp_path / "db", port)
    try:
        (chroma_pid,) = _children(proc.pid)
        proc.kill()  # SIGKILL: no handler runs; PR_SET_PDEATHSIG must take chroma down with it
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(chroma_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(chroma_pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.stdout:
            proc.stdout.close()
