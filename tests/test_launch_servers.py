"""launch_servers.sh: shellcheck, --dry-run (same commands as pipeline.servers.plan), real llama.cpp servers.

No GPU exists here: for SGLang only --dry-run is tested, with the GPU detection overridden by
RAG_PIPELINE_GPU_COUNT (1, 2, 8) as documented; the Python pool runs SGLang's path with a stand-in
(tests/test_sglang_managed.py).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from pipeline.config import load_config
from pipeline.servers.llamacpp import default_llamacpp_model
from pipeline.servers.plan import plan_servers
from tests.fixtures.llm import free_port_block, requires_llama, server_processes

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch_servers.sh"
# Flags checked against SGLang's ServerArgs (sgl-project/sglang python/sglang/srt/server_args.py).
SGLANG_FLAGS = {"--model-path", "--host", "--port", "--tp-size", "--nccl-port", "--enable-metrics"}


def run_script(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed (scripts/setup.sh installs it with apt)"
    res = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("n_gpus", [1, 2, 8])
def test_dry_run_sglang_distinct_ports_and_nccl_ports(n_gpus, monkeypatch):
    # No GPU here: the documented override stands for torch.cuda.device_count().
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "RAG_PIPELINE_GPU_MEMORY_MB", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", str(n_gpus))
    env = dict(os.environ)
    res = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "--backend",
            "sglang",
            "--model",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "--num",
            str(n_gpus),
            "--base-port",
            "12000",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "PYTHON": sys.executable},
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == n_gpus
    ports, nccl, gpus = [], [], []
    for line in lines:
        argv = shlex.split(line)
        assert argv[0].startswith("CUDA_VISIBLE_DEVICES=")
        gpus.append(argv[0].split("=", 1)[1])
        assert argv[1:4] == [sys.executable, "-m", "sglang.launch_server"]
        flags = {a for a in argv[4:] if a.startswith("--")}
        assert flags == SGLANG_FLAGS
        assert argv[argv.index("--tp-size") + 1] == "1"
        ports.append(int(argv[argv.index("--port") + 1]))
        nccl.append(int(argv[argv.index("--nccl-port") + 1]))
    assert ports == list(range(12000, 12000 + n_gpus))
    assert len(set(nccl)) == n_gpus and not set(nccl) & set(ports)
    assert gpus == [str(i) for i in range(n_gpus)]
    # The Python pool (rag-pipeline serve/run) plans exactly the same commands.
    cfg = load_config()
    cfg = dataclasses.replace(
        cfg,
        servers=dataclasses.replace(
            cfg.servers, backend="sglang", gpus=n_gpus, model="Qwen/Qwen2.5-0.5B-Instruct", base_port=12000
        ),
    )
    assert [shlex.split(s.shell_command()) for s in plan_servers(cfg)] == [shlex.split(x) for x in lines]


def test_dry_run_llamacpp_defaults_and_extra_args_match_python_plan():
    res = run_script(
        "--backend", "llamacpp", "--num", "2", "--base-port", "12100", "--dry-run", "--", "--seed", "7"
    )
    assert res.returncode == 0, res.stderr
    lines = [shlex.split(x) for x in res.stdout.strip().splitlines()]
    assert lines[0][lines[0].index("--model") + 1] == default_llamacpp_model()
    cfg = load_config()
    cfg = dataclasses.replace(
        cfg,
        servers=dataclasses.replace(
            cfg.servers, backend="llamacpp", cpu_servers=2, base_port=12100, extra_args=("--seed", "7")
        ),
    )
    assert [list(s.argv) for s in plan_servers(cfg)] == lines


def test_bad_arguments_exit_2_with_one_line():
    for args, msg in [
        ((), "--backend sglang|llamacpp is required"),
        (("--backend", "vllm"), "--backend must be sglang or llamacpp"),
        (("--backend", "sglang", "--num", "1"), "--model is required for --backend sglang"),
        (("--backend", "llamacpp", "--num", "zero"), "--num must be an integer >= 1"),
        (("--backend", "llamacpp", "--bogus"), "unknown argument '--bogus'"),
    ]:
        res = run_script(*args, "--dry-run")
        assert res.returncode == 2 and msg in res.stderr, (args, res.stderr)


@requires_llama
def test_launch_two_llamacpp_servers_then_ctrl_c_leaves_no_process(tmp_path):
    base = free_port_block(2)
    proc = subprocess.Popen(
        [
            "bash",
            str(SCRIPT),
            "--backend",
            "llamacpp",
            "--num",
            "2",
            "--base-port",
            str(base),
            "--log-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    try:
        line = proc.stdout.readline().strip()
        assert line == f"http://127.0.0.1:{base},http://127.0.0.1:{base + 1}", proc.stderr.read()
        for ep in line.split(","):
            assert requests.get(ep + "/v1/models", timeout=5).status_code == 200
        pids = [int(x.split()[0]) for x in (tmp_path / "servers.pid").read_text().splitlines()]
        servers = [p for port in (base, base + 1) for p in server_processes(port)]
        assert sorted(p.pid for p in servers) == sorted(pids) and len(pids) == 2
        assert all(os.getpgid(pid) == pid for pid in pids)  # one process group each
        assert {p.ppid() for p in servers} == {proc.pid}
        assert (tmp_path / f"llamacpp-{base}.log").exists() and (
            tmp_path / f"llamacpp-{base + 1}.log"
        ).exists()
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [p for p in pids if psutil.pid_exists(p)] == []
    assert server_processes(base) == [] and server_processes(base + 1) == []
    assert not (tmp_path / "servers.pid").exists()


def test_gpus_beyond_visible_and_bad_tp_size_are_errors():
    env = {"RAG_PIPELINE_GPU_COUNT": "2", "CUDA_VISIBLE_DEVICES": "4,5"}
    res = run_script("--backend", "sglang", "--model", "m", "--num", "8", "--dry-run", **env)
    assert res.returncode == 2 and "needs 8 GPUs but 2 visible (CUDA_VISIBLE_DEVICES=4,5)" in res.stderr
    res = run_script("--backend", "sglang", "--model", "m", "--tp-size", "2", "--dry-run", **env)
    assert res.returncode == 0, res.stderr
    (line,) = res.stdout.strip().splitlines()
    argv = shlex.split(line)
    assert argv[0] == "CUDA_VISIBLE_DEVICES=4,5" and argv[argv.index("--tp-size") + 1] == "2"


@requires_llama
def test_port_in_use_is_skipped_naming_its_process(tmp_path):
    port = free_port_block(2)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        proc = subprocess.Popen(
            ["bash", str(SCRIPT), "--backend", "llamacpp", "--base-port", str(port), "--log-dir", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHON": sys.executable, "PORT_SLOT": "0"},
        )
        try:
            line = proc.stdout.readline().strip()
            assert line == f"http://127.0.0.1:{port + 1}"
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = proc.stderr.read()
    assert f"port {port} on 127.0.0.1 is in use" in err and "skipped" in err
    if shutil.which("ss"):
        assert f"pid={os.getpid()}" in err  # the holder, found with ss
    assert server_processes(port + 1) == []


@requires_llama
def test_bad_model_path_reports_log_tail_in_seconds(tmp_path):
    port = free_port_block(1)
    t0 = time.monotonic()
    res = run_script(
        "--backend",
        "llamacpp",
        "--model",
        str(tmp_path / "missing.gguf"),
        "--base-port",
        str(port),
        "--log-dir",
        str(tmp_path),
        timeout=60,
    )
    assert time.monotonic() - t0 < 30
    assert res.returncode == 1
    assert f"server on port {port} exited with code 2 during startup; last log lines" in res.stderr
    assert "missing.gguf: no such file" in res.stderr
    assert res.stdout == "" and server_processes(port) == []
