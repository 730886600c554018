"""The cluster recipe on a real single-node Slurm (tests/fixtures/slurm.py): ingest on the shared filesystem, then
`submit`; each array task copies the store to its node and runs with nothing listening beyond the loopback.

A 2-shard job of the real `rag-pipeline run`: each task starts its own llama.cpp server (SmolLM2 on CPU), its
own Chroma server over the staged copy (`--store-shared on`) and its Prometheus endpoint (`--metrics-port 0`).
While the tasks run, the test reads the TCP sockets in LISTEN of every process of each run's tree with psutil:
all of them are on the loopback, and the three kinds of server were seen (so the check is not empty). The two
tasks share one staged copy (one copied it, the other found it), and the merged output holds each record once.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.output import read_rows, shard_dir
from pipeline.servers.process import is_loopback
from tests.fixtures.llm import LLAMA_MISSING
from tests.fixtures.slurm import SlurmCluster
from tests.fixtures.store import write_small_corpus

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "data" / "example" / "records.jsonl"


def _runs_of(out: Path) -> list[psutil.Process]:
    """The main processes of `rag-pipeline run` writing under ``out`` (not a child the run forked that has not
    exec'd its own program yet: it still shows the run's command line)."""
    found = []
    for p in psutil.process_iter(["cmdline", "ppid"]):
        cmd = p.info["cmdline"] or []
        if "run" in cmd and "--output" in cmd and str(out) in cmd and "pipeline" in cmd:
            found.append(p)
    pids = {p.pid for p in found}
    return [p for p in found if p.info["ppid"] not in pids]


def _listen(proc: psutil.Process) -> dict[tuple[str, int], str]:
    """``{(address, port): command}`` of the TCP sockets in LISTEN of ``proc`` and its descendants."""
    out = {}
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in tree:
        try:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out[(c.laddr.ip, c.laddr.port)] = " ".join(p.cmdline()[:4])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


@pytest.mark.skipif(bool(LLAMA_MISSING), reason=LLAMA_MISSING or "")
def test_two_shards_stage_the_store_and_listen_on_loopback_only(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    store = shared / "store"
    ing = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "ingest", str(write_small_corpus(tmp_path / "corpus")), "--store",
         str(store), "--collection", "nodelocal", "--chunk-chars", "0", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ing.returncode == 0, ing.stderr[-3000:]
    cheap = tmp_path / "cheap.toml"
    cheap.write_text('[generation]\nmax_tokens = 4\nnum_processes = 1\n[rag]\nmode = "retrieve"\ncontext_chars = 200\n'
                     "[retrieval]\ntop_k = 1\n[run]\npart_rows = 1\n[servers]\nn_threads = 1\nn_parallel = 2\n")
    out = tmp_path / "out"
    local = tmp_path / "node-local"  # stands for /tmp/rag-pipeline-stores-$USER on a compute node
    sub = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "submit", "--input", str(RECORDS), "--output", str(out), "--nodes", "2",
         "--job-name", "rag-test-nodelocal", "--store-local-dir", str(local),
         "--", "--store", str(store), "--collection", "nodelocal", "--config", str(cheap), "--limit", "6",
         "--backend", "llamacpp", "--cpu-servers", "1", "--store-shared", "on", "--metrics-port", "0", "--no-progress"],
        cwd=REPO, env=slurm_cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    merge_id = re.search(r"Submitted merge job (\d+)", sub.stdout).group(1)  # type: ignore[union-attr]

    seen: dict[int, dict[tuple[str, int], str]] = collections.defaultdict(dict)
    cmds: dict[int, str] = {}
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and slurm_cluster.state(merge_id) not in final:
        for run in _runs_of(out):
            seen[run.pid].update(_listen(run))
            cmds.setdefault(run.pid, " ".join(run.info["cmdline"]))
        time.sleep(0.2)
    state = slurm_cluster.state(merge_id)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((out / ".rag-pipeline/slurm" / "logs").glob("*")))
    assert state == "COMPLETED", f"merge job {state}\n{logs[-6000:]}"

    assert len(seen) >= 2, f"saw the process trees of {len(seen)} runs"
    everything = {addr: cmd for per_run in seen.values() for addr, cmd in per_run.items()}
    open_ = {addr: cmd for addr, cmd in everything.items() if not is_loopback(addr[0])}
    assert not open_, f"listeners beyond the loopback: {open_}"
    for pid, per_run in seen.items():  # each run's own servers were there to be checked
        kinds = " ".join(per_run.values())
        assert "cpu_server" in kinds and "chroma" in kinds and "pipeline" in kinds, (pid, per_run, cmds)

    manifests = [json.loads((shard_dir(out, i, 2) / ".rag-pipeline/manifest.json").read_text()) for i in range(2)]
    staged = [m["store"]["staged"] for m in manifests]
    assert staged[0]["path"] == staged[1]["path"] and Path(staged[0]["path"]).parent.parent == local
    assert sorted(s["copied"] for s in staged) == [False, True]  # one copy for the node
    assert staged[0]["source"] == str(store.resolve())
    assert all(m["store"]["mode"] == "shared" for m in manifests)

    ids = [i for s in range(2) for i in read_rows(shard_dir(out, s, 2), columns=["id"]).column("id").to_pylist()]
    expected = [json.loads(x)["id"] for x in RECORDS.read_text().splitlines()[:6]]
    assert sorted(ids) == sorted(str(i) for i in expected)  # every record once over the shards
