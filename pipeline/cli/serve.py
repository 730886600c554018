"""`rag-pipeline serve`: start the managed LLM server pool and keep it up until Ctrl-C / SIGTERM."""

from __future__ import annotations

import signal
import time
from typing import Any

import click

from pipeline.cli.options import build_config, config_file_option, config_option, handle_errors


class _StopRequested(Exception):
    """SIGTERM/SIGHUP turned into an exception so that the pool's cleanup runs."""


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _StopRequested(signal.Signals(signum).name)


@click.command("serve")
@config_file_option
@config_option(
    "--backend",
    key="servers.backend",
    help="Server backend (auto: sglang with GPUs, llamacpp without).",
)
@config_option("--model", key="servers.model", help="Model path or name (default on CPU: the SmolLM2 GGUF).")
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
@click.option("--dry-run", is_flag=True, help="Print the server commands and exit.")
@handle_errors
def serve_cmd(config_file: str | None, dry_run: bool, **params: Any) -> None:
    """Start one LLM server per GPU (or llama.cpp servers on CPU), print the endpoints, wait for Ctrl-C.

    The endpoint list (stdout) can be given to `rag-pipeline run --endpoints`. Stops every server
    (SIGTERM, then SIGKILL after servers.shutdown_timeout_s) on Ctrl-C or SIGTERM; exits non-zero if a
    server dies.

    Example: rag-pipeline serve --cpu-servers 2 --base-port 11434
    """
    from pipeline.errors import ServerError
    from pipeline.servers.pool import ServerPool, log_tail, plan_servers

    cfg = build_config(config_file, params)
    if dry_run:
        for spec in plan_servers(cfg):
            click.echo(spec.shell_command())
        return
    old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    pool = None
    try:
        pool = ServerPool(cfg)
        click.echo(f"starting {len(pool.specs)} {pool.backend} server(s); logs in {pool.log_dir}", err=True)
        endpoints = pool.start()  # degrades: servers that failed every start are reported, not fatal
        for entry in pool.report():
            if entry["status"] != "ready":
                click.echo(f"server {entry['index']} (port {entry['port']}) failed to start: {entry['error']}", err=True)
        click.echo(",".join(endpoints))
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
    except (KeyboardInterrupt, _StopRequested):
        click.echo("stopping servers", err=True)
    finally:
        if pool is not None:
            pool.stop()
        for s, handler in old.items():
            signal.signal(s, handler)
