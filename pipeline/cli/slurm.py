"""`rag-pipeline submit` (Slurm array + merge job) and `rag-pipeline serve-store` (shared Chroma server)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.cli.options import handle_errors
from pipeline.errors import RagPipelineError


@click.command(
    "submit",
    context_settings={"ignore_unknown_options": False},
)
@click.option("--input", "-i", "input_", required=True, type=click.Path(),
              help="Input: JSONL, a .parquet file or a directory of .parquet parts.")
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(file_okay=False),
    help="Output root: task I writes OUTPUT/shard-I-of-N, the merge job OUTPUT.merged beside it.",
)
@click.option(
    "--nodes", "-N", default=0, type=int,
    help="Nodes used at once, one per array task; without --shards also the number of shards.",
)
@click.option(
    "--shards", "-S", default=0, type=int,
    help="Shards of the input = array tasks (default --nodes); more shards than nodes balance the load.",
)
@click.option(
    "--max-concurrent", "-K", default=0, type=int,
    help="Array tasks running at once (Slurm --array=...%K); default --nodes when --shards exceeds it.",
)
@click.option(
    "--outage-requeues", default=3, show_default=True, type=int,
    help="Times a task stopped by an endpoint outage (exit 75) requeues itself; 0 = never.",
)
@click.option(
    "--gpus-per-node", "-G", default=0, show_default=True, type=int, help="GPUs per task (--gres=gpu:G)."
)
@click.option("--partition", "-p", default="", help="Slurm partition (array and merge job).")
@click.option(
    "--time", "-t", "time_limit", default="", help="Time limit per task, e.g. 12:00:00 (and merge job)."
)
@click.option("--account", "-A", default="", help="Slurm account (array and merge job).")
@click.option(
    "--sbatch-arg",
    "sbatch_args",
    multiple=True,
    help="Extra sbatch option for the array tasks, repeatable, e.g. --sbatch-arg=--mem=64G "
    "--sbatch-arg=--exclusive.",
)
@click.option("--chroma-url", default="",
              help="Your own Chroma server behind an authenticating proxy (https://...), passed to every task; "
                   "default: the tasks copy --store to their node.")
@click.option("--store-local-dir", default=None,
              help="Node-local directory each task copies the store to (once per node and store version); default "
                   "/tmp/rag-pipeline-stores-$USER; '' = read the store in place on the shared filesystem.")
@click.option("--job-name", default="rag-pipeline", show_default=True, help="Slurm job name of the array.")
@click.option("--dry-run", is_flag=True,
              help="Print both batch scripts; write and submit nothing (checks only that a store is named).")
@click.argument("run_options", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def submit_cmd(
    input_: str,
    output: str,
    nodes: int,
    shards: int,
    max_concurrent: int,
    outage_requeues: int,
    gpus_per_node: int,
    partition: str,
    time_limit: str,
    account: str,
    sbatch_args: tuple[str, ...],
    chroma_url: str,
    store_local_dir: str | None,
    job_name: str,
    dry_run: bool,
    run_options: tuple[str, ...],
) -> None:
    """Submit a Slurm array of N `run --shard I/N` tasks and a merge job that runs after all succeed.

    Options after `--` are passed to every task's `rag-pipeline run` (e.g. `-- --limit 1000 --config
    cfg.toml`). Tasks are requeueable: a requeued or preempted task resumes from its committed rows, and
    two minutes before the time limit a task stops cleanly and requeues itself. Prints both job ids. Before
    anything is queued, the tasks' run is checked here as the run checks itself (input and its fields, prompts,
    config, store and collections, model settings): a failing check is one line and exit 2 or 4, nothing
    submitted. Follow the job with `rag-pipeline status OUTPUT` (each task: pending, running, done, failed with
    its exit code and log). Each task copies the store to its node first (once per node and store version,
    --store-local-dir) and reads the copy: no store server, nothing listening on the network. Ingest first
    (`rag-pipeline ingest`), then submit: `--ingest` or `--reset-collection` in the run options is refused.

    Example: rag-pipeline submit --input data.jsonl --output out/ --nodes 4 --gpus-per-node 8 -t 24:00:00
    -- --store /shared/store --collection docs

    More shards than nodes: --shards 64 --nodes 4 runs 64 small tasks, 4 at a time (array throttle %4), so a
    slow or preempted node delays one small shard instead of a quarter of the job.
    """
    from pipeline.output import default_merge_dir
    from pipeline.slurm.submit import SubmitOptions, submit
    from pipeline.store.staging import default_local_dir

    opts = SubmitOptions(
        input_path=Path(input_),
        output_dir=Path(output),
        nodes=nodes,
        shards=shards,
        max_concurrent=max_concurrent,
        outage_requeues=outage_requeues,
        gpus_per_node=gpus_per_node,
        partition=partition,
        time_limit=time_limit,
        account=account,
        sbatch_args=tuple(sbatch_args),
        chroma_url=chroma_url,
        store_local_dir="" if chroma_url else default_local_dir() if store_local_dir is None else store_local_dir,
        run_options=tuple(run_options),
        job_name=job_name,
    )
    from pipeline.slurm.submit import validate

    validate(opts)
    _preflight(opts, dry_run)
    res = submit(opts, dry_run=dry_run)
    if dry_run:
        click.echo(f"# ---- {opts.slurm_dir / 'array.sbatch'}  (sbatch --parsable array.sbatch)")
        click.echo(res.array_script)
        click.echo(
            f"# ---- {opts.slurm_dir / 'merge.sbatch'}  "
            "(sbatch --parsable --dependency=afterok:<array job id> merge.sbatch)"
        )
        click.echo(res.merge_script)
        return
    out = Path(output).absolute()
    s = opts.n_shards
    at_once = f", at most {opts.throttle} at a time" if opts.throttle else ""
    click.echo(
        f"Submitted array job {res.array_job_id} ({s} task(s){at_once}: shard I/{s} -> {out}/shard-I-of-{s}); "
        f"logs in {opts.slurm_dir / 'logs'}"
    )
    click.echo(f"Submitted merge job {res.merge_job_id} (afterok:{res.array_job_id}) -> {default_merge_dir(out)}")
    click.echo(f"Follow with: rag-pipeline status {out}")


def _preflight(opts, dry_run: bool) -> None:
    """Run the tasks' own checks here, before anything is written or submitted
    (:func:`pipeline.run.required.preflight`: names, prompts, response format, store and collections, LLM
    settings, the whole input and its fields), so that an array whose every task would stop with the same error
    is never queued.

    The run options are parsed by `run`'s own parser and built into the configuration as each task builds it. The
    input scan is kept in ``OUTPUT/.rag-pipeline/input_scan.json`` for the tasks to reuse (only when every check passed). A dry
    run checks only that a store and collection are named.

    Raises:
        InputError: the run options do not parse, they ingest or reset the collection (every task would write
            to the store: ingest first, then submit), or the tasks' run is refused (:func:`preflight`);
            ConfigError, StoreError, ServerError: see :func:`preflight` (the message says it is the tasks' run).
    """
    from pipeline.cli.options import build_config
    from pipeline.cli.run import run_cmd
    from pipeline.errors import InputError, StoreError
    from pipeline.output.layout import INPUT_SCAN_FILE, meta_path
    from pipeline.run.required import preflight
    from pipeline.store.preflight import require_store_named

    argv = ["--input", str(opts.input_path), "--output", str(opts.output_dir),
            *(["--chroma-url", opts.chroma_url] if opts.chroma_url else []), *opts.run_options]
    try:
        ctx = run_cmd.make_context("run", argv)
    except click.ClickException as exc:
        raise InputError(f"run options {' '.join(opts.run_options)!r}: {exc.format_message()}") from None
    params = dict(ctx.params)
    cfg = build_config(params.pop("config_file", None), params)
    if cfg.run.ingest or cfg.run.reset_collection:
        flag = f"--ingest {cfg.run.ingest}" if cfg.run.ingest else "--reset-collection"
        raise InputError(f"the tasks' run: {flag}: every task would write to the store; ingest first "
                         "(rag-pipeline ingest SOURCE --store DIR --collection NAME), then submit")
    try:
        if dry_run:  # only what the options name: the scripts are shown, nothing is queued
            require_store_named(cfg.store)
        else:
            # without --gpus-per-node a node may still show GPUs to the task: its backend "auto" stays unresolved
            preflight(cfg, gpus=opts.gpus_per_node or None,
                      scan_cache=meta_path(Path(opts.output_dir).absolute(), INPUT_SCAN_FILE))
    except StoreError as exc:
        hint = ("; for submit: --chroma-url URL, or run options after --, e.g. -- --store DIR --collection NAME"
                if "named" in str(exc) else "")
        raise StoreError(f"the tasks' run, checked before submitting: {exc}{hint}; nothing submitted") from None
    except RagPipelineError as exc:
        raise type(exc)(f"the tasks' run, checked before submitting: {exc}; nothing submitted") from None


@click.command("serve-store")
@click.option("--path", required=True, type=click.Path(file_okay=False), help="Chroma persistence directory.")
@click.option(
    "--host", default="127.0.0.1", show_default=True,
    help="Interface; another than the loopback needs --allow-unauthenticated-network."
)
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port.")
@click.option(
    "--ready-timeout-s", default=60.0, show_default=True, type=float, help="Seconds to wait for readiness."
)
@click.option("--allow-unauthenticated-network", is_flag=True,
              help="Bind a non-loopback --host although Chroma checks no credential: anyone who reaches the port "
                   "can read, change or delete every collection. Prefer an authenticating proxy (README).")
@handle_errors
def serve_store_cmd(path: str, host: str, port: int, ready_timeout_s: float,
                    allow_unauthenticated_network: bool) -> None:
    """Run a Chroma server (`chroma run`) in the foreground; Ctrl-C stops it.

    Chroma has no authentication: the server binds 127.0.0.1 and a non-loopback --host is refused unless
    --allow-unauthenticated-network is given. Multi-node runs need no store server (submit copies the store to
    each node); to share one, put it behind a proxy that checks a token and use run --chroma-url https://...
    --store-token-env VAR. Pass the printed URL to `run --chroma-url`. Signals are forwarded to the server.
    """
    from pipeline.errors import ConfigError
    from pipeline.servers.process import open_listener_problem
    from pipeline.store.server import serve_store

    problem = open_listener_problem(host, authenticated=False, allowed=allow_unauthenticated_network,
                                    what="serve-store --host",
                                    instead="keep it on 127.0.0.1 behind an authenticating proxy (README)")
    if problem:
        raise ConfigError(problem)

    def ready(url: str) -> None:
        click.echo(f"Chroma server ready: {url}  (use --chroma-url {url})", err=False)
        sys.stdout.flush()

    rc = serve_store(path, host, port, on_ready=ready, ready_timeout_s=ready_timeout_s)
    sys.exit(rc)
