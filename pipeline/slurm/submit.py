"""Slurm array submission (`rag-pipeline submit`); each task copies its store to its node
(:mod:`pipeline.store.staging`), so no store server is needed.

``submit`` writes two batch scripts into ``OUTPUT/.rag-pipeline/slurm/``:

* ``array.sbatch``: an array ``0-(S-1)`` of S shards (``--shards S``, default ``--nodes N``), throttled to K
  tasks at a time with ``%K`` (``--max-concurrent K``; default N when there are more shards than nodes), so a
  slow or preempted node holds one small shard, not 1/N of the job; task I runs ``<python> -m pipeline run
  --input IN --output OUT --shard I/S RUN_OPTIONS`` (the run writes ``OUT/shard-I-of-S/``). ``--requeue``: a requeued or preempted
  task resumes from its committed parts. ``--signal=B:USR1@120``: two minutes before the time limit Slurm
  signals the batch shell, which forwards SIGUSR1 to the run (it commits finished rows and exits) and then
  requeues its own task, so a long job continues in a new allocation. A run that stopped on an endpoint
  outage (exit 75) is requeued up to ``--outage-requeues`` times (3). SIGTERM (scancel, requeue,
  preemption) reaches the run directly from Slurm (not forwarded: a second signal would force-stop it).
* ``merge.sbatch``: ``<python> -m pipeline merge OUT`` (into ``OUT.merged``), submitted with
  ``--dependency=afterok:<array id>`` and ``--kill-on-invalid-dep=yes`` (a failed task cancels the merge instead
  of leaving it pending forever).

Each task and the merge job record their start and their end (state, exit code, log files) in
``OUT/.rag-pipeline/slurm/tasks/`` (:mod:`pipeline.slurm.tasks`), so that ``rag-pipeline status OUT`` tells what became of
each one without Slurm accounting; ``OUT/.rag-pipeline/slurm/submit.json`` holds the job ids.

Every value that goes into a script is quoted with :func:`shlex.quote` (sbatch parses ``#SBATCH`` lines with
the same quoting rules); ``%`` in paths used as Slurm filename patterns is escaped as ``%%``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import InputError, OutageError, RunError
from pipeline.output import default_merge_dir, shard_dirs
from pipeline.output.layout import SLURM_DIR, meta_path
from pipeline.output.migrate import migrate
from pipeline.slurm.tasks import MERGE_RECORD, TASKS_DIR, record_function, write_submit_record

log = logging.getLogger(__name__)

SIGNAL_SPEC = "B:USR1@120"
OUTAGE_EXIT = OutageError.exit_code
"""Exit status of a run stopped by an endpoint outage (pipeline.errors.OutageError), requeued by the array script."""
SBATCH_TIMEOUT_S = 60.0
_TIME_RE = re.compile(r"^\d+(-\d+)?(:\d+){0,2}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.,:+\-]+$")
_RESERVED_RUN_OPTIONS = ("--input", "--output", "--shard")


@dataclass(frozen=True)
class SubmitOptions:
    """What `rag-pipeline submit` submits.

    Attributes:
        input_path: input JSONL (must exist; stored absolute in the script).
        output_dir: output root; task I writes ``output_dir/shard-I-of-N``; merge writes ``output_dir.merged``
            beside it (:func:`pipeline.output.default_merge_dir`).
        nodes: N, nodes used at once (one per array task); with ``shards`` 0 also the number of shards;
            0 = unset (``shards`` required then).
        gpus_per_node: GPUs requested per task (``--gres=gpu:G``); 0 = no GRES request.
        partition: ``--partition`` ("" = cluster default); also used by the merge job.
        time_limit: ``--time`` (HH:MM:SS, D-HH:MM:SS, minutes, ...; "" = partition default); also for merge.
        account: ``--account`` ("" = none); also used by the merge job.
        sbatch_args: extra ``#SBATCH`` options for the array tasks only, each like ``--mem=64G``.
        chroma_url: the user's own Chroma server (``--chroma-url`` of run), "" = the run's configured store.
        store_local_dir: node-local directory each task copies its store to before running (``--store-local-dir``
            of run: :mod:`pipeline.store.staging`); "" = the tasks read the store in place.
        run_options: extra options appended to every task's ``run`` command (not --input/--output/--shard).
        python: interpreter the jobs run (absolute path; default the current one).
        workdir: directory the jobs start in (``--chdir``; default the current directory).
        job_name: Slurm job name of the array (the merge job gets ``<job_name>-merge``).
        run_command: argv each task runs, before ``--input ... --output ... --shard I/N``; default
            ``[python, "-m", "pipeline", "run"]`` (override e.g. to wrap the run in a container).
        shards: S, array tasks = shards of the input (0 = ``nodes``).
        max_concurrent: K, array tasks running at once (Slurm ``--array=0-(S-1)%K``); 0 = ``nodes`` when
            ``shards`` exceeds it, else no throttle.
        outage_requeues: times a task that stopped on an endpoint outage (the run's exit 75, after
            ``run.max_outage_s``) requeues itself, counted per task in ``.rag-pipeline/slurm/outages/<task index>``; 0 =
            never (the task fails with 75 and the merge job is cancelled).
    """

    input_path: Path
    output_dir: Path
    nodes: int
    gpus_per_node: int = 0
    partition: str = ""
    time_limit: str = ""
    account: str = ""
    sbatch_args: tuple[str, ...] = ()
    chroma_url: str = ""
    store_local_dir: str = ""
    run_options: tuple[str, ...] = ()
    python: str = field(default_factory=lambda: str(Path(sys.executable).absolute()))
    workdir: Path = field(default_factory=Path.cwd)
    job_name: str = "rag-pipeline"
    run_command: tuple[str, ...] | None = None
    shards: int = 0
    max_concurrent: int = 0
    outage_requeues: int = 3

    @property
    def n_shards(self) -> int:
        """S: the number of shards (array tasks)."""
        return self.shards or self.nodes

    @property
    def throttle(self) -> int:
        """K of ``--array=...%K`` (0 = none)."""
        if self.max_concurrent:
            return self.max_concurrent
        return self.nodes if self.nodes and self.n_shards > self.nodes else 0

    @property
    def slurm_dir(self) -> Path:
        """``output_dir/.rag-pipeline/slurm``: the scripts, the task records and the per-task logs."""
        return meta_path(Path(self.output_dir).absolute(), SLURM_DIR)

    def task_argv(self) -> list[str]:
        """The command of one array task, without the ``--shard`` value (added by the script)."""
        head = list(self.run_command) if self.run_command else [self.python, "-m", "pipeline", "run"]
        argv = head + [
            "--input",
            str(Path(self.input_path).absolute()),
            "--output",
            str(Path(self.output_dir).absolute()),
        ]
        if self.chroma_url:
            argv += ["--chroma-url", self.chroma_url]
        if self.store_local_dir:
            argv += ["--store-local-dir", self.store_local_dir]
        return argv


@dataclass(frozen=True)
class SubmitResult:
    """Outcome of :func:`submit`.

    Attributes:
        array_script: text of the array batch script.
        merge_script: text of the merge batch script.
        array_script_path: where it was written (``None`` for a dry run).
        merge_script_path: where it was written (``None`` for a dry run).
        array_job_id: Slurm job id of the array (``None`` for a dry run).
        merge_job_id: Slurm job id of the merge job (``None`` for a dry run).
    """

    array_script: str
    merge_script: str
    array_script_path: Path | None = None
    merge_script_path: Path | None = None
    array_job_id: str | None = None
    merge_job_id: str | None = None


# ---------------------------------------------------------------------------------------------
# validation and script text


def _no_newline(value: str, what: str) -> None:
    if "\n" in value or "\r" in value or "\0" in value:
        raise InputError(f"{what} {value!r}: must not contain a newline or NUL character")


def validate(opts: SubmitOptions) -> None:
    """Check submit options before anything is written or submitted.

    Raises:
        InputError: N < 1, G < 0, a missing input, a bad --time/--partition/--account/--sbatch-arg/
            --chroma-url, RUN_OPTIONS that set --input/--output/--shard, a newline in a path, or an output
            root that already holds shards of another N.
    """
    if opts.nodes < 0 or (opts.nodes == 0 and opts.shards == 0):
        raise InputError(f"--nodes {opts.nodes}: must be >= 1")
    if opts.shards < 0:
        raise InputError(f"--shards {opts.shards}: must be >= 1")
    if opts.outage_requeues < 0:
        raise InputError(f"--outage-requeues {opts.outage_requeues}: must be >= 0")
    if opts.max_concurrent < 0:
        raise InputError(f"--max-concurrent {opts.max_concurrent}: must be >= 1 (or 0 for the default)")
    if opts.gpus_per_node < 0:
        raise InputError(f"--gpus-per-node {opts.gpus_per_node}: must be >= 0")
    inp = Path(opts.input_path)
    _no_newline(str(inp), "--input")
    _no_newline(str(opts.output_dir), "--output")
    _no_newline(str(opts.workdir), "working directory")
    _no_newline(opts.store_local_dir, "--store-local-dir")
    if not inp.exists():
        raise InputError(f"--input {inp}: file not found")
    if opts.time_limit and not _TIME_RE.match(opts.time_limit):
        raise InputError(
            f"--time {opts.time_limit!r}: expected HH:MM:SS, MM, MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
        )
    for what, value in (("--partition", opts.partition), ("--account", opts.account)):
        if value and not _NAME_RE.match(value):
            raise InputError(f"{what} {value!r}: letters, digits and _ . , : + - only")
    for arg in opts.sbatch_args:
        _no_newline(arg, "--sbatch-arg")
        if not arg.startswith("-"):
            raise InputError(f"--sbatch-arg {arg!r}: expected an sbatch option such as --mem=64G")
        if arg.split("=")[0] in ("--array", "-a", "--dependency", "-d", "--output", "-o", "--error", "-e"):
            raise InputError(f"--sbatch-arg {arg!r}: submit sets this option itself")
    if opts.chroma_url and not re.match(r"^https?://[^\s/]+", opts.chroma_url):
        raise InputError(f"--chroma-url {opts.chroma_url!r}: expected http://host:port")
    for opt in opts.run_options:
        name = opt.split("=")[0]
        if name in _RESERVED_RUN_OPTIONS:
            raise InputError(f"run option {opt!r}: submit sets {name} itself (use submit's own option)")
    other_n = sorted({n for _, n, _ in shard_dirs(opts.output_dir) if n != opts.n_shards})
    if other_n:
        flag = "--shards" if opts.shards else "--nodes"
        raise InputError(
            f"--output {opts.output_dir} already holds shards of N={other_n[0]} (shard-I-of-{other_n[0]}); "
            f"use {flag} {other_n[0]} to resume them, or another --output"
        )


def _pattern(directory: Path, name: str) -> str:
    """``directory/name`` as a Slurm filename pattern: a literal ``%`` in ``directory`` becomes ``%%``
    (``name`` keeps its ``%A``/``%a``/``%j`` placeholders)."""
    return str(directory).replace("%", "%%") + "/" + name


def _directive(option: str, value: str | None = None) -> str:
    if value is None:
        return f"#SBATCH {shlex.quote(option)}"
    return f"#SBATCH {shlex.quote(f'{option}={value}')}"


def _common_directives(opts: SubmitOptions) -> list[str]:
    lines = [_directive("--chdir", str(Path(opts.workdir).absolute()))]
    if opts.partition:
        lines.append(_directive("--partition", opts.partition))
    if opts.account:
        lines.append(_directive("--account", opts.account))
    if opts.time_limit:
        lines.append(_directive("--time", opts.time_limit))
    return lines


def _header(what: str) -> list[str]:
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return [
        "#!/bin/bash",
        f"# {what}",
        f"# Generated by `rag-pipeline submit` at {stamp}; values are shell-quoted.",
    ]


def array_script(opts: SubmitOptions) -> str:
    """Text of the array batch script (see the module docstring).

    Raises:
        InputError: see :func:`validate` (called first).
    """
    validate(opts)
    n = opts.n_shards
    logs = opts.slurm_dir / "logs"
    lines = _header(f"Array task I of {n} runs shard I/{n} of the input into OUTPUT/shard-I-of-{n}.")
    throttle = f"%{opts.throttle}" if opts.throttle else ""
    lines += [
        _directive("--job-name", opts.job_name),
        _directive("--array", f"0-{n - 1}{throttle}"),
        _directive("--nodes", "1"),
        _directive("--ntasks", "1"),
        _directive("--requeue"),
        _directive("--signal", SIGNAL_SPEC),
        _directive("--open-mode", "append"),
        _directive("--output", _pattern(logs, "run-%A_%a.out")),
        _directive("--error", _pattern(logs, "run-%A_%a.err")),
    ]
    lines += _common_directives(opts)
    if opts.gpus_per_node > 0:
        lines.append(_directive("--gres", f"gpu:{opts.gpus_per_node}"))
    lines += [f"#SBATCH {shlex.quote(arg)}" for arg in opts.sbatch_args]
    task = shlex.join(opts.task_argv())
    extra = shlex.join(opts.run_options)
    lines += [
        "",
        "set -u",
        f'shard="${{SLURM_ARRAY_TASK_ID}}/{n}"',
        'task="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        *record_function(opts.slurm_dir / TASKS_DIR, "${SLURM_ARRAY_TASK_ID}", "${task}", "run-${task}"),
        "record running null",
        "requeued=0",
        'echo "rag-pipeline: task ${task} (job ${SLURM_JOB_ID}, restart ${SLURM_RESTART_COUNT:-0})'
        ' shard ${shard} on $(hostname) at $(date -Is)" >&2',
        "usr1=0",
        "child=",
        "# Slurm signals this shell (B:USR1) before the time limit: forward it to the run, requeue below.",
        'trap \'usr1=1; [ -n "$child" ] && kill -USR1 "$child" 2>/dev/null\' USR1',
        "# SIGTERM (scancel, requeue, preemption) reaches the run straight from Slurm; the shell just waits.",
        "trap ':' TERM",
        f'{task} --shard "$shard"{" " + extra if extra else ""} &',
        "child=$!",
        "rc=0",
        'wait "$child" || rc=$?',
        'while kill -0 "$child" 2>/dev/null; do rc=0; wait "$child" || rc=$?; done',
        'if [ "$usr1" = 1 ] && [ "$rc" -ne 0 ]; then',
        '  echo "rag-pipeline: SIGUSR1 (time limit near), run exited ${rc}: requeueing ${task}" >&2',
        '  requeued=1; record requeued "$rc"',
        '  scontrol requeue "$task"',
        f'elif [ "$rc" -eq {OUTAGE_EXIT} ]; then',
        "  # every endpoint was down for run.max_outage_s: committed rows are kept; try again later",
        f"  counter={shlex.quote(str(opts.slurm_dir / 'outages'))}/\"${{SLURM_ARRAY_TASK_ID}}\"",
        '  mkdir -p "$(dirname "$counter")" && echo "$(date -Is)" >> "$counter"',
        '  n=$(wc -l < "$counter")',
        f'  if [ "$n" -le {opts.outage_requeues} ]; then',
        f'    echo "rag-pipeline: endpoint outage (exit {OUTAGE_EXIT}), requeueing ${{task}} '
        f'(outage ${{n}} of at most {opts.outage_requeues})" >&2',
        '    requeued=1; record requeued "$rc"',
        '    scontrol requeue "$task"',
        "  else",
        f'    echo "rag-pipeline: endpoint outage (exit {OUTAGE_EXIT}) ${{n}} times: not requeueing ${{task}}; '
        'fix the endpoints and resubmit (committed rows are kept)" >&2',
        "  fi",
        "fi",
        'if [ "$requeued" = 0 ]; then',
        '  if [ "$rc" -eq 0 ]; then record done 0; else record failed "$rc"; fi',
        "fi",
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


def merge_script(opts: SubmitOptions) -> str:
    """Text of the merge batch script (submitted with ``--dependency=afterok:<array id>``).

    Raises:
        InputError: see :func:`validate` (called first).
    """
    validate(opts)
    logs = opts.slurm_dir / "logs"
    lines = _header("Merges the shards into OUTPUT.merged (beside OUTPUT) once every array task succeeded.")
    lines += [
        _directive("--job-name", f"{opts.job_name}-merge"),
        _directive("--nodes", "1"),
        _directive("--ntasks", "1"),
        _directive("--kill-on-invalid-dep", "yes"),
        _directive("--output", _pattern(logs, "merge-%j.out")),
        _directive("--error", _pattern(logs, "merge-%j.err")),
    ]
    lines += _common_directives(opts)
    argv = [opts.python, "-m", "pipeline", "merge", str(Path(opts.output_dir).absolute())]
    lines += ["", "set -u",
              *record_function(opts.slurm_dir / TASKS_DIR, MERGE_RECORD, "${SLURM_JOB_ID}", "merge-${SLURM_JOB_ID}"),
              "record running null",
              "rc=0",
              f"{shlex.join(argv)} || rc=$?",
              'if [ "$rc" -eq 0 ]; then record done 0; else record failed "$rc"; fi',
              'exit "$rc"', ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# submission


def sbatch(script: Path, extra_args: Sequence[str] = (), *, timeout_s: float = SBATCH_TIMEOUT_S) -> str:
    """Submit a batch script with ``sbatch --parsable`` and return the job id.

    Args:
        script: the batch script file.
        extra_args: options placed before the script (e.g. ``--dependency=afterok:12``).
        timeout_s: longest wait for sbatch, seconds.

    Returns:
        The job id (the part before ``;cluster`` in sbatch's parsable output).

    Raises:
        RunError: sbatch is not on PATH, cannot reach the controller, rejects the job, times out,
            or prints no job id.
    """
    exe = shutil.which("sbatch")
    if exe is None:
        raise RunError("sbatch not found on PATH: install the Slurm client tools or submit from a login node")
    cmd = [exe, "--parsable", *extra_args, str(script)]
    log.info("submitting: %s", shlex.join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise RunError(
            f"sbatch did not answer within {timeout_s:.0f} s (is the Slurm controller overloaded?)"
        ) from None
    except OSError as exc:
        raise RunError(f"cannot run sbatch ({exe}): {exc}") from None
    err = " ".join(line.strip() for line in proc.stderr.strip().splitlines()[-2:])
    if proc.returncode != 0:
        if "Unable to contact slurm controller" in proc.stderr:
            conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
            raise RunError(
                f"sbatch could not reach the Slurm controller ({err}); check that slurmctld is running "
                f"and that SLURM_CONF ({conf}) points to it"
            )
        raise RunError(f"sbatch rejected {script.name} (exit {proc.returncode}): {err or 'no message'}")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise RunError(f"sbatch printed no job id for {script.name}: {proc.stdout.strip()!r} {err}")
    return job_id


def submit(
    opts: SubmitOptions, *, dry_run: bool = False, timeout_s: float = SBATCH_TIMEOUT_S
) -> SubmitResult:
    """Write the two batch scripts and submit them (array, then merge with ``afterok`` on the array).

    Args:
        opts: what to submit.
        dry_run: only build the script texts; write and submit nothing.
        timeout_s: longest wait for each sbatch call, seconds.

    Returns:
        The scripts, where they were written and the two job ids.

    Raises:
        InputError: invalid options (:func:`validate`).
        RunError: sbatch missing, controller unreachable, a job rejected; if only the merge submission
            fails, the message names the array job already submitted.
        OSError: the output directory is not writable.
    """
    a_text, m_text = array_script(opts), merge_script(opts)
    if dry_run:
        return SubmitResult(a_text, m_text)
    migrate(opts.output_dir)  # a root an earlier version submitted: its names into .rag-pipeline/
    sdir = opts.slurm_dir
    (sdir / "logs").mkdir(parents=True, exist_ok=True)
    a_path, m_path = sdir / "array.sbatch", sdir / "merge.sbatch"
    a_path.write_text(a_text)
    m_path.write_text(m_text)
    array_id = sbatch(a_path, timeout_s=timeout_s)
    try:
        merge_id = sbatch(m_path, [f"--dependency=afterok:{array_id}"], timeout_s=timeout_s)
    except RunError as exc:
        _record_submission(opts, array_id, None)
        raise RunError(
            f"array job {array_id} was submitted but the merge job was not: {exc}; "
            f"run `rag-pipeline merge {opts.output_dir}` once the array has finished"
        ) from None
    _record_submission(opts, array_id, merge_id)
    return SubmitResult(a_text, m_text, a_path, m_path, array_id, merge_id)


def _record_submission(opts: SubmitOptions, array_id: str, merge_id: str | None) -> None:
    """``.rag-pipeline/slurm/submit.json``: what `rag-pipeline status` needs to follow the jobs (pipeline.slurm.tasks)."""
    try:
        write_submit_record(opts.slurm_dir, {
            "array_job_id": array_id, "merge_job_id": merge_id, "n_shards": opts.n_shards,
            "merge_output": str(default_merge_dir(opts.output_dir)), "job_name": opts.job_name,
            "submitted": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        })
    except OSError as exc:
        log.warning("cannot write %s: %s (status shows the shards only)", opts.slurm_dir / "submit.json", exc)


__all__ = [
    "SubmitOptions",
    "SubmitResult",
    "array_script",
    "merge_script",
    "sbatch",
    "submit",
    "validate",
]
