"""`status` of a submitted root from the tasks' own records and the queue (pipeline.slurm.tasks), without Slurm:
the queue is given as squeue would report it, the records as the batch scripts write them."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cli.results import TASK_LINES, format_slurm
from pipeline.slurm.tasks import is_slurm_root, slurm_status, write_submit_record


def _root(tmp_path: Path, n: int, records: dict[str, dict]) -> Path:
    root = tmp_path / "out"
    write_submit_record(root / ".rag-pipeline/slurm", {"array_job_id": "41", "merge_job_id": "42", "n_shards": n,
                                          "merge_output": str(tmp_path / "out.merged")})
    tasks = root / ".rag-pipeline/slurm" / "tasks"
    tasks.mkdir(parents=True)
    for name, rec in records.items():
        job = "42" if name == "merge" else f"41_{name}"
        stem = f"merge-{job}" if name == "merge" else f"run-{job}"
        (tasks / f"{name}.json").write_text(json.dumps({"name": name, "job": job, "restart": 0, "host": "node3",
                                                        "at": "2026-12-03T17:00:00+00:00", "log_out": f"{stem}.out",
                                                        "log_err": f"{stem}.err", **rec}))
    (tasks / ".4.json.tmp").write_text("{half")  # a record being written: not read
    return root


def test_each_task_from_the_queue_or_its_record(tmp_path: Path) -> None:
    root = _root(tmp_path, 6, {"0": {"state": "done", "exit_code": 0}, "1": {"state": "failed", "exit_code": 4},
                               "2": {"state": "running", "exit_code": None},
                               "3": {"state": "failed", "exit_code": 130}})
    assert is_slurm_root(root)
    # task 3 was requeued by Slurm after its failure record: the queue wins; task 2's node was lost
    queue = {"41_3": ("PENDING", "BeginTime"), "41_5": ("PENDING", "JobArrayTaskLimit"), "99_0": ("RUNNING", "None")}
    st = slurm_status(root, queue=queue)
    by = {t["index"]: t for t in st["tasks"]}
    assert [by[i]["state"] for i in range(6)] == ["done", "failed", "lost", "pending", "not started", "pending"]
    assert by[1]["exit_code"] == 4 and by[1]["log_err"] == str(root / ".rag-pipeline/slurm" / "logs" / "run-41_1.err")
    assert by[5]["reason"] == "JobArrayTaskLimit" and by[4]["log_err"].endswith("run-41_4.err")
    assert st["failed"] == [1, 2]
    assert st["merge"]["state"] == "cancelled" and "task(s) 1, 2 failed" in st["merge"]["reason"]
    text = "\n".join(format_slurm(st))
    assert "task 1 (41_1): failed, exit 4 on node3 at 2026-12-03T17:00:00+00:00; log " + by[1]["log_err"] in text
    assert "task 2 (41_2): lost (no longer queued" in text and "task 5 (41_5): pending (JobArrayTaskLimit)" in text
    assert f"merge (42): cancelled (task(s) 1, 2 failed: its afterok dependency can never be met) -> " \
           f"{tmp_path / 'out.merged'}" in text


def test_without_squeue_the_records_say_what_they_know(tmp_path: Path, monkeypatch) -> None:
    import pipeline.slurm.tasks as tasks

    root = _root(tmp_path, 2, {"0": {"state": "running", "exit_code": None}, "merge": {"state": "done",
                                                                                       "exit_code": 0}})
    st = slurm_status(root, queue={})  # an empty queue: every job left it
    assert [t["state"] for t in st["tasks"]] == ["lost", "not started"]
    monkeypatch.setattr(tasks, "squeue_states", lambda *a, **k: None)  # squeue missing or failing
    st = slurm_status(root)
    assert st["queue_known"] is False
    assert [t["state"] for t in st["tasks"]] == ["running", "unknown (squeue unavailable, no record)"]
    assert st["merge"]["state"] == "done"
    assert "squeue unavailable" in format_slurm(st)[0]


def test_a_long_array_is_summed_up(tmp_path: Path) -> None:
    n = TASK_LINES + 30
    root = _root(tmp_path, n, {str(i): {"state": "done", "exit_code": 0} for i in range(n - 2)})
    lines = format_slurm(slurm_status(root, queue={f"41_{n - 2}": ("RUNNING", "None")}))
    assert lines[1] == f"  tasks: done={n - 2}  not started=1  running=1"
    assert sum(1 for x in lines if x.startswith("  task ")) == 2
