"""TEST DOUBLE for ``python -m sglang.launch_server``: no GPU exists on the machines that run the tests.

It lets the tests run the managed SGLang path end to end (``servers.sglang_command``): it accepts SGLang's
command-line flags that the pool uses, with SGLang's names, aliases and types (checked against SGLang's own
parser by tests/test_sglang_managed.py; any other flag is rejected, exit 2, as argparse in SGLang does),
checks its ``CUDA_VISIBLE_DEVICES`` against ``--tp-size`` as SGLang needs ``tp_size`` visible GPUs, binds its
NCCL port (torch.distributed's store listens there) and then serves like the benchmark server
(bench/bench_server.py: ``/health``, ``/v1/models``, chat and completions after a fixed service time).
SIGTERM stops it (exit 0).

Behaviour per server, for tests, from environment variables (never read by the product):

- ``SGLANG_STANDIN_DIR``: directory receiving ``start-<gpus>-<n>.json`` per start (argv, the parsed flags,
  ``CUDA_VISIBLE_DEVICES``, the hub/cache variables, pid); also counts the starts of a server.
- ``SGLANG_STANDIN_PLAN``: JSON ``{"<CUDA_VISIBLE_DEVICES>": {"delay_s": 3, "exit_code": 1,
  "fail_starts": 1, "service_ms": 5}}``: ``delay_s`` before listening (a slow model load);
  ``exit_code`` makes every start exit with it after ``delay_s`` (a server that never starts);
  ``fail_starts`` makes the first N starts exit 1 (a server that starts on the retry).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.bench_server import BenchHTTPServer  # noqa: E402 - after the path setup above


def build_parser() -> argparse.ArgumentParser:
    """The SGLang flags the pool passes (names, aliases, types, defaults of SGLang 0.5.23's ServerArgs)."""
    p = argparse.ArgumentParser(prog="sglang_standin", description=__doc__.splitlines()[0])
    p.add_argument("--model-path", "--model", dest="model_path", type=str, required=True)
    p.add_argument("--host", type=str, default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1)
    p.add_argument("--nccl-port", dest="nccl_port", type=int, default=None)
    p.add_argument("--mem-fraction-static", dest="mem_fraction_static", type=float, default=None)
    p.add_argument("--base-gpu-id", dest="base_gpu_id", type=int, default=0)
    p.add_argument("--enable-metrics", dest="enable_metrics", action="store_true")
    p.add_argument("--enable-deterministic-inference", dest="enable_deterministic_inference", action="store_true")
    return p


HUB_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    plan = json.loads(os.environ.get("SGLANG_STANDIN_PLAN") or "{}").get(gpus, {})
    record_dir = Path(os.environ.get("SGLANG_STANDIN_DIR") or ".")
    record_dir.mkdir(parents=True, exist_ok=True)
    start_no = len(list(record_dir.glob(f"start-{gpus}-*.json"))) + 1
    record = {"argv": argv, "args": vars(args), "CUDA_VISIBLE_DEVICES": gpus, "pid": os.getpid(),
              "start": start_no, "env": {k: os.environ[k] for k in HUB_VARS if k in os.environ}}
    (record_dir / f"start-{gpus}-{start_no}.json").write_text(json.dumps(record))
    print(f"[standin] start {start_no} on GPUs {gpus!r}: {' '.join(argv)}", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    visible = [g for g in gpus.split(",") if g.strip()]
    if len(visible) < args.tp_size:
        print(f"RuntimeError: tp_size={args.tp_size} needs {args.tp_size} GPUs, CUDA_VISIBLE_DEVICES={gpus!r}",
              flush=True)
        return 1
    if args.mem_fraction_static is not None and not 0 < args.mem_fraction_static < 1:
        print(f"ValueError: mem_fraction_static={args.mem_fraction_static}", flush=True)
        return 1
    nccl = None
    if args.nccl_port is not None:  # the torch.distributed store of rank 0 listens on the NCCL port
        nccl = socket.socket()
        try:
            nccl.bind((args.host, args.nccl_port))
        except OSError as exc:
            print(f"RuntimeError: NCCL port {args.nccl_port}: {exc}", flush=True)
            return 1
        nccl.listen()
    if stop.wait(float(plan.get("delay_s", 0))):  # loading the model
        return 0
    if "exit_code" in plan or start_no <= int(plan.get("fail_starts", 0)):
        print("RuntimeError: stand-in told to fail this start", flush=True)
        return int(plan.get("exit_code", 1))
    try:
        server = BenchHTTPServer((args.host, args.port), float(plan.get("service_ms", 5)) / 1000, 64)
    except OSError as exc:
        print(f"ERROR: [Errno {exc.errno}] error while attempting to bind on address: {exc.strerror}", flush=True)
        return 1
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    print(f"[standin] serving on http://{args.host}:{args.port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    if nccl is not None:
        nccl.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
