"""The server pool (pipeline/servers/: plan, pool, attach) and `rag-pipeline serve`, with real llama.cpp servers.

No GPU exists here: SGLang plans are checked with the GPU detection overridden (RAG_PIPELINE_GPU_COUNT);
the managed SGLang path runs end to end with a stand-in in tests/test_sglang_managed.py.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import requests
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError, ServerError
from pipeline.servers.attach import api_key_from_env, resolve_endpoints, verify_endpoints
from pipeline.servers.base import ServerSpec
from pipeline.servers.gpus import detect_gpus
from pipeline.servers.llamacpp import default_llamacpp_model
from pipeline.servers.plan import plan_servers
from pipeline.servers.pool import ServerPool
from pipeline.servers.process import port_in_use
from tests.fixtures.llm import dead_endpoint, free_port_block, llama_config, requires_llama, server_processes

REPO = Path(__file__).resolve().parents[1]


def sglang_cfg(n_gpus: int, **servers):
    cfg = load_config()
    values = {"backend": "sglang", "gpus": n_gpus, "model": "Qwen/Qwen2.5-0.5B-Instruct", "port_slot": 0, **servers}
    return dataclasses.replace(cfg, servers=dataclasses.replace(cfg.servers, **values))


# ---------------------------------------------------------------------------------------------
# Plans (no server started)
# ---------------------------------------------------------------------------------------------


def test_plan_llamacpp_uses_packaged_gguf_and_sequential_ports(tmp_path):
    cfg = llama_config(12000, 3, n_threads=2, extra_args=("--alias", "smol"))
    specs = plan_servers(cfg, tmp_path)
    assert [s.port for s in specs] == [12000, 12001, 12002]
    assert [s.url for s in specs] == [f"http://127.0.0.1:{p}" for p in (12000, 12001, 12002)]
    gguf = default_llamacpp_model()
    assert gguf.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(gguf).is_file()
    for s in specs:
        assert s.backend == "llamacpp" and s.health_path == "/health" and s.nccl_port is None
        assert s.argv[:3] == (sys.executable, "-m", "pipeline.servers.cpu_server")
        argv = list(s.argv)
        assert argv[argv.index("--model") + 1] == gguf
        assert argv[argv.index("--n_threads") + 1] == "2"
        assert argv[argv.index("--n_parallel") + 1] == "4"
        assert argv[-2:] == ["--alias", "smol"]
        assert s.log_path == tmp_path / f"llamacpp-{s.port}.log"
    assert len({s.log_path for s in specs}) == 3


@pytest.mark.parametrize("n_gpus", [1, 2, 8])
def test_plan_sglang_one_server_per_gpu_distinct_ports(n_gpus, monkeypatch):
    # No GPU here: the detection is overridden (RAG_PIPELINE_GPU_COUNT), and --gpus N asks for N of them.
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", str(n_gpus))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    specs = plan_servers(sglang_cfg(n_gpus))
    assert len(specs) == n_gpus
    ports = [s.port for s in specs]
    nccl = [s.nccl_port for s in specs]
    assert ports == list(range(11434, 11434 + n_gpus))
    assert len(set(nccl)) == n_gpus and not set(nccl) & set(ports)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == [str(i) for i in range(n_gpus)]
    for s in specs:
        argv = list(s.argv)
        assert argv[1:3] == ["-m", "sglang.launch_server"] and s.health_path == "/health"
        assert argv[argv.index("--tp-size") + 1] == "1"
        assert argv[argv.index("--port") + 1] == str(s.port)
        assert argv[argv.index("--nccl-port") + 1] == str(s.nccl_port)
        assert s.shell_command().startswith(f"CUDA_VISIBLE_DEVICES={s.env['CUDA_VISIBLE_DEVICES']} ")


def test_plan_sglang_maps_visible_devices_and_requires_model(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", "2")
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in plan_servers(sglang_cfg(2))] == ["4", "6"]
    with pytest.raises(ConfigError, match="model: required for the sglang backend"):
        plan_servers(sglang_cfg(1, model=""))
    with pytest.raises(ConfigError, match="needs at least one GPU"):
        plan_servers(sglang_cfg(0))
    with pytest.raises(ConfigError, match="distinct from the HTTP ports"):
        plan_servers(sglang_cfg(2, base_port=29510))


def test_detect_gpus_explicit_count_and_torch_auto(monkeypatch):
    import torch

    monkeypatch.delenv("RAG_PIPELINE_GPU_COUNT", raising=False)
    assert detect_gpus(0) == 0
    assert detect_gpus(-1) == torch.cuda.device_count()  # 0 on this CPU-only machine
    with pytest.raises(ConfigError, match="3 GPUs requested but 0 visible"):
        detect_gpus(3)
    with pytest.raises(ConfigError):
        detect_gpus(-2)
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", "4")  # the documented override (tests, dry runs)
    assert detect_gpus(-1) == 4 and detect_gpus(3) == 3
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", "x")
    with pytest.raises(ConfigError, match="RAG_PIPELINE_GPU_COUNT"):
        detect_gpus(-1)
    monkeypatch.delenv("RAG_PIPELINE_GPU_COUNT")
    auto_cpu = llama_config(11434, 2, backend="auto", gpus=0)
    assert [s.backend for s in plan_servers(auto_cpu)] == ["llamacpp", "llamacpp"]


def test_serve_dry_run_prints_the_planned_commands(monkeypatch):
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", "2")  # a login node previewing a 2-GPU job
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("RAG_PIPELINE_GPU_MEMORY_MB", raising=False)
    res = CliRunner().invoke(
        main,
        ["serve", "--dry-run", "--backend", "sglang", "--gpus", "2", "--model", "m", "--base-port", "12000"],
    )
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 2
    assert "--port 12000" in lines[0] and "--nccl-port 29500" in lines[0]
    assert "--port 12001" in lines[1] and "--nccl-port 29510" in lines[1]
    bad = CliRunner().invoke(
        main, ["serve", "--dry-run", "--backend", "sglang", "--gpus", "0", "--model", "m"]
    )
    assert bad.exit_code == 2 and "needs at least one GPU" in bad.output


# ---------------------------------------------------------------------------------------------
# Real servers
# ---------------------------------------------------------------------------------------------


@requires_llama
def test_pool_serves_then_stop_leaves_no_process(llama_server_factory):
    pool = llama_server_factory(1)
    (endpoint,) = pool.endpoints
    port = pool.specs[0].port
    (pid,) = pool.pids
    assert os.getpgid(pid) == pid  # its own process group
    models = requests.get(endpoint + "/v1/models", timeout=5).json()
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"  # the plan's --alias, not the file path
    metrics = requests.get(endpoint + "/metrics", timeout=5)  # --metrics: llama.cpp's Prometheus endpoint
    assert metrics.status_code == 200 and "llamacpp:" in metrics.text, metrics.text[:300]
    assert pool.check_alive() == []
    assert pool.specs[0].log_path.stat().st_size > 0
    pool.stop()
    assert not psutil.pid_exists(pid) and server_processes(port) == []
    assert not port_in_use("127.0.0.1", port)
    pool.stop()  # idempotent


@requires_llama
def test_port_in_use_is_skipped_naming_its_process(tmp_path, caplog):
    port = free_port_block(2)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        caplog.set_level("WARNING")
        with ServerPool(llama_config(port, 1, port_slot=0), tmp_path) as pool:
            assert pool.endpoints == [f"http://127.0.0.1:{port + 1}"]
            assert requests.get(pool.endpoints[0] + "/health", timeout=5).status_code == 200
            assert pool.report()[0]["skipped_ports"] == [port]
    assert f"port {port} on 127.0.0.1 is in use by pid {os.getpid()}" in caplog.text  # found via psutil
    assert (tmp_path / f"llamacpp-{port + 1}.log").exists()


@requires_llama
def test_bad_model_path_fails_in_seconds_with_log_tail(tmp_path):
    port = free_port_block(1)
    pool = ServerPool(llama_config(port, 1, model=str(tmp_path / "missing.gguf")), tmp_path)
    t0 = time.monotonic()
    with pytest.raises(ServerError) as err:
        pool.start()
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    assert f"server on port {port} exited with code 2 during startup; last log lines" in msg
    assert "missing.gguf: no such file" in msg  # from the server's own log
    assert elapsed < 30, elapsed
    assert server_processes(port) == []


@requires_llama
def test_startup_timeout_stops_the_server(tmp_path):
    port = free_port_block(1)
    pool = ServerPool(llama_config(port, 1, startup_timeout_s=0.3), tmp_path)
    with pytest.raises(ServerError, match=rf"server on port {port} not ready after 0.3 s"):
        pool.start()
    assert server_processes(port) == [] and pool.pids == []


@requires_llama
def test_check_alive_reports_killed_server_and_restart_brings_it_back(llama_server_factory):
    pool = llama_server_factory(2)
    victim = pool.specs[1]
    os.killpg(pool.pids[1], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pool.check_alive() != [victim.port] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.check_alive() == [victim.port]
    assert pool.returncode(victim.port) == -signal.SIGKILL
    assert pool.restart(victim.port) == victim.url
    assert pool.check_alive() == []
    assert requests.get(victim.url + "/v1/models", timeout=5).status_code == 200


# A server that ignores SIGTERM and has a child in its process group: llama.cpp shuts down cleanly on
# SIGTERM, so this stand-in (a real HTTP process) is the only way to exercise the SIGKILL escalation.
STUBBORN_SERVER = textwrap.dedent(
    """
    import http.server, json, signal, subprocess, sys
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the child below
    child = subprocess.Popen(["sleep", "300"])
    print("CHILD", child.pid, flush=True)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "stub"}]}).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)


def test_stop_escalates_to_sigkill_for_the_whole_process_group(tmp_path):
    port = free_port_block(1)
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN_SERVER)
    log = tmp_path / "stubborn.log"
    spec = ServerSpec(
        0, "llamacpp", (sys.executable, str(script), str(port)), {}, "127.0.0.1", port, "/v1/models", log
    )
    pool = ServerPool(llama_config(port, 1, shutdown_timeout_s=1.0), tmp_path, specs=[spec])
    pool.start()
    (pid,) = pool.pids
    child = int(log.read_text().split("CHILD")[1].split()[0])
    assert os.getpgid(child) == pid
    t0 = time.monotonic()
    pool.stop()
    elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 8, elapsed  # waited for SIGTERM, then SIGKILL
    for p in (pid, child):
        assert not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE


@requires_llama
def test_ctrl_c_without_context_manager_is_cleaned_up_by_atexit(tmp_path):
    port = free_port_block(1)
    code = textwrap.dedent(
        f"""
        import os, signal, time
        from tests.fixtures.llm import llama_config
        from pipeline.servers.pool import ServerPool
        pool = ServerPool(llama_config({port}, 1), {str(tmp_path)!r})
        pool.start()
        print("PID", pool.pids[0], flush=True)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: KeyboardInterrupt, nothing catches it
        time.sleep(60)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, cwd=REPO)
    assert "KeyboardInterrupt" in res.stderr and res.returncode != 0
    pid = int(res.stdout.split("PID")[1].split()[0])
    assert not psutil.pid_exists(pid) and server_processes(port) == []


@requires_llama
def test_serve_command_prints_endpoints_and_stops_on_sigterm(tmp_path):
    port = free_port_block(1)
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "serve",
        "--backend",
        "llamacpp",
        "--cpu-servers",
        "1",
        "--base-port",
        str(port),
        "--log-dir",
        str(tmp_path),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline().strip()
        assert line == f"http://127.0.0.1:{port}", proc.stderr.read() if not line else line
        assert requests.get(line + "/v1/models", timeout=5).status_code == 200
        (server,) = server_processes(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not psutil.pid_exists(server.pid) and server_processes(port) == []
        assert (tmp_path / f"llamacpp-{port}.log").exists()
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------------------------------
# Attach mode
# ---------------------------------------------------------------------------------------------


@requires_llama
def test_verify_endpoints_lists_models_and_names_the_bad_endpoint(llama_endpoints):
    models = verify_endpoints(llama_endpoints, None, timeout_s=5)
    assert list(models) == llama_endpoints
    assert all(ids == ["SmolLM2-135M-Instruct.Q4_1"] for ids in models.values())
    dead = dead_endpoint()
    with pytest.raises(ServerError, match=rf"endpoint {dead}: cannot reach {dead}/v1/models"):
        verify_endpoints([llama_endpoints[0], dead], None, timeout_s=2)


def test_resolve_endpoints_normalises_attach_urls_and_rejects_bad_ones():
    cfg = load_config(overrides={"servers.endpoints": "http://a:1/v1/, https://b.example/"})
    assert resolve_endpoints(cfg) == ["http://a:1", "https://b.example"]
    assert resolve_endpoints(llama_config(12000, 2)) == ["http://127.0.0.1:12000", "http://127.0.0.1:12001"]
    with pytest.raises(ConfigError, match="'ftp://x' is not an http"):
        resolve_endpoints(load_config(overrides={"servers.endpoints": "ftp://x"}))


@requires_llama
def test_api_key_from_env_is_used_and_never_shown(llama_server_factory, monkeypatch, caplog):
    from pipeline.llm.client import LLMClient

    key = "s3cret-key-123"
    pool = llama_server_factory(1, extra_args=("--api_key", key))  # ready although /v1/models answers 401
    monkeypatch.setenv("RAG_TEST_KEY", key)
    assert api_key_from_env("RAG_TEST_KEY") == key and api_key_from_env("") is None
    monkeypatch.delenv("RAG_TEST_KEY")
    with pytest.raises(ConfigError, match="RAG_TEST_KEY is not set") as missing:
        api_key_from_env("RAG_TEST_KEY")
    with pytest.raises(
        ServerError, match="HTTP 401 from /v1/models: API key missing or rejected"
    ) as rejected:
        verify_endpoints(pool.endpoints, "wrong-key", timeout_s=5)
    caplog.set_level("DEBUG")
    assert verify_endpoints(pool.endpoints, key, timeout_s=5)
    with LLMClient(pool.endpoints, load_config().llm, api_key=key) as client:
        assert client.chat("Say hi.", 4).text
        assert key not in repr(client)
    for text in (str(missing.value), str(rejected.value), caplog.text):
        assert key not in text
