"""scripts/setup.sh installs system packages only for the tests: without RAG_PIPELINE_TEST_DEPS (`make run`,
`make setup`) it calls neither apt-get nor sudo; with it (`make test`, so CI) it installs the test-only packages,
through sudo only when not root. The script runs for real in a copy of the repository's setup files whose
package managers (apt-get, dpkg-query, sudo, id) and .venv interpreter are stand-ins that log their calls (a test
cannot install system packages); every Python step finds its package present, as on a machine already set up."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.runtools import REPO

TEST_PKGS = "slurm-wlm munge shellcheck gettext-base procps chromium chromium-driver openssl"

STUB = """#!/bin/bash
echo "{name} $*" >> "{log}"
{body}
"""


@pytest.fixture
def setup_copy(tmp_path):
    """``(run(env, uid) -> (rc, stderr, calls), repo)``: setup.sh in a copy with logging stand-ins."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", repo / "scripts")
    for req in (REPO / "scripts").glob("requirements-*.txt"):
        shutil.copy(req, repo / "scripts")
    shutil.copy(REPO / "pyproject.toml", repo)
    log = tmp_path / "calls.log"
    fake = tmp_path / "bin"
    fake.mkdir()

    def stub(path: Path, body: str = "exit 0") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(STUB.format(name=path.name, log=log, body=body))
        path.chmod(0o755)

    stub(repo / ".venv" / "bin" / "python")  # every "is it installed?" probe succeeds
    old = 1_000_000_000  # the requirement files older than the install stamps: nothing to reinstall
    for f in [repo / "pyproject.toml", *(repo / "scripts").glob("requirements-*.txt")]:
        os.utime(f, (old, old))
    (repo / ".venv" / ".rag-pipeline-installed").touch()
    (repo / ".venv" / "sglang-parser").mkdir()
    (repo / ".venv" / "sglang-parser" / ".installed").touch()
    stub(fake / "apt-get")
    stub(fake / "dpkg-query", "exit 1")  # nothing installed
    stub(fake / "sudo", 'exec "$@"')

    def run(env: dict[str, str], uid: int = 1000) -> tuple[int, str, list[str]]:
        stub(fake / "id", f'[ "$1" = -u ] && echo {uid}')
        log.write_text("")
        res = subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], capture_output=True, text=True,
                             timeout=60, env={"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path), **env})
        calls = [c for c in log.read_text().splitlines() if c.split()[0] != "python"]
        return res.returncode, res.stderr, calls

    return run


def test_without_test_deps_no_system_package_and_no_sudo(setup_copy):
    rc, err, calls = setup_copy({})
    assert rc == 0, err
    assert calls == [] and "[setup] ready: .venv" in err  # no dpkg-query, apt-get, sudo, not even id


def test_with_test_deps_the_test_packages_are_installed_with_sudo_when_not_root(setup_copy):
    rc, err, calls = setup_copy({"RAG_PIPELINE_TEST_DEPS": "1"})
    assert rc == 0, err
    assert f"sudo apt-get install -y -qq {TEST_PKGS}" in calls and "sudo apt-get update -qq" in calls
    assert f"apt-get install -y -qq {TEST_PKGS}" in calls  # sudo ran it
    assert f"installing test-only system packages: {TEST_PKGS}" in err

    rc, err, calls = setup_copy({"RAG_PIPELINE_TEST_DEPS": "1"}, uid=0)
    assert rc == 0, err
    assert f"apt-get install -y -qq {TEST_PKGS}" in calls and not any(c.startswith("sudo") for c in calls)

    rc, err, calls = setup_copy({"RAG_PIPELINE_TEST_DEPS": "1", "RAG_PIPELINE_SKIP_APT": "1"})
    assert rc == 0 and calls == [], (err, calls)


def test_make_run_sets_no_test_deps_and_make_test_does():
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    run = subprocess.run(["make", "-n", "run"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "bash scripts/setup.sh" in run.stdout, run.stderr
    assert "RAG_PIPELINE_TEST_DEPS" not in run.stdout and "sudo" not in run.stdout
    test = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "RAG_PIPELINE_TEST_DEPS=1 bash scripts/setup.sh" in test.stdout
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci  # so CI installs what the tests need
