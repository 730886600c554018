"""The unit tier starts no process and loads no model: both are refused here, so a test that needs them fails
loudly and belongs in the suite with the real components (tests/)."""

from __future__ import annotations

import multiprocessing.process
import subprocess
import sys

import pytest

HEAVY = ("torch", "sentence_transformers", "chromadb")


@pytest.fixture(autouse=True)
def _no_processes(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("the unit tier starts no process: move this test to tests/")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    yield
    loaded = [m for m in HEAVY if m in sys.modules]
    assert not loaded, f"the unit tier loads no model or store library: {loaded} imported"
