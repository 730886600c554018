"""Launch plans of the server backends, GPU sizing arithmetic, attach-mode URLs, and the pure process helpers.

Nothing here starts a process, loads a model or opens a connection: plans are built from configs, the GPU
detection is overridden through its documented environment variables (``RAG_PIPELINE_GPU_COUNT``,
``RAG_PIPELINE_GPU_MEMORY_MB``), the embedding model's size is replaced by a fixed number, and the HTTP probe of
the readiness wait by a stub.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, ServerError, StoreError
from pipeline.servers import gpus, llamacpp, process, sglang
from pipeline.servers.attach import api_key_from_env, normalize_endpoint, resolve_endpoints
from pipeline.servers.base import PlanContext, ServerSpec
from pipeline.servers.plan import backend_for, http_ports, job_port_slot, plan_servers

LOGS = Path("/logs")
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "RAG_PIPELINE_GPU_COUNT", "RAG_PIPELINE_GPU_MEMORY_MB", "SLURM_JOB_ID",
            *sglang.OFFLINE_ENV)


@pytest.fixture(autouse=True)
def no_gpu_here(monkeypatch):
    """A machine without GPU device nodes and without the variables the plans read."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(gpus, "_gpu_device_files", lambda: False)


def cfg_with(**servers) -> Config:
    """The default config with ``servers`` fields replaced (no validation: also for out-of-range values)."""
    cfg = load_config()
    return dataclasses.replace(cfg, servers=dataclasses.replace(cfg.servers, **servers))


def sglang_ctx(ports=(12000, 12001), slot=0, **servers) -> PlanContext:
    servers = {"backend": "sglang", "model": "org/model", **servers}
    return PlanContext(cfg=cfg_with(**servers), ports=tuple(ports), slot=slot, log_dir=LOGS)


def flag(spec: ServerSpec, name: str) -> str:
    argv = list(spec.argv)
    return argv[argv.index(name) + 1]


# ---------------------------------------------------------------------------------------------
# SGLang plans
# ---------------------------------------------------------------------------------------------


def test_sglang_plan_uses_the_given_ports_and_one_log_per_port():
    specs = sglang.BACKEND.plan(sglang_ctx(ports=(12000, 12001, 12002)))
    assert [s.port for s in specs] == [12000, 12001, 12002]
    assert [flag(s, "--port") for s in specs] == ["12000", "12001", "12002"]
    assert [s.index for s in specs] == [0, 1, 2]
    assert [s.log_path for s in specs] == [LOGS / f"sglang-{p}.log" for p in (12000, 12001, 12002)]
    assert all(s.backend == "sglang" and s.health_path == "/health" for s in specs)


def test_sglang_command_is_this_python_with_the_checked_flags_in_order():
    (spec,) = sglang.BACKEND.plan(sglang_ctx(ports=(12000,)))
    assert spec.argv == (sys.executable, "-m", "sglang.launch_server", "--model-path", "org/model",
                         "--host", "127.0.0.1", "--port", "12000", "--tp-size", "1", "--nccl-port", "29500",
                         "--enable-metrics")


def test_nccl_ports_are_ten_apart_and_shifted_by_the_slot():
    assert sglang.nccl_ports(29500, 0, 3) == [29500, 29510, 29520]
    assert sglang.nccl_ports(29500, 7, 2) == [30200, 30210]


def test_sglang_plan_nccl_ports_follow_the_slot_and_match_argv():
    specs = sglang.BACKEND.plan(sglang_ctx(ports=(12030, 12031), slot=3, nccl_base_port=29500))
    assert [s.nccl_port for s in specs] == [29800, 29810]
    assert [flag(s, "--nccl-port") for s in specs] == ["29800", "29810"]


@pytest.mark.parametrize(("tp", "n", "expected"), [
    (1, 4, ["0", "1", "2", "3"]),
    (2, 2, ["0,1", "2,3"]),
    (4, 2, ["0,1,2,3", "4,5,6,7"]),
])
def test_sglang_plan_gives_each_server_tp_consecutive_gpus(tp, n, expected):
    specs = sglang.BACKEND.plan(sglang_ctx(ports=tuple(range(12000, 12000 + n)), tp_size=tp))
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == expected
    assert [",".join(s.gpus) for s in specs] == expected
    assert [s.visible_gpu for s in specs] == [i * tp for i in range(n)]
    assert {flag(s, "--tp-size") for s in specs} == {str(tp)}


def test_sglang_plan_maps_visible_gpus_to_physical_ids(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    specs = sglang.BACKEND.plan(sglang_ctx(tp_size=2))
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["4,5", "6,7"]
    assert [s.visible_gpu for s in specs] == [0, 2]  # cuda:N of the RAG worker: relative to what we see


def test_sglang_plan_passes_gpu_uuids_through(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa, MIG-bbb")
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in sglang.BACKEND.plan(sglang_ctx())] == ["GPU-aaa", "MIG-bbb"]


def test_sglang_plan_refuses_more_gpus_than_cuda_visible_devices_lists(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ConfigError, match="lists 2 GPU\\(s\\), 4 needed"):
        sglang.BACKEND.plan(sglang_ctx(tp_size=2))


def test_sglang_plan_passes_a_configured_mem_fraction():
    specs = sglang.BACKEND.plan(sglang_ctx(mem_fraction_static=0.7))
    assert [flag(s, "--mem-fraction-static") for s in specs] == ["0.7", "0.7"]


def test_sglang_plan_leaves_the_mem_fraction_out_when_the_gpu_memory_is_unknown():
    (spec,) = sglang.BACKEND.plan(sglang_ctx(ports=(12000,)))
    assert "--mem-fraction-static" not in spec.argv


def test_sglang_plan_computes_the_mem_fraction_from_the_gpu_memory(monkeypatch):
    monkeypatch.setenv("RAG_PIPELINE_GPU_MEMORY_MB", "81559")
    monkeypatch.setattr(gpus, "embedding_reserve_mb", lambda batch_size: 1000.0)
    (spec,) = sglang.BACKEND.plan(sglang_ctx(ports=(12000,)))
    # 80 GiB GPU: SGLang keeps 10 GiB, the embedding model 1000 MiB -> (81559 - 10240 - 1000) / 81559
    assert flag(spec, "--mem-fraction-static") == "0.862"


def test_sglang_plan_rejects_a_mem_fraction_outside_0_1():
    with pytest.raises(ConfigError, match="mem_fraction_static: expected 0 < value < 1"):
        sglang.BACKEND.plan(sglang_ctx(mem_fraction_static=1.5))


def test_sglang_plan_rejects_nccl_ports_on_http_ports():
    with pytest.raises(ConfigError, match="distinct from the HTTP ports \\(clash: \\[29510\\]\\)"):
        sglang.BACKEND.plan(sglang_ctx(ports=(29510, 29511), nccl_base_port=29500))


def test_sglang_plan_rejects_nccl_ports_above_65535():
    with pytest.raises(ConfigError, match="must be <= 65535"):
        sglang.BACKEND.plan(sglang_ctx(nccl_base_port=65530))


def test_sglang_plan_requires_a_model():
    with pytest.raises(ConfigError, match="model: required for the sglang backend"):
        sglang.BACKEND.plan(sglang_ctx(model=""))


def test_sglang_plan_custom_command_and_extra_args_at_the_end():
    (spec,) = sglang.BACKEND.plan(sglang_ctx(ports=(12000,), sglang_command=("srun", "sglang-serve"),
                                             extra_args=("--context-length", "4096")))
    assert spec.argv[:2] == ("srun", "sglang-serve")
    assert spec.argv[-2:] == ("--context-length", "4096")


def test_sglang_plan_forwards_the_hub_variables_that_are_set(monkeypatch):
    (plain,) = sglang.BACKEND.plan(sglang_ctx(ports=(12000,)))
    assert plain.env == {"CUDA_VISIBLE_DEVICES": "0"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/shared/hf cache")
    (spec,) = sglang.BACKEND.plan(sglang_ctx(ports=(12000,)))
    assert spec.env == {"CUDA_VISIBLE_DEVICES": "0", "HF_HUB_OFFLINE": "1", "HF_HOME": "/shared/hf cache"}
    assert shlex.split(spec.shell_command())[:3] == ["CUDA_VISIBLE_DEVICES=0", "HF_HUB_OFFLINE=1",
                                                     "HF_HOME=/shared/hf cache"]


def test_sglang_server_count_is_gpus_over_tp_size(monkeypatch):
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", "8")
    assert sglang.BACKEND.server_count(cfg_with(gpus=-1, tp_size=2)) == 4
    assert sglang.BACKEND.server_count(cfg_with(gpus=4, tp_size=4)) == 1
    with pytest.raises(ConfigError, match="6 GPU\\(s\\) cannot be split into servers of tp_size=4"):
        sglang.BACKEND.server_count(cfg_with(gpus=6, tp_size=4))
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", "0")
    with pytest.raises(ConfigError, match="needs at least one GPU"):
        sglang.BACKEND.server_count(cfg_with(gpus=-1))


# ---------------------------------------------------------------------------------------------
# llama.cpp plans
# ---------------------------------------------------------------------------------------------


def test_llamacpp_plan_exact_command_per_port():
    ctx = PlanContext(cfg=cfg_with(backend="llamacpp", model="/m.gguf", n_threads=3, n_ctx=1024, n_parallel=2,
                                   extra_args=("--alias", "smol")), ports=(12100, 12101), slot=0, log_dir=LOGS)
    specs = llamacpp.BACKEND.plan(ctx)
    assert [s.argv for s in specs] == [
        (sys.executable, "-m", "pipeline.servers.cpu_server", "--model", "/m.gguf", "--host", "127.0.0.1",
         "--port", str(p), "--n_ctx", "1024", "--n_parallel", "2", "--n_threads", "3", "--alias", "m", "--metrics",
         "--alias", "smol")
        for p in (12100, 12101)
    ]
    for s in specs:
        assert s.env == {} and s.nccl_port is None and s.gpus == () and s.visible_gpu is None
        assert s.log_path == LOGS / f"llamacpp-{s.port}.log" and s.health_path == "/health"


def test_llamacpp_default_threads_are_shared_by_the_servers(monkeypatch):
    monkeypatch.setattr(llamacpp, "default_threads", lambda n: 100 + n)
    ctx = PlanContext(cfg=cfg_with(backend="llamacpp", model="/m.gguf", n_threads=0), ports=(1, 2, 3), slot=0,
                      log_dir=LOGS)
    assert {flag(s, "--n_threads") for s in llamacpp.BACKEND.plan(ctx)} == {"103"}


def test_llamacpp_without_model_package_or_cache_names_fetch_model(monkeypatch, tmp_path):
    from pipeline.servers import model_cache

    monkeypatch.setattr(model_cache, "SMOLLM2_GGUF", "not-shipped.gguf")
    ctx = PlanContext(cfg=cfg_with(backend="llamacpp", model="", model_cache_dir=str(tmp_path)), ports=(12000,),
                      slot=0, log_dir=LOGS)
    with pytest.raises(ServerError, match=f"no llama.cpp model: .* run `rag-pipeline fetch-model --model-cache-dir "
                                          f"{tmp_path}`.* or pass --model PATH"):
        llamacpp.BACKEND.plan(ctx)
    cached = model_cache.cached_model_path(tmp_path)  # the cache is the second place looked in
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")
    assert flag(llamacpp.BACKEND.plan(ctx)[0], "--model") == str(cached)


def test_fetch_default_model_only_for_managed_llamacpp_without_a_model(monkeypatch, tmp_path):
    from pipeline.servers import model_cache, plan

    calls = []
    monkeypatch.setattr(model_cache, "ensure_default_model", lambda cache, **kw: calls.append(cache))
    plan.fetch_default_model(cfg_with(backend="llamacpp", model="/m.gguf"))  # --model PATH: never fetched
    plan.fetch_default_model(cfg_with(backend="llamacpp", endpoints=("http://h:1",)))  # attached servers
    plan.fetch_default_model(cfg_with(backend="sglang", model=""))
    assert calls == []
    plan.fetch_default_model(cfg_with(backend="llamacpp", model="", model_cache_dir=str(tmp_path)))
    assert calls == [tmp_path]


def test_model_cache_dir_follows_xdg(monkeypatch, tmp_path):
    from pipeline.servers.model_cache import model_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert model_cache_dir() == tmp_path / "rag-pipeline" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/not/used")
    assert model_cache_dir() == Path.home() / ".cache" / "rag-pipeline" / "models"
    assert model_cache_dir("~/m") == Path.home() / "m"


def test_deterministic_plans_one_slot_no_cache_and_sglang_batch_invariance():
    base = cfg_with(backend="llamacpp", model="/m.gguf", n_parallel=4)
    det = dataclasses.replace(base, run=dataclasses.replace(base.run, deterministic=True))
    plain = llamacpp.BACKEND.plan(PlanContext(cfg=base, ports=(1,), slot=0, log_dir=LOGS))[0]
    same = llamacpp.BACKEND.plan(PlanContext(cfg=det, ports=(1,), slot=0, log_dir=LOGS))[0]
    assert flag(plain, "--n_parallel") == "4" and "--deterministic" not in plain.argv
    assert flag(same, "--n_parallel") == "1" and "--deterministic" in same.argv
    assert llamacpp.slots(base) == 4 and llamacpp.slots(det) == 1  # what the run sizes its in-flight requests by
    ctx = sglang_ctx(ports=(12000,))
    sg_det = dataclasses.replace(ctx.cfg, run=dataclasses.replace(ctx.cfg.run, deterministic=True))
    assert "--enable-deterministic-inference" not in sglang.BACKEND.plan(ctx)[0].argv
    assert "--enable-deterministic-inference" in sglang.BACKEND.plan(dataclasses.replace(ctx, cfg=sg_det))[0].argv


def test_deterministic_server_params_and_request_seed():
    from pipeline.config import DETERMINISTIC_SEED
    from pipeline.llm.client import request_seed
    from pipeline.servers import cpu_server

    args = cpu_server.parse_args(["--model", __file__, "--port", "1", "--deterministic"])
    assert args.deterministic and not cpu_server.parse_args(["--model", __file__, "--port", "1"]).deterministic
    cfg = load_config()
    assert request_seed(cfg) is None
    assert request_seed(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, deterministic=True))) == DETERMINISTIC_SEED


def test_llamacpp_server_count_is_cpu_servers():
    assert llamacpp.BACKEND.server_count(cfg_with(cpu_servers=3)) == 3
    with pytest.raises(ConfigError, match="cpu_servers: need at least 1 server, got 0"):
        llamacpp.BACKEND.server_count(cfg_with(cpu_servers=0))


# ---------------------------------------------------------------------------------------------
# Backend choice and nominal ports
# ---------------------------------------------------------------------------------------------


def test_http_ports_are_consecutive_from_base_plus_ten_per_slot():
    assert http_ports(11434, 0, 3) == [11434, 11435, 11436]
    assert http_ports(11434, 5, 2) == [11484, 11485]
    with pytest.raises(ConfigError, match="ports 65535..65536 are not all in 1..65535"):
        http_ports(65535, 0, 2)


def test_job_port_slot_from_config_then_slurm_job_id(monkeypatch):
    assert job_port_slot(cfg_with(port_slot=4)) == 4
    assert job_port_slot(cfg_with(port_slot=-1)) == 0
    monkeypatch.setenv("SLURM_JOB_ID", "123467")
    assert job_port_slot(cfg_with(port_slot=-1)) == 67
    assert job_port_slot(cfg_with(port_slot=0)) == 0
    monkeypatch.setenv("SLURM_JOB_ID", "abc")
    assert job_port_slot(cfg_with(port_slot=-1)) == 0


def test_auto_backend_is_sglang_only_with_gpus(monkeypatch):
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", "0")
    assert backend_for(cfg_with(backend="auto")).name == "llamacpp"
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", "2")
    assert backend_for(cfg_with(backend="auto")).name == "sglang"
    assert backend_for(cfg_with(backend="auto", gpus=0)).name == "llamacpp"
    auto = cfg_with(backend="auto", model="m", tp_size=2)
    assert [(s.backend, s.env["CUDA_VISIBLE_DEVICES"]) for s in plan_servers(auto)] == [("sglang", "0,1")]


def test_plan_servers_shifts_http_and_nccl_ports_by_the_slot(monkeypatch):
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "1002")
    specs = plan_servers(cfg_with(backend="sglang", model="m", base_port=12000, nccl_base_port=29500, port_slot=-1),
                         "/tmp/x")
    assert [(s.port, s.nccl_port) for s in specs] == [(12020, 29700), (12021, 29710)]
    assert specs[0].log_path == Path("/tmp/x/sglang-12020.log")


# ---------------------------------------------------------------------------------------------
# ServerSpec
# ---------------------------------------------------------------------------------------------


def test_with_ports_rewrites_argv_and_log_name():
    (spec,) = sglang.BACKEND.plan(sglang_ctx(ports=(12000,)))
    moved = spec.with_ports(12005, 29533)
    assert (moved.port, moved.nccl_port) == (12005, 29533)
    assert flag(moved, "--port") == "12005" and flag(moved, "--nccl-port") == "29533"
    assert moved.log_path == LOGS / "sglang-12005.log"
    assert spec.port == 12000  # frozen: a new spec


@pytest.mark.parametrize(("host", "url"), [
    ("127.0.0.1", "http://127.0.0.1:8000"),
    ("0.0.0.0", "http://127.0.0.1:8000"),
    ("", "http://127.0.0.1:8000"),
    ("::", "http://[::1]:8000"),
    ("::1", "http://[::1]:8000"),
    ("node7", "http://node7:8000"),
])
def test_spec_url_connects_to_a_wildcard_bind_locally(host, url):
    spec = ServerSpec(0, "llamacpp", ("x",), {}, host, 8000, "/health", LOGS / "l.log")
    assert spec.url == url


# ---------------------------------------------------------------------------------------------
# GPU detection and sizing
# ---------------------------------------------------------------------------------------------


def test_sglang_reserve_grows_with_tp_and_is_10_gib_on_big_gpus():
    assert gpus.sglang_reserve_mb(40 * 1024, 1) == 512 + 3072 + 128
    assert gpus.sglang_reserve_mb(40 * 1024, 8) == 512 + 3072 + 1024
    assert gpus.sglang_reserve_mb(81559, 1) == 10 * 1024
    assert gpus.sglang_reserve_mb(141 * 1024, 8) == 10 * 1024


def test_embedding_footprint_is_context_plus_weights_plus_one_batch():
    per_token = 1536 + 12 * 256  # all-MiniLM-L6-v2
    # 64 texts x 256 tokens x 4608 floats x 4 B = 288 MiB
    assert gpus.embedding_footprint_mb(90 * 2**20, per_token, 64) == pytest.approx(500 + 90 + 288)
    assert gpus.embedding_footprint_mb(0, per_token, 0) == gpus.CUDA_CONTEXT_MB


def test_static_fraction_rounds_down_and_refuses_small_gpus():
    assert gpus.static_fraction(1000, 125) == 0.875
    assert gpus.static_fraction(3000, 1001) == 0.666  # 0.66633.. rounded down, never up
    with pytest.raises(ConfigError, match="a GPU of 4096 MiB leaves a fraction 0.12"):
        gpus.static_fraction(4096, 3600)


def test_mem_fraction_static_prefers_the_configured_value(monkeypatch):
    monkeypatch.setenv("RAG_PIPELINE_GPU_MEMORY_MB", "16384")
    monkeypatch.setattr(gpus, "embedding_reserve_mb", lambda batch_size: 884.0)
    assert gpus.mem_fraction_static(cfg_with(mem_fraction_static=0.5)) == 0.5
    # 16 GiB, tp 2: SGLang keeps 512 + 3072 + 256 MiB, the embedding model 884 MiB -> 11660 / 16384
    assert gpus.mem_fraction_static(cfg_with(mem_fraction_static=0.0, tp_size=2)) == 0.711
    monkeypatch.delenv("RAG_PIPELINE_GPU_MEMORY_MB")
    assert gpus.mem_fraction_static(cfg_with(mem_fraction_static=0.0)) is None


@pytest.mark.parametrize("bad", ["0", "-5", "lots", ""])
def test_gpu_memory_override_must_be_positive_mib(monkeypatch, bad):
    monkeypatch.setenv("RAG_PIPELINE_GPU_MEMORY_MB", bad)
    with pytest.raises(ConfigError, match="RAG_PIPELINE_GPU_MEMORY_MB"):
        gpus.gpu_memory_mb()


def test_detect_gpus_requested_against_visible(monkeypatch):
    assert gpus.detect_gpus(0) == 0
    assert gpus.detect_gpus(-1) == 0  # no device node: torch is not even imported
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", "4")
    assert gpus.detect_gpus(-1) == 4 and gpus.detect_gpus(2) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(ConfigError, match=r"5 GPUs requested but 4 visible \(CUDA_VISIBLE_DEVICES=0,1,2,3\)"):
        gpus.detect_gpus(5)
    with pytest.raises(ConfigError, match="expected -1 \\(auto\\) or a count >= 0"):
        gpus.detect_gpus(-2)
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", "two")
    with pytest.raises(ConfigError, match="RAG_PIPELINE_GPU_COUNT"):
        gpus.visible_gpu_count()


def test_physical_gpu_ids_without_and_with_cuda_visible_devices(monkeypatch):
    assert gpus.physical_gpu_ids(3) == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6,")
    assert gpus.physical_gpu_ids(2) == ["4", "6"]
    assert gpus.physical_gpu_ids(1) == ["4"]


# ---------------------------------------------------------------------------------------------
# Attach mode
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "base"), [
    ("http://a:1/v1/", "http://a:1"),
    ("http://a:1/v1", "http://a:1"),
    ("  https://b.example/ ", "https://b.example"),
    ("http://gw:8080/llm/v1", "http://gw:8080/llm"),
    ("http://[::1]:8000", "http://[::1]:8000"),
    ("http://h:8000/v1x", "http://h:8000/v1x"),
])
def test_normalize_endpoint_strips_slash_and_v1(url, base):
    assert normalize_endpoint(url) == base


@pytest.mark.parametrize("url", ["ftp://x", "localhost:8000", "http://", "", "http:///v1"])
def test_normalize_endpoint_rejects_non_http_urls(url):
    with pytest.raises(ConfigError, match="is not an http\\(s\\)://host:port URL"):
        normalize_endpoint(url)


def test_resolve_endpoints_normalises_every_attach_url():
    cfg = cfg_with(endpoints=("http://a:1/v1/", "https://b:2"))
    assert resolve_endpoints(cfg) == ["http://a:1", "https://b:2"]


def test_api_key_from_env_never_shows_the_value(monkeypatch):
    assert api_key_from_env("") is None
    monkeypatch.setenv("RAG_UNIT_KEY", "k-123")
    assert api_key_from_env("RAG_UNIT_KEY") == "k-123"
    monkeypatch.setenv("RAG_UNIT_KEY", "")
    with pytest.raises(ConfigError, match="RAG_UNIT_KEY is not set or empty"):
        api_key_from_env("RAG_UNIT_KEY")


# ---------------------------------------------------------------------------------------------
# `serve --num` (dry run: nothing started)
# ---------------------------------------------------------------------------------------------


def test_serve_num_sets_the_server_count_of_each_backend(monkeypatch):
    monkeypatch.setenv("RAG_PIPELINE_GPU_COUNT", "4")
    res = CliRunner().invoke(main, ["serve", "--dry-run", "--backend", "llamacpp", "--model", "/m.gguf", "--num", "3"])
    assert res.exit_code == 0, res.output
    assert len(res.output.splitlines()) == 3
    res = CliRunner().invoke(main, ["serve", "--dry-run", "--backend", "sglang", "--model", "m", "--tp-size", "2",
                                    "--num", "2", "--", "--seed", "7"])
    assert res.exit_code == 0, res.output
    lines = [shlex.split(x) for x in res.output.splitlines()]
    assert [x[0] for x in lines] == ["CUDA_VISIBLE_DEVICES=0,1", "CUDA_VISIBLE_DEVICES=2,3"]
    assert all(x[-2:] == ["--seed", "7"] for x in lines)
    res = CliRunner().invoke(main, ["serve", "--dry-run", "--backend", "sglang", "--model", "m", "--tp-size", "2",
                                    "--num", "3"])
    assert res.exit_code == 2 and "--num 3 x --tp-size 2 needs 6 GPUs but 4 visible" in res.output


# ---------------------------------------------------------------------------------------------
# Process helpers without processes
# ---------------------------------------------------------------------------------------------


def test_describe_exit_names_signals():
    assert process.describe_exit(2) == "exited with code 2"
    assert process.describe_exit(-9) == "was killed by signal SIGKILL"
    assert process.describe_exit(-200) == "was killed by signal 200"


def test_log_tail_last_lines_or_a_note(tmp_path):
    log = tmp_path / "s.log"
    log.write_text("".join(f"line {i}\n" for i in range(40)))
    assert process.log_tail(log, 3) == "line 37\nline 38\nline 39"
    (tmp_path / "empty.log").write_text("")
    assert process.log_tail(tmp_path / "empty.log") == "(empty log)"
    assert process.log_tail(tmp_path / "missing.log").startswith("(no log: ")


def test_check_port_free_message_and_error_are_the_callers(monkeypatch):
    monkeypatch.setattr(process, "port_in_use", lambda host, port, error=ServerError: True)
    monkeypatch.setattr(process, "port_owner", lambda port: "pid 42 (chroma run)")
    with pytest.raises(StoreError) as err:
        process.check_port_free("127.0.0.1", 8000, "store port", hint="choose another --port", error=StoreError)
    assert str(err.value) == ("store port 8000 on 127.0.0.1 is already in use by pid 42 (chroma run) "
                              "(stop that process or choose another --port)")
    with pytest.raises(ServerError, match=r"^port 8000 .* \(stop that process or choose another --base-port\)$"):
        process.check_port_free("127.0.0.1", 8000)


class FakeProcess:
    """``Popen`` stand-in: ``poll()`` answers the given return codes in turn (None = running)."""

    pid = 4242

    def __init__(self, *codes: int | None) -> None:
        self.codes = list(codes)

    def poll(self) -> int | None:
        return self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]


def test_wait_http_ready_returns_when_ready_or_stopped(monkeypatch):
    probes = iter([False, False, True])
    monkeypatch.setattr(process, "http_ready", lambda http, url, statuses, timeout: next(probes))
    assert process.wait_http_ready(FakeProcess(None), "http://x/health", float("inf"), interval_s=0) is True
    assert process.wait_http_ready(FakeProcess(None), "http://x/health", 0, stop=lambda: True) is False


def test_wait_http_ready_raises_the_callers_errors(monkeypatch):
    monkeypatch.setattr(process, "http_ready", lambda http, url, statuses, timeout: False)
    with pytest.raises(StoreError, match="exited with 3"):
        process.wait_http_ready(FakeProcess(None, 3), "http://x", float("inf"), interval_s=0,
                                exit_error=lambda code: StoreError(f"exited with {code}"))
    with pytest.raises(ServerError, match="process 4242 was killed by signal SIGTERM before http://x answered"):
        process.wait_http_ready(FakeProcess(-15), "http://x", float("inf"))
    with pytest.raises(StoreError, match="too slow"):
        process.wait_http_ready(FakeProcess(None), "http://x", 0, timeout_error=lambda: StoreError("too slow"))
