"""The managed SGLang path end to end, with a stand-in for SGLang (tests/sglang_standin.py).

A TEST DOUBLE is used for the SGLang server itself because no GPU (and so no SGLang) can exist on the
machines that run the tests. Everything else is real: the pool's GPU selection (detection overridden with
RAG_PIPELINE_GPU_COUNT, as documented, since torch.cuda.device_count() is 0 here), free-port search, process
groups, readiness via /health, retries, restarts, stop; the SGLang command line is checked with SGLang's own
argument parser (sglang 0.5.23 installed --no-deps by scripts/setup.sh into .venv/sglang-parser).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.servers.gpus import embedding_reserve_mb, mem_fraction_static, sglang_reserve_mb
from pipeline.servers.plan import job_port_slot, plan_servers
from pipeline.servers.pool import ServerPool
from tests.fixtures.llm import free_port_block, server_processes

REPO = Path(__file__).resolve().parents[1]
STANDIN = (sys.executable, str(REPO / "tests" / "sglang_standin.py"))
SGLANG_PARSER = Path(sys.prefix) / "sglang-parser"
H100_MB = 81559


@pytest.fixture
def gpus(monkeypatch, tmp_path):
    """``set(visible)``: pretend this process sees the GPUs ``visible`` ("4,6" or None for 0..N-1)."""
    monkeypatch.setenv("SGLANG_STANDIN_DIR", str(tmp_path / "standin"))
    monkeypatch.setenv("RAG_PIPELINE_GPU_MEMORY_MB", str(H100_MB))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)

    def set_visible(n: int, visible: str | None = None, plan: dict | None = None) -> None:
        monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", str(n))
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        monkeypatch.setenv("SGLANG_STANDIN_PLAN", json.dumps(plan or {}))

    return set_visible


def standin_cfg(n_servers: int = 1, **servers):
    cfg = load_config()
    values = {
        "backend": "sglang",
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "sglang_command": STANDIN,
        "base_port": free_port_block(n_servers),
        "nccl_base_port": free_port_block(10 * n_servers),
        "port_slot": 0,
        "startup_timeout_s": 30.0,
        "shutdown_timeout_s": 5.0,
        **servers,
    }
    return dataclasses.replace(cfg, servers=dataclasses.replace(cfg.servers, **values))


def starts(tmp_path: Path) -> list[dict]:
    """What each stand-in start recorded (argv, parsed flags, CUDA_VISIBLE_DEVICES, hub env), in start order."""
    recs = [json.loads(p.read_text()) for p in (tmp_path / "standin").glob("start-*.json")]
    return sorted(recs, key=lambda r: (r["CUDA_VISIBLE_DEVICES"], r["start"]))


def arg(argv, flag: str) -> str:
    argv = list(argv)
    return argv[argv.index(flag) + 1]


VISIBLE = {  # N GPUs: visible ids 0..N-1 (None) and a non-contiguous set
    1: [None, "5"],
    2: [None, "4,6"],
    8: [None, "0,2,4,6,8,10,12,14"],
}


@pytest.mark.parametrize("n,visible", [(n, v) for n, vs in VISIBLE.items() for v in vs])
def test_one_server_per_gpu_on_its_own_gpu_ports_and_nothing_left(n, visible, gpus, tmp_path):
    gpus(n, visible)
    physical = visible.split(",") if visible else [str(i) for i in range(n)]
    pool = ServerPool(standin_cfg(n, gpus=-1), tmp_path / "logs")
    try:
        assert pool.start() == pool.endpoints and len(pool.endpoints) == n
        for spec in pool.specs:
            assert requests.get(spec.url + "/health", timeout=5).status_code == 200
            chat = requests.post(spec.url + "/v1/chat/completions", timeout=5,
                                 json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
        recs = starts(tmp_path)
        assert sorted(r["CUDA_VISIBLE_DEVICES"] for r in recs) == sorted(physical)
        by_gpu = {r["CUDA_VISIBLE_DEVICES"]: r for r in recs}
        for i, spec in enumerate(pool.specs):
            assert spec.gpus == (physical[i],) and spec.visible_gpu == i
            rec = by_gpu[physical[i]]
            assert rec["args"]["port"] == spec.port and rec["args"]["nccl_port"] == spec.nccl_port
            assert rec["args"]["tp_size"] == 1
            assert rec["args"]["mem_fraction_static"] == mem_fraction_static(pool.cfg)
        ports = [s.port for s in pool.specs] + [s.nccl_port for s in pool.specs]
        assert len(set(ports)) == 2 * n
        pids = pool.pids
        assert len(pids) == n and all(os.getpgid(p) == p for p in pids)
    finally:
        pool.stop()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert all(server_processes(s.port) == [] for s in pool.specs)


def test_gpus_beyond_the_visible_ones_is_a_clear_error(gpus):
    gpus(2, "4,5")
    with pytest.raises(ConfigError, match=r"8 GPUs requested but 2 visible \(CUDA_VISIBLE_DEVICES=4,5\)"):
        plan_servers(standin_cfg(gpus=8))
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in plan_servers(standin_cfg(gpus=1))] == ["4"]
    res = CliRunner().invoke(main, ["serve", "--dry-run", "--backend", "sglang", "--gpus", "8", "--model", "m"])
    assert res.exit_code == 2 and "8 GPUs requested but 2 visible" in res.output
    assert "Traceback" not in res.output


def test_tp_size_groups_gpus_per_server(gpus):
    gpus(8, "0,2,4,6,8,10,12,14")
    specs = plan_servers(standin_cfg(tp_size=2))
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0,2", "4,6", "8,10", "12,14"]
    assert [s.visible_gpu for s in specs] == [0, 2, 4, 6]  # the RAG worker of server i: cuda:2i
    assert all(arg(s.argv, "--tp-size") == "2" for s in specs)
    with pytest.raises(ConfigError, match="cannot be split into servers of tp_size=3"):
        plan_servers(standin_cfg(tp_size=3))


def test_tp_server_starts_with_its_gpu_group(gpus, tmp_path):
    gpus(4, "4,5,6,7")
    with ServerPool(standin_cfg(2, tp_size=2), tmp_path / "logs") as pool:
        assert len(pool.ready_endpoints) == 2
    assert sorted(r["CUDA_VISIBLE_DEVICES"] for r in starts(tmp_path)) == ["4,5", "6,7"]


def test_mem_fraction_leaves_room_for_the_embedding_model(gpus, monkeypatch):
    gpus(1)
    cfg = standin_cfg()
    frac = mem_fraction_static(cfg)
    reserve = sglang_reserve_mb(H100_MB, 1) + embedding_reserve_mb(cfg.embedding.batch_size)
    assert frac == int((H100_MB - reserve) / H100_MB * 1000) / 1000
    # measured: the packaged model's weights (~87 MiB) + CUDA context + one batch's activations
    assert 500 + 80 < embedding_reserve_mb(64) < 500 + 87 + 400
    assert 0.8 < frac < (H100_MB - 10 * 1024) / H100_MB  # below SGLang's own default for this GPU
    assert arg(plan_servers(cfg)[0].argv, "--mem-fraction-static") == str(frac)
    override = standin_cfg(mem_fraction_static=0.7)
    assert arg(plan_servers(override)[0].argv, "--mem-fraction-static") == "0.7"
    with pytest.raises(ConfigError, match="mem_fraction_static"):
        plan_servers(standin_cfg(mem_fraction_static=1.5))
    monkeypatch.setenv("RAG_PIPELINE_GPU_MEMORY_MB", "2048")
    with pytest.raises(ConfigError, match="a GPU of 2048 MiB"):
        plan_servers(cfg)
    monkeypatch.delenv("RAG_PIPELINE_GPU_MEMORY_MB")  # unknown memory (no torch GPU): SGLang's default
    assert "--mem-fraction-static" not in plan_servers(cfg)[0].argv


def test_taken_ports_are_skipped_not_fatal(gpus, tmp_path):
    gpus(2, "4,5")
    cfg = standin_cfg(2)
    nominal = plan_servers(cfg)
    with socket.socket() as http_holder, socket.socket() as nccl_holder:
        http_holder.bind(("127.0.0.1", nominal[0].port))
        http_holder.listen()
        nccl_holder.bind(("127.0.0.1", nominal[1].nccl_port))
        nccl_holder.listen()
        with ServerPool(cfg, tmp_path / "logs") as pool:
            ports = [s.port for s in pool.specs]
            assert nominal[0].port not in ports and len(pool.ready_endpoints) == 2
            assert pool.specs[1].nccl_port != nominal[1].nccl_port
            report = pool.report()
            assert nominal[0].port in report[0]["skipped_ports"]
            assert nominal[1].nccl_port in report[1]["skipped_ports"]
            assert all(r["status"] == "ready" for r in report)
            for spec in pool.specs:
                assert requests.get(spec.url + "/health", timeout=5).status_code == 200
                assert arg(spec.argv, "--port") == str(spec.port) and spec.log_path.name == f"sglang-{spec.port}.log"


def test_slurm_jobs_search_ports_from_their_own_slot(gpus, monkeypatch):
    gpus(2, "4,5")
    monkeypatch.setenv("SLURM_JOB_ID", "1234567")
    cfg = standin_cfg(port_slot=-1, base_port=11434, nccl_base_port=29500)
    assert job_port_slot(cfg) == 67
    specs = plan_servers(cfg)
    assert [s.port for s in specs] == [11434 + 670, 11434 + 671]
    assert [s.nccl_port for s in specs] == [29500 + 6700, 29500 + 6710]
    monkeypatch.setenv("SLURM_JOB_ID", "1234568")  # the next array task on the same node
    other = plan_servers(cfg)
    assert not {s.port for s in specs} & {s.port for s in other}
    assert not {s.nccl_port for s in specs} & {s.nccl_port for s in other}
    monkeypatch.delenv("SLURM_JOB_ID")
    assert job_port_slot(cfg) == 0


def test_late_server_joins_failed_server_is_given_up_the_rest_go_on(gpus, tmp_path):
    gpus(3, "4,5,7", plan={"5": {"delay_s": 2.5}, "7": {"exit_code": 3}})
    pool = ServerPool(standin_cfg(3), tmp_path / "logs")
    try:
        pool.launch()
        t0 = time.monotonic()
        first = pool.wait_ready(first_only=True)
        assert first == [pool.specs[0].url] and time.monotonic() - t0 < 2.5
        joined = []
        deadline = time.monotonic() + 30
        while pool.starting() and time.monotonic() < deadline:
            joined += pool.poll_startup()
            time.sleep(0.1)
        assert [s.index for s in joined] == [1]
        report = {r["index"]: r for r in pool.report()}
        assert report[0]["status"] == report[1]["status"] == "ready"
        assert report[1]["ready_after_s"] >= 2.5 > report[0]["ready_after_s"]
        assert report[2]["status"] == "failed" and report[2]["attempts"] == 2  # retried once (startup_attempts)
        assert "exited with code 3 during startup" in report[2]["error"]
        assert report[2]["gpus"] == ["7"] and not report[2]["running"]
        assert pool.ready_endpoints == [pool.specs[0].url, pool.specs[1].url]
        assert pool.check_alive() == []  # a server given up at startup is not a crash to restart
    finally:
        pool.stop()


def test_a_failed_start_is_retried_and_a_slow_one_times_out(gpus, tmp_path):
    gpus(2, "2,3", plan={"2": {"fail_starts": 1}, "3": {"delay_s": 60}})
    pool = ServerPool(standin_cfg(2, startup_timeout_s=2.0), tmp_path / "logs")
    try:
        assert pool.start() == [pool.specs[0].url]
        report = pool.report()
        assert report[0]["status"] == "ready" and report[0]["attempts"] == 2
        assert report[1]["status"] == "failed" and "not ready after 2 s" in report[1]["error"]
        assert [r["start"] for r in starts(tmp_path) if r["CUDA_VISIBLE_DEVICES"] == "3"] == [1, 2]
        assert server_processes(pool.specs[1].port) == []  # the slow one was stopped
    finally:
        pool.stop()


def test_no_server_starts_is_an_error_naming_each(gpus, tmp_path):
    gpus(2, plan={"0": {"exit_code": 1}, "1": {"exit_code": 2}})
    pool = ServerPool(standin_cfg(2, startup_attempts=1), tmp_path / "logs")
    with pytest.raises(Exception, match=r"no server could be started: .*exited with code 1.*exited with code 2"):
        pool.start()
    assert pool.pids == []


def test_restart_after_a_crash_on_the_same_gpu_and_ports(gpus, tmp_path):
    gpus(2, "4,5")
    with ServerPool(standin_cfg(2), tmp_path / "logs") as pool:
        victim = pool.specs[1]
        os.killpg(pool.pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pool.check_alive() != [victim.port] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.check_alive() == [victim.port]
        assert pool.restart(victim.port) == victim.url
        assert pool.check_alive() == []
        assert requests.get(victim.url + "/health", timeout=5).status_code == 200
        restarted = [r for r in starts(tmp_path) if r["CUDA_VISIBLE_DEVICES"] == "5"]
        assert [r["start"] for r in restarted] == [1, 2]
        assert restarted[1]["args"]["nccl_port"] == victim.nccl_port


def test_hub_offline_and_cache_environment_reach_the_servers(gpus, tmp_path, monkeypatch):
    gpus(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = plan_servers(standin_cfg())[0]
    assert spec.env["HF_HUB_OFFLINE"] == "1" and spec.env["HF_HOME"] == str(tmp_path / "hf")
    assert f"HF_HOME={tmp_path / 'hf'}" in spec.shell_command()
    with ServerPool(standin_cfg(), tmp_path / "logs"):
        (rec,) = starts(tmp_path)
    assert rec["env"] == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}


# ---------------------------------------------------------------------------------------------
# SGLang's own argument parser (sglang 0.5.23, no GPU parts)
# ---------------------------------------------------------------------------------------------

PARSE_WITH_SGLANG = r"""
import argparse, json, sys
from sglang.srt.server_args import ServerArgs
parser = argparse.ArgumentParser()
ServerArgs.add_cli_args(parser)
out = {"version": __import__("sglang").__version__, "parsed": [], "options": {}}
for argv in json.loads(sys.argv[1]):
    ns = parser.parse_args(argv)
    sa = ServerArgs.from_cli_args(ns)
    out["parsed"].append({k: getattr(sa, k) for k in
                          ("model_path", "host", "port", "tp_size", "nccl_port", "mem_fraction_static",
                           "enable_deterministic_inference")})
for action in parser._actions:
    for opt in action.option_strings:
        out["options"][opt] = {"dest": action.dest, "type": getattr(action.type, "__name__", None)}
print(json.dumps(out))
"""


def test_sglang_parser_accepts_the_commands_and_the_standin_mirrors_it(gpus):
    assert (SGLANG_PARSER / "sglang").is_dir(), f"{SGLANG_PARSER} missing: run scripts/setup.sh"
    gpus(8, "0,1,2,3,4,5,6,7")
    cfg = standin_cfg(4, tp_size=2, extra_args=("--base-gpu-id", "0"))
    deterministic = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, deterministic=True))
    specs = plan_servers(cfg) + plan_servers(deterministic)[:1]  # --deterministic adds SGLang's own flag
    argvs = [list(s.argv[len(STANDIN):]) for s in specs]
    env = {**os.environ, "PYTHONPATH": str(SGLANG_PARSER)}
    res = subprocess.run([sys.executable, "-c", PARSE_WITH_SGLANG, json.dumps(argvs)], capture_output=True,
                         text=True, timeout=300, env=env, cwd="/")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["version"] == "0.5.23"
    for i, (spec, parsed) in enumerate(zip(specs, out["parsed"], strict=True)):
        assert parsed == {"model_path": "Qwen/Qwen2.5-0.5B-Instruct", "host": "127.0.0.1", "port": spec.port,
                          "tp_size": 2, "nccl_port": spec.nccl_port,
                          "mem_fraction_static": float(arg(spec.argv, "--mem-fraction-static")),
                          "enable_deterministic_inference": i == 4}
    # the stand-in declares SGLang's option strings with SGLang's dests and types, and nothing else
    from tests.sglang_standin import build_parser

    for action in build_parser()._actions:
        for opt in action.option_strings:
            if opt in ("-h", "--help"):
                continue
            assert opt in out["options"], opt
            assert out["options"][opt] == {"dest": action.dest, "type": getattr(action.type, "__name__", None)}


# ---------------------------------------------------------------------------------------------
# `rag-pipeline run` on stand-in "GPUs" under a Slurm-like environment
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_under_slurm_late_server_joins_failed_one_is_reported(tmp_path, example_store, monkeypatch):
    from tests.runtools import (
        read_rows,
        run_args,
        start_run,
        store_args,
        wait_no_survivors,
        write_config,
        write_records,
    )

    # 3 "GPUs" 4,5,7 of an 8-GPU node: 5 loads slowly and joins later, 7 never starts (retried once).
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,7")
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", "3")
    monkeypatch.setenv("RAG_PIPELINE_GPU_MEMORY_MB", str(H100_MB))
    monkeypatch.setenv("SGLANG_STANDIN_DIR", str(tmp_path / "standin"))
    monkeypatch.setenv("SGLANG_STANDIN_PLAN", json.dumps({"5": {"delay_s": 3}, "7": {"exit_code": 1}}))
    records = write_records(tmp_path, 12)
    out = tmp_path / "out"
    cfg = write_config(tmp_path, {
        "servers": {"backend": "sglang", "model": "Qwen/Qwen2.5-0.5B-Instruct", "sglang_command": list(STANDIN),
                    "base_port": free_port_block(3), "nccl_base_port": free_port_block(30),
                    "startup_timeout_s": 60.0},
        "embedding": {"device": "cpu"},  # torch here is CPU-only: the worker's GPU is checked in the manifest
    })
    proc, marker = start_run(run_args(records, out, cfg, *store_args(example_store)))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert wait_no_survivors(marker) == []  # servers (the failed one's retries too), workers: all gone
    servers = json.loads((out / ".rag-pipeline/manifest.json").read_text())["servers"]
    assert [s["gpus"] for s in servers] == [["4"], ["5"], ["7"]]
    assert [s["status"] for s in servers] == ["ready", "ready", "failed"]
    assert [s["rag_worker"] for s in servers] == ["rag-0", "rag-1", None]
    assert [s["rag_cuda_device"] for s in servers] == ["cuda:0", "cuda:1", None]  # physical 4 and 5
    assert [s["embedding_device"] for s in servers][:2] == ["cpu", "cpu"]
    assert servers[1]["ready_after_s"] >= 3 and servers[2]["attempts"] == 2
    assert "exited with code 1 during startup" in servers[2]["error"]
    assert all(not s["running"] for s in servers)
    # nominal ports from the job's slot (4242 % 100 = 42), all distinct
    ports = [s["port"] for s in servers] + [s["nccl_port"] for s in servers]
    assert len(set(ports)) == 6
    rows = read_rows(out)
    assert len(rows) == 12 and all(r["gen_status"] == "ok" and r["rag_status"] == "ok" for r in rows)
    assert {r["endpoint"] for r in rows} <= {servers[0]["url"], servers[1]["url"]}
