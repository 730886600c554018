"""Shared pytest fixtures. Feature fixtures live in tests/fixtures/*.py and are loaded as plugins."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

pytest_plugins = [
    "tests.fixtures.store",
    "tests.fixtures.llm",
    "tests.fixtures.slurm",
]
