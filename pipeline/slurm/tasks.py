"""What became of each array task and of the merge job: their own records, and `squeue` while they are queued.

A Slurm without accounting (no ``sacct``) forgets a finished job a few minutes after it ends, and a task that
failed before writing anything leaves no shard directory. So the batch scripts record each task themselves, in
``OUTPUT/.rag-pipeline/slurm/tasks/I.json`` (the merge job in ``merge.json``), replaced atomically (written to ``.I.json.tmp``,
then renamed): ``{"state": "running", "exit_code": null}`` when the task starts, and when it ends ``done``
(exit 0), ``failed`` (its exit code) or ``requeued`` (the script requeued it: time limit near, endpoint outage),
with the task's job id, restart count, host, time (ISO 8601) and its log files (names under
``OUTPUT/.rag-pipeline/slurm/logs``). ``submit`` writes ``OUTPUT/.rag-pipeline/slurm/submit.json`` (the job ids, the shard count, the
merge output).

:func:`slurm_status` joins them: `squeue` (``--me``, one line per array task) says which tasks are pending or
running now; a task no longer queued is what its record says; a task with neither was never started. A task whose
last record says ``running`` but that is no longer queued ended without writing its end (killed with SIGKILL, its
node lost): ``lost``.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pipeline.output.layout import SLURM_DIR, locate

log = logging.getLogger(__name__)

TASKS_DIR = "tasks"
SUBMIT_FILE = "submit.json"
MERGE_RECORD = "merge"
SQUEUE_TIMEOUT_S = 20.0


def record_function(tasks_dir: Path, name: str, job: str, log_stem: str) -> list[str]:
    """Lines of a bash function ``record STATE EXIT_CODE`` that replaces ``tasks_dir/NAME.json`` atomically.

    Args:
        tasks_dir: ``OUTPUT/.rag-pipeline/slurm/tasks`` (shell-quoted into the script).
        name: the record's file stem, a shell word such as ``${SLURM_ARRAY_TASK_ID}`` or ``merge``.
        job: the job id as a shell word, e.g. ``${task}``.
        log_stem: the log file name without ``.out``/``.err``, as a shell word, e.g. ``run-${task}``.
    """
    fmt = ('{"name": "%s", "job": "%s", "state": "%s", "exit_code": %s, "restart": %s, "host": "%s", '
           '"at": "%s", "log_out": "%s", "log_err": "%s"}\\n')
    return [
        f"tasks_dir={shlex.quote(str(tasks_dir))}",
        "# this task's record (pipeline/slurm/tasks.py): written to a hidden file, then renamed into place",
        "record() {",
        '  mkdir -p "$tasks_dir" || return 0',
        f'  tmp="$tasks_dir/.{name}.json.tmp"',
        f"  printf '{fmt}' \\",
        f'    "{name}" "{job}" "$1" "$2" "${{SLURM_RESTART_COUNT:-0}}" "$(hostname)" "$(date -Is)" '
        f'"{log_stem}.out" "{log_stem}.err" > "$tmp" && mv -f "$tmp" "$tasks_dir/{name}.json"',
        "}",
    ]


def write_submit_record(slurm_dir: Path, info: dict[str, Any]) -> None:
    """Write ``slurm_dir/submit.json`` (atomically).

    Raises:
        OSError: the directory is not writable.
    """
    from pipeline.output.files import atomic_write_json

    Path(slurm_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(slurm_dir) / SUBMIT_FILE, info)


def is_slurm_root(root: str | Path) -> bool:
    """True if ``root`` was submitted by ``rag-pipeline submit`` (it holds ``.rag-pipeline/slurm/submit.json``)."""
    return (locate(root, SLURM_DIR) / SUBMIT_FILE).is_file()


def read_records(root: str | Path) -> dict[str, dict[str, Any]]:
    """The task records of ``root`` by name (``"0"``, ``"1"``, ..., ``"merge"``); unreadable ones are left out
    (a record is replaced atomically, so only a foreign file can be unreadable)."""
    out: dict[str, dict[str, Any]] = {}
    d = locate(root, SLURM_DIR) / TASKS_DIR
    if not d.is_dir():
        return out
    for p in d.glob("*.json"):
        if p.name.startswith("."):
            continue
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            log.warning("%s: not a task record; ignored", p)
            continue
        if isinstance(rec, dict):
            out[p.stem] = rec
    return out


def squeue_states(timeout_s: float = SQUEUE_TIMEOUT_S) -> dict[str, tuple[str, str]] | None:
    """``{job id: (STATE, reason)}`` of this user's queued jobs, one entry per array task (``123_4``), from
    ``squeue -h -r --me``; None when squeue is missing or fails (the states are unknown then)."""
    exe = shutil.which("squeue")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "-h", "-r", "--me", "-o", "%i|%T|%r"], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("squeue failed: %s", exc)
        return None
    if proc.returncode != 0:
        log.warning("squeue failed (exit %d): %s", proc.returncode, proc.stderr.strip()[-300:])
        return None
    out: dict[str, tuple[str, str]] = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


def _entry(rec: dict[str, Any] | None, queued: tuple[str, str] | None, queue_known: bool, logs: Path,
           log_stem: str) -> dict[str, Any]:
    """One task's (or the merge job's) status from its record and its queue line."""
    out: dict[str, Any] = {"state": "unknown", "exit_code": None, "reason": None, "host": None, "at": None,
                           "restart": None, "log_out": str(logs / f"{log_stem}.out"),
                           "log_err": str(logs / f"{log_stem}.err")}
    if rec:
        out.update(state=rec.get("state") or "unknown", exit_code=rec.get("exit_code"), host=rec.get("host"),
                   at=rec.get("at"), restart=rec.get("restart"))
        for key in ("log_out", "log_err"):
            if rec.get(key):
                out[key] = str(logs / str(rec[key]))
    if queued is not None:
        state, reason = queued
        out["state"] = state.lower()
        out["reason"] = None if reason in ("None", "") else reason
    elif rec is None:
        out["state"] = "not started" if queue_known else "unknown (squeue unavailable, no record)"
    elif queue_known and out["state"] == "running":
        out["state"] = "lost"
        out["reason"] = "no longer queued and ended without a record (killed, or its node lost)"
    return out


def slurm_status(root: str | Path, queue: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """The Slurm side of a submitted output root (see the module docstring).

    Args:
        root: the output root given to ``submit``.
        queue: :func:`squeue_states` (default: asked now).

    Returns:
        ``{"array_job_id", "merge_job_id", "n_shards", "merge_output", "queue_known": bool, "tasks": [{"index",
        "job", "state", "exit_code", "reason", "host", "at", "restart", "log_out", "log_err"}...], "merge": {...
        same keys}, "failed": [index...]}``; ``state`` is ``pending``/``running`` (from squeue, with its
        ``reason``), ``done``, ``failed``, ``requeued`` (from the record), ``lost`` or ``not started``; the merge
        job whose tasks failed and that is no longer queued is ``cancelled`` (its dependency can never be
        satisfied).

    Raises:
        InputError: ``root`` holds no ``.rag-pipeline/slurm/submit.json``.
    """
    from pipeline.errors import InputError
    from pipeline.output.files import read_json

    r = Path(root)
    sdir = locate(r, SLURM_DIR)
    info = read_json(sdir / SUBMIT_FILE, "Slurm submission record")
    if "array_job_id" not in info:
        raise InputError(f"{sdir / SUBMIT_FILE}: no array_job_id")
    if queue is None:
        queue = squeue_states()
    known = queue is not None
    queue = queue or {}
    records = read_records(r)
    logs = sdir / "logs"
    array_id = str(info["array_job_id"])
    n = int(info.get("n_shards") or 0)
    tasks = []
    for i in range(n):
        job = f"{array_id}_{i}"
        st = _entry(records.get(str(i)), queue.get(job), known, logs, f"run-{job}")
        tasks.append({"index": i, "job": job, **st})
    merge_id = info.get("merge_job_id")
    failed = [t["index"] for t in tasks if t["state"] in ("failed", "lost")]
    merge: dict[str, Any] | None = None
    if merge_id:
        merge = {"job": str(merge_id), **_entry(records.get(MERGE_RECORD), queue.get(str(merge_id)), known, logs,
                                                f"merge-{merge_id}")}
        if merge["state"] == "not started" and failed:
            merge["state"] = "cancelled"
            merge["reason"] = f"task(s) {', '.join(map(str, failed))} failed: its afterok dependency can never be met"
    return {"array_job_id": array_id, "merge_job_id": merge_id, "n_shards": n,
            "merge_output": info.get("merge_output"), "queue_known": known, "tasks": tasks, "merge": merge,
            "failed": failed}


__all__ = ["is_slurm_root", "read_records", "record_function", "slurm_status", "squeue_states",
           "write_submit_record"]
