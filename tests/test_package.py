"""The package works when installed for real (non-editable) and run from any directory.

A wheel of the project is built and installed into a new virtual environment that borrows the third-party
dependencies of the test environment (a ``.pth`` line to its site-packages) but not the project's source tree
(the editable finder of the test environment is not loaded there). Then `run --input --output` and nothing else,
from an empty directory: the bundled default config, prompt templates and example corpus must be found inside the
installed package (pipeline/resources.py).
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

from tests.fixtures.llm import free_port_block, requires_llama
from tests.runtools import REPO, read_rows, write_records

pytestmark = [requires_llama, pytest.mark.slow]


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
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (target / "zz_test_deps.pth").write_text("\n".join(deps) + "\n")
    return env_dir / "bin" / "python"


def test_installed_package_has_no_source_tree_and_finds_its_files(installed_python, tmp_path):
    code = (
        "import json, pipeline, pipeline.config as c, pipeline.resources as r\n"
        "print(json.dumps({'pkg': pipeline.__file__, 'default': str(c.DEFAULT_CONFIG_FILE),"
        " 'prompt': str(r.resolve_bundled('configs/prompts/generate.txt')),"
        " 'corpus': str(r.resolve_bundled('data/example/corpus.jsonl'))}))\n"
    )
    res = subprocess.run([str(installed_python), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert not got["pkg"].startswith(str(REPO)), got  # really the installed copy
    for key in ("default", "prompt", "corpus"):
        assert "site-packages" in got[key] and Path(got[key]).is_file(), got


def test_installed_run_with_defaults_from_any_directory(installed_python, tmp_path):
    """`run --input --output` and nothing else (what `make run` does): CPU mode, a managed llama.cpp server,
    the bundled example corpus ingested into the default store because the collection is absent."""
    records = write_records(tmp_path, 2)
    env_cfg = tmp_path / "ports.toml"  # only to avoid a port clash with other tests; not a behaviour change
    env_cfg.write_text(f"[servers]\nbase_port = {free_port_block(1)}\n[run]\nlimit = 2\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    res = subprocess.run(
        [str(installed_python), "-m", "pipeline", "run", "--input", str(records), "--output", "out",
         "--config", str(env_cfg)],
        cwd=work, capture_output=True, text=True, timeout=900,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "is empty: ingesting" in res.stderr and "corpus.jsonl" in res.stderr
    assert (work / "data" / "store").is_dir()
    assert "[progress] 2/2 rows (100.0%)" in res.stderr and "\r" not in res.stderr  # stderr is not a terminal
    rows = read_rows(work / "out")
    assert len(rows) == 2 and all(r["gen_status"] == "ok" and r["contexts"] and r["generation"] for r in rows)
