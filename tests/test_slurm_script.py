"""`rag-pipeline submit`: batch script content, shell quoting, validation and sbatch failures.

The scripts are executed by the real bash here; their submission to a real Slurm is in test_slurm_real.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import InputError, RunError
from pipeline.output import OutputDir, input_fingerprint, shard_dir
from pipeline.slurm.submit import SubmitOptions, array_script, merge_script, submit

PY = str(Path(sys.executable).absolute())
HOSTILE = "a b $(touch PWNED) `touch PWNED2` it's \"q\" ;x"


@pytest.fixture
def inp(tmp_path: Path) -> Path:
    p = tmp_path / "records.jsonl"
    p.write_text('{"id": 1, "query": "q"}\n{"id": 2, "query": "r"}\n')
    return p


STORE = ("--chroma-url", "http://storehost:8000", "--", "--collection", "docs")
"""What every task's run retrieves from (a store and a collection must be named: no default)."""


@pytest.fixture(scope="module")
def real_store(tmp_path_factory) -> tuple[str, ...]:
    """Run options naming a real (empty) Chroma store with collection "docs": what a submission that passes the
    preflight needs (the store and its collection exist)."""
    import chromadb

    path = tmp_path_factory.mktemp("store")
    client = chromadb.PersistentClient(path=str(path))
    client.create_collection("docs")
    del client
    return ("--", "--store", str(path), "--collection", "docs")


def _submit(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, ["submit", *args], env=env)


def test_dry_run_prints_both_scripts_and_writes_nothing(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "out"
    res = _submit(
        "--input", str(inp), "--output", str(out), "--nodes", "3", "--gpus-per-node", "8",
        "--partition", "gpu", "--time", "12:00:00", "--account", "proj1",
        "--sbatch-arg=--mem=64G", "--sbatch-arg", "--exclusive", "--chroma-url", "http://node7:8000",
        "--dry-run", "--", "--limit", "6", "--num_processes", "16", "--collection", "docs",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    text = res.output
    array, merge = text.split(f"# ---- {out / '.rag-pipeline/slurm' / 'merge.sbatch'}")
    for line in [
        "#SBATCH --array=0-2",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --gres=gpu:8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=12:00:00",
        "#SBATCH --account=proj1",
        "#SBATCH --mem=64G",
        "#SBATCH --exclusive",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={out}/.rag-pipeline/slurm/logs/run-%A_%a.out",
        f"#SBATCH --error={out}/.rag-pipeline/slurm/logs/run-%A_%a.err",
        'shard="${SLURM_ARRAY_TASK_ID}/3"',
        f"{PY} -m pipeline run --input {inp} --output {out} --chroma-url http://node7:8000 "
        '--shard "$shard" --limit 6 --num_processes 16 --collection docs &',
        'scontrol requeue "$task"',
    ]:
        assert line in [x.strip() for x in array.splitlines()], line
    assert array.splitlines()[1].startswith("#!/bin/bash")
    for line in [
        "#SBATCH --kill-on-invalid-dep=yes",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj1",
        f"#SBATCH --output={out}/.rag-pipeline/slurm/logs/merge-%j.out",
        f"{PY} -m pipeline merge {out} || rc=$?",
    ]:
        assert line in merge.splitlines(), line
    assert "--gres" not in merge and "--mem=64G" not in merge  # array-only options
    assert "afterok:<array job id>" in merge.splitlines()[0]
    assert not out.exists()


def test_no_gres_without_gpus_and_scripts_are_valid_bash(tmp_path: Path, inp: Path) -> None:
    opts = SubmitOptions(input_path=inp, output_dir=tmp_path / "out", nodes=1)
    a, m = array_script(opts), merge_script(opts)
    assert "--gres" not in a and "#SBATCH --array=0-0" in a
    for text in (a, m):
        script = tmp_path / "s.sh"
        script.write_text(text)
        subprocess.run(["bash", "-n", str(script)], check=True)


_ARGV_DUMP = textwrap.dedent(
    """
    import json, os, sys
    with open(os.environ["ARGV_OUT"], "w") as fh:
        json.dump(sys.argv[1:], fh)
    """
)


def test_hostile_paths_and_options_are_quoted(tmp_path: Path) -> None:
    """Run the generated script with bash: the task gets every value verbatim and nothing executes."""
    hostile_dir = tmp_path / HOSTILE
    hostile_dir.mkdir()
    inp = hostile_dir / "in put.jsonl"
    inp.write_text('{"id": 1, "query": "q"}\n')
    out = hostile_dir / "out"
    dump = tmp_path / "dump.py"
    dump.write_text(_ARGV_DUMP)
    opts = SubmitOptions(
        input_path=inp,
        output_dir=out,
        nodes=4,
        partition="p1",
        sbatch_args=(f"--comment={HOSTILE}",),
        run_options=("--config", HOSTILE, f"--model={HOSTILE}"),
        chroma_url="http://h:1/$(touch PWNED3)",
        run_command=(PY, str(dump)),
        workdir=tmp_path,
    )
    script = tmp_path / "array.sbatch"
    script.write_text(array_script(opts))
    env = {
        **os.environ,
        "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_ARRAY_JOB_ID": "70",
        "SLURM_JOB_ID": "72",
        "ARGV_OUT": str(tmp_path / "argv.json"),
    }
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "task 70_2 (job 72, restart 0) shard 2/4" in r.stderr
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv == [
        "--input", str(inp), "--output", str(out), "--chroma-url", "http://h:1/$(touch PWNED3)",
        "--shard", "2/4", "--config", HOSTILE, f"--model={HOSTILE}",
    ]  # fmt: skip
    # the #SBATCH lines are shlex-quoted as sbatch parses them
    assert f"#SBATCH '--comment={HOSTILE}'".replace("'s", "'\"'\"'s") in script.read_text()
    merge = tmp_path / "merge.sbatch"
    merge.write_text(merge_script(opts))
    subprocess.run(["bash", "-n", str(merge)], check=True)
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "--nodes 0: must be >= 1"),
        (["--nodes", "2", "--gpus-per-node", "-1"], "--gpus-per-node -1: must be >= 0"),
        (["--nodes", "2", "--time", "tomorrow"], "--time 'tomorrow': expected HH:MM:SS"),
        (["--nodes", "2", "--partition", "a b"], "--partition 'a b': letters, digits"),
        (["--nodes", "2", "--sbatch-arg", "mem=1G"], "--sbatch-arg 'mem=1G': expected an sbatch option"),
        (["--nodes", "2", "--sbatch-arg", "--array=0-9"], "submit sets this option itself"),
        (["--nodes", "2", "--chroma-url", "node7:8000"], "--chroma-url 'node7:8000': expected http://host:port"),
        (["--nodes", "2", "--", "--shard", "0/2"], "run option '--shard': submit sets --shard itself"),
        (["--nodes", "2", "--", "--output=x"], "submit sets --output itself"),
    ],
)
def test_bad_submit_options_are_one_line_errors(tmp_path: Path, inp: Path, args: list[str], message: str) -> None:
    res = _submit("--input", str(inp), "--output", str(tmp_path / "out"), "--dry-run", *args)
    assert res.exit_code == InputError.exit_code, res.output
    assert res.output.startswith("Error: ") and message in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_missing_input_and_shards_of_another_n_are_refused(tmp_path: Path, inp: Path) -> None:
    res = _submit("--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o"), "--nodes", "2")
    assert res.exit_code == 2 and "nope.jsonl: file not found" in res.output
    out = tmp_path / "out"
    OutputDir(shard_dir(out, 0, 3)).prepare(
        input_path=inp, fingerprint=input_fingerprint(inp), shard="0/3", total_records=1, config={}, overwrite=False
    )
    res = _submit("--input", str(inp), "--output", str(out), "--nodes", "2", "--dry-run")
    assert res.exit_code == 2
    assert "already holds shards of N=3" in res.output and "--nodes 3" in res.output


def test_bad_shard_forms_of_run_are_clear_errors(tmp_path: Path, inp: Path) -> None:
    if "run" not in main.list_commands(None):  # type: ignore[arg-type]
        pytest.skip("run command not registered yet")
    for spec, message in [("2/2", "0 <= I < N"), ("1-of-2", "expected I/N"), ("0/0", "N must be >= 1")]:
        res = CliRunner().invoke(
            main, ["run", "--input", str(inp), "--output", str(tmp_path / "o"), "--shard", spec, "--no-progress",
                   "--store", str(tmp_path / "store"), "--collection", "docs"]
        )
        assert res.exit_code == InputError.exit_code, res.output
        assert res.output.startswith(f"Error: --shard {spec!r}: ") and message in res.output


def test_sbatch_missing_is_a_clear_error(tmp_path: Path, inp: Path, real_store: tuple[str, ...]) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    res = _submit("--input", str(inp), "--output", str(tmp_path / "out"), "--nodes", "2", *real_store,
                  env={"PATH": str(empty_bin)})
    assert res.exit_code == RunError.exit_code
    assert res.output.strip() == (
        "Error: sbatch not found on PATH: install the Slurm client tools or submit from a login node"
    )


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="sbatch not installed")
def test_controller_unreachable_is_a_clear_error(tmp_path: Path, inp: Path, real_store: tuple[str, ...]) -> None:
    """A real sbatch against a slurm.conf whose controller port has no listener (fails after ~9 s)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=dead\nSlurmctldHost=localhost\nSlurmctldPort=1\nAuthType=auth/munge\n"
        f"AuthInfo=socket={tmp_path}/no-munge.socket\n"
        "NodeName=localhost CPUs=1\nPartitionName=debug Nodes=localhost Default=YES\n"
    )
    res = _submit(
        "--input", str(inp), "--output", str(tmp_path / "out"), "--nodes", "2", *real_store,
        env={"SLURM_CONF": str(conf)},
    )
    assert res.exit_code == RunError.exit_code, res.output
    assert "Error: sbatch could not reach the Slurm controller" in res.output
    assert "Unable to contact slurm controller" in res.output and f"SLURM_CONF ({conf})" in res.output
    assert len(res.output.strip().splitlines()) == 1
    # the scripts were written for inspection, nothing else
    assert (tmp_path / "out" / ".rag-pipeline/slurm" / "array.sbatch").exists()


@pytest.mark.parametrize(("args", "code", "message"), [
    ((), 4, "Error: the tasks' run, checked before submitting: no vector store named: pass --store DIR"),
    (("--chroma-url", "http://storehost:8000"), 4, "Error: the tasks' run, checked before submitting: no collection "
                                                   "named"),
    (("--", "--store", "s", "--collection", "c", "--bogus"), 2, "Error: run options '--store s --collection c "
                                                                  "--bogus': No such option '--bogus'"),
    (("--", "--store", "s", "--collection", "c", "--top-k", "0"), 2, "Error: command line: [retrieval] top_k: must be"),
])
def test_tasks_without_a_store_or_with_bad_run_options_are_refused_before_submitting(
    tmp_path: Path, inp: Path, args: tuple[str, ...], code: int, message: str
) -> None:
    out = tmp_path / "out"
    res = _submit("--input", str(inp), "--output", str(out), "--nodes", "2", *args)
    assert res.exit_code == code, res.output
    assert res.output.startswith(message) and len(res.output.strip().splitlines()) == 1, res.output
    assert not out.exists()  # nothing written, nothing submitted


def test_the_tasks_run_is_checked_before_anything_is_written_or_submitted(
    tmp_path: Path, inp: Path, real_store: tuple[str, ...]
) -> None:
    """The run's own checks (pipeline.run.required.preflight) on the real store and input: each refusal is one
    line with the run's exit code, and nothing is written (no sbatch is reached: PATH holds none)."""
    store = real_store[real_store.index("--store") + 1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "query": "q"}\n{"id": 2}\n')
    cases = [
        (["--input", str(inp), "--", "--store", store, "--collection", "nope"], 4,
         "collection 'nope' not found in"),
        (["--input", str(tmp_path / "missing" / "store"), *real_store], 2, "file not found"),
        (["--input", str(inp), "--", "--store", str(tmp_path / "nostore"), "--collection", "docs"], 4,
         "vector store not found"),
        (["--input", str(bad), *real_store], 2, "bad.jsonl:2: field 'query'"),
        (["--input", str(inp), *real_store, "--id-field", "doc"], 2, "doc"),
        (["--input", str(inp), *real_store, "--backend", "sglang"], 2, "[servers] model: required for the sglang"),
        (["--input", str(inp), *real_store, "--endpoints", "ftp://x"], 2, "is not an http(s)://host:port URL"),
    ]
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    for args, code, message in cases:
        out = tmp_path / "out"
        res = _submit("--output", str(out), "--nodes", "2", *args, env={"PATH": str(empty_bin)})
        assert res.exit_code == code, (args, res.output)
        assert res.output.startswith("Error: ") and message in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output
        assert "nothing submitted" in res.output or "file not found" in res.output, res.output
        assert not out.exists(), args  # nothing written, nothing submitted


def test_submit_result_of_a_dry_run_has_no_job_ids(tmp_path: Path, inp: Path) -> None:
    res = submit(SubmitOptions(input_path=inp, output_dir=tmp_path / "o", nodes=2), dry_run=True)
    assert res.array_job_id is None and res.merge_job_id is None
    assert "#SBATCH --array=0-1" in res.array_script and "merge" in res.merge_script


@pytest.mark.parametrize(
    ("args", "array", "shard"),
    [
        (["--nodes", "4", "--shards", "64"], "0-63%4", "/64"),  # more shards than nodes: throttle = nodes
        (["--shards", "10", "--max-concurrent", "3"], "0-9%3", "/10"),
        (["--shards", "8"], "0-7", "/8"),  # no --nodes: no throttle unless asked
        (["--nodes", "3"], "0-2", "/3"),  # the old form: one shard per node
    ],
)
def test_shards_and_max_concurrent_set_the_array_and_its_throttle(
    tmp_path: Path, inp: Path, args: list[str], array: str, shard: str
) -> None:
    res = _submit("--input", str(inp), "--output", str(tmp_path / "out"), "--dry-run", *args, *STORE)
    assert res.exit_code == 0, res.output
    lines = [x.strip() for x in res.output.splitlines()]
    assert f"#SBATCH --array={array}" in lines
    assert f'shard="${{SLURM_ARRAY_TASK_ID}}{shard}"' in lines


def test_bad_shards_options_and_resume_hint(tmp_path: Path, inp: Path) -> None:
    for args, message in [
        (["--shards", "-1", "--nodes", "2"], "--shards -1: must be >= 1"),
        (["--shards", "4", "--max-concurrent", "-2"], "--max-concurrent -2: must be >= 1"),
        ([], "--nodes 0: must be >= 1"),
    ]:
        res = _submit("--input", str(inp), "--output", str(tmp_path / "out"), "--dry-run", *args)
        assert res.exit_code == InputError.exit_code and message in res.output, res.output
    out = tmp_path / "out"
    OutputDir(shard_dir(out, 0, 16)).prepare(
        input_path=inp, fingerprint=input_fingerprint(inp), shard="0/16", total_records=1, config={}, overwrite=False
    )
    res = _submit("--input", str(inp), "--output", str(out), "--shards", "8", "--nodes", "2", "--dry-run")
    assert res.exit_code == 2 and "--shards 16 to resume them" in res.output
