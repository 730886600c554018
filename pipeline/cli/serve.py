"""`rag-pipeline serve`: start the managed LLM server pool and keep it up until Ctrl-C / SIGTERM.

``launch_servers.sh`` is a wrapper that execs this command with ``--all-or-nothing --script-exit-codes
--pid-file DIR/servers.pid``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.cli.options import build_config, config_file_option, config_option, handle_errors

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.servers.pool import ServerPool


class _StopRequested(Exception):
    """SIGTERM/SIGHUP turned into an exception so that the pool's cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _StopRequested(signum)


def _with_server_count(cfg: Config, num: int) -> Config:
    """``cfg`` set up for exactly ``num`` servers of its backend (``auto`` resolved by the GPU detection).

    llama.cpp: ``servers.cpu_servers = num``. SGLang: ``servers.gpus = num * tp_size``.

    Raises:
        ConfigError: SGLang needs more GPUs than visible (naming ``CUDA_VISIBLE_DEVICES`` when set).
    """
    from pipeline.config import with_overrides
    from pipeline.errors import ConfigError
    from pipeline.servers.gpus import visible_gpu_count
    from pipeline.servers.plan import backend_for

    s = cfg.servers
    name = backend_for(cfg).name
    if name == "llamacpp":
        return with_overrides(cfg, {"servers.backend": name, "servers.cpu_servers": num})
    need = num * s.tp_size
    visible = visible_gpu_count()
    if need > visible:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            f"--num {num} x --tp-size {s.tp_size} needs {need} GPUs but {visible} visible"
            + (f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else "")
        )
    return with_overrides(cfg, {"servers.backend": name, "servers.gpus": need})


def _write_pid_file(path: Path, pool: ServerPool) -> None:
    """One ``PID PORT`` line per running server (its PID is also its process group id)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{pid} {port}\n" for pid, port in pool.running()))


@click.command("serve")
@config_file_option
@config_option(
    "--backend",
    key="servers.backend",
    help="Server backend (auto: sglang with GPUs, llamacpp without).",
)
@config_option("--model", key="servers.model", help="Model path or name (default on CPU: the SmolLM2 GGUF).")
@config_option("--model-cache-dir", key="servers.model_cache_dir", type=click.Path(file_okay=False),
               help="Where the default CPU model is fetched to on first use (default: ~/.cache/rag-pipeline/models).")
@config_option("--base-port", key="servers.base_port", type=int, help="Port of server 0 (server i: base+i).")
@config_option("--cpu-servers", key="servers.cpu_servers", type=int, help="llama.cpp servers without GPU.")
@config_option("--gpus", key="servers.gpus", type=int, help="GPUs to use, one server each (-1: all visible).")
@config_option("--tp-size", key="servers.tp_size", type=int, help="SGLang: GPUs per server (tensor parallel).")
@config_option(
    "--mem-fraction-static",
    key="servers.mem_fraction_static",
    type=float,
    help="SGLang --mem-fraction-static (default: computed to leave room for the embedding model).",
)
@config_option("--host", key="servers.host", help="Interface the servers bind to.")
@config_option(
    "--log-dir",
    key="servers.log_dir",
    type=click.Path(file_okay=False),
    help="Directory for one log file per server (default: a temporary directory).",
)
@config_option("--nccl-base-port", key="servers.nccl_base_port", type=int,
               help="SGLang: NCCL port of server 0 (server i: base + 10*i).")
@config_option("--port-slot", key="servers.port_slot", type=int,
               help="Port search shift: HTTP from base + 10*slot, NCCL from base + 100*slot (-1: SLURM_JOB_ID % 100).")
@config_option("--n-threads", key="servers.n_threads", type=int,
               help="llama.cpp threads per server (0: cores / (2 * servers)).")
@config_option("--n-parallel", key="servers.n_parallel", type=int, help="llama.cpp slots per server.")
@config_option("--n-ctx", key="servers.n_ctx", type=int, help="llama.cpp context per slot, tokens.")
@config_option("--deterministic/--no-deterministic", key="run.deterministic", default=None,
               help="Servers whose replies repeat (llama.cpp: one slot, no prompt-cache reuse; SGLang: "
                    "--enable-deterministic-inference), for `run --deterministic --endpoints`.")
@config_option("--startup-timeout-s", key="servers.startup_timeout_s", type=float,
               help="Seconds a server may take to become ready.")
@config_option("--shutdown-timeout-s", key="servers.shutdown_timeout_s", type=float,
               help="Seconds between SIGTERM and SIGKILL when stopping a server.")
@click.option("--num", type=click.IntRange(min=1), default=None,
              help="Number of servers (llama.cpp: --cpu-servers; SGLang: uses num x tp-size GPUs).")
@click.option("--all-or-nothing", is_flag=True,
              help="One start per server; stop every server and fail as soon as one fails to start.")
@click.option("--pid-file", type=click.Path(dir_okay=False), default=None,
              help="Write 'PID PORT' per server to this file (PID = process group id); removed on stop.")
@click.option("--endpoint-host", default=None,
              help="Host name in the printed endpoints (default: the bind address; 127.0.0.1 for 0.0.0.0).")
@click.option("--script-exit-codes", is_flag=True,
              help="Exit 1 when a server fails and 128+N when stopped by signal N (130 Ctrl-C, 143 SIGTERM) "
                   "instead of the error's own code and 0.")
@click.option("--dry-run", is_flag=True, help="Print the server commands and exit.")
@click.argument("extra_args", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def serve_cmd(config_file: str | None, dry_run: bool, num: int | None, all_or_nothing: bool, pid_file: str | None,
              endpoint_host: str | None, script_exit_codes: bool, extra_args: tuple[str, ...],
              **params: Any) -> None:
    """Start one LLM server per GPU (or llama.cpp servers on CPU), print the endpoints, wait for Ctrl-C.

    The endpoint list (stdout) can be given to `rag-pipeline run --endpoints`. Stops every server
    (SIGTERM, then SIGKILL after servers.shutdown_timeout_s) on Ctrl-C or SIGTERM; exits non-zero if a
    server dies. Arguments after `--` are appended to every server command.

    Example: rag-pipeline serve --cpu-servers 2 --base-port 11434 -- --alias my-model
    """
    from pipeline.errors import RagPipelineError

    try:
        _serve(config_file, dry_run, num, all_or_nothing, pid_file, endpoint_host, script_exit_codes, extra_args,
               params)
    except RagPipelineError as exc:
        if not script_exit_codes:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2 if exc.exit_code == 2 else 1)


def _serve(config_file: str | None, dry_run: bool, num: int | None, all_or_nothing: bool, pid_file: str | None,
           endpoint_host: str | None, script_exit_codes: bool, extra_args: tuple[str, ...],
           params: dict[str, Any]) -> None:
    from pipeline.config import with_overrides
    from pipeline.errors import ServerError
    from pipeline.servers.plan import fetch_default_model, plan_servers
    from pipeline.servers.pool import ServerPool
    from pipeline.servers.process import log_tail

    cfg = build_config(config_file, params)
    if extra_args:
        cfg = with_overrides(cfg, {"servers.extra_args": extra_args})
    if all_or_nothing:
        cfg = with_overrides(cfg, {"servers.startup_attempts": 1})
    if num is not None:
        cfg = _with_server_count(cfg, num)
    if dry_run:
        for spec in plan_servers(cfg):
            click.echo(spec.shell_command())
        return
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    pool = None
    pids = Path(pid_file) if pid_file else None
    stopped_by = 0
    try:
        fetch_default_model(cfg)
        pool = ServerPool(cfg)
        click.echo(f"starting {len(pool.specs)} {pool.backend} server(s); logs in {pool.log_dir}", err=True)
        pool.launch()
        if pids is not None:
            _write_pid_file(pids, pool)
        # degrades unless --all-or-nothing: servers that failed every start are reported, not fatal
        pool.wait_ready(first_only=False, all_required=all_or_nothing)
        if pids is not None:
            _write_pid_file(pids, pool)  # a server started again during startup has a new PID
        for entry in pool.report():
            if entry["status"] != "ready":
                click.echo(f"server {entry['index']} (port {entry['port']}) failed to start: {entry['error']}", err=True)
        ready = [s for s in pool.specs if pool.state[s.index].status == "ready"]
        if endpoint_host:
            host = f"[{endpoint_host}]" if ":" in endpoint_host else endpoint_host
            click.echo(",".join(f"http://{host}:{s.port}" for s in ready))
        else:
            click.echo(",".join(s.url for s in ready))
        click.echo("servers ready; press Ctrl-C to stop", err=True)
        while True:
            dead = pool.check_alive()
            if dead:
                spec = next(s for s in pool.specs if s.port == dead[0])
                raise ServerError(
                    f"server on port {spec.port} stopped with exit code {pool.returncode(spec.port)} while "
                    f"serving; last log lines ({spec.log_path}):\n{log_tail(spec.log_path)}"
                )
            time.sleep(1.0)
    except KeyboardInterrupt:
        click.echo("stopping servers", err=True)
        stopped_by = signal.SIGINT
    except _StopRequested as stop:
        click.echo("stopping servers", err=True)
        stopped_by = stop.signum
    finally:
        if pool is not None:
            pool.stop()
        if pids is not None:
            pids.unlink(missing_ok=True)
        for s, handler in old.items():
            signal.signal(s, handler)
    if stopped_by and script_exit_codes:
        sys.exit(128 + stopped_by)
