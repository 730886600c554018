"""Isolated result channels: a worker killed at any instruction, even half-way through sending a
message, or stopped mid-send, cannot block or corrupt the results of the other workers.

Real processes (spawn), real pipes, real SIGKILL/SIGSTOP; messages of 256 KiB, four times a pipe's buffer, so a
send is several write() calls and a kill lands inside one most of the time.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import signal
import time

from pipeline.run.channels import ChannelReader, open_channel
from workers.protocol import ResultChannel, start_heartbeat

PAYLOAD = 256 * 1024


def _writer(conn, name: str, n: int, parent_pid: int) -> None:
    chan = ResultChannel(conn)
    start_heartbeat(chan, name, 0.2, parent_pid)
    for i in range(n):
        chan.put(("RAG", name, [{"id": f"{name}-{i}", "blob": bytes([i % 256]) * PAYLOAD}]))
    time.sleep(30)  # stay alive, as a worker waiting for work


def _start(ctx, merged, name: str, n: int):
    read_end, write_end = open_channel(ctx)
    proc = ctx.Process(target=_writer, args=(write_end, name, n, os.getpid()), daemon=True)
    proc.start()
    write_end.close()
    reader = ChannelReader(read_end, name, merged)
    return proc, reader


def test_killed_or_stopped_writer_never_blocks_or_corrupts_the_others():
    seed = int(os.environ.get("RAG_PIPELINE_TEST_SEED", time.time()))
    rng = random.Random(seed)
    ctx = mp.get_context("spawn")
    merged: queue.Queue = queue.Queue()
    n_good = 40
    good = [_start(ctx, merged, f"good{i}", n_good) for i in range(2)]
    victims = [_start(ctx, merged, f"victim{i}", 10_000) for i in range(4)]
    stopped_proc, stopped_reader = _start(ctx, merged, "stopped", 10_000)
    procs = [p for p, _ in good + victims] + [stopped_proc]
    try:
        time.sleep(rng.uniform(0.5, 1.5))
        os.kill(stopped_proc.pid, signal.SIGSTOP)  # stopped mid-stream, very likely mid-send
        for p, _ in victims:
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(p.pid, signal.SIGKILL)  # killed mid-stream, very likely mid-send
        got: dict[str, list[int]] = {}
        ended: set[str] = set()
        deadline = time.monotonic() + 60
        while (any(len(got.get(f"good{i}", [])) < n_good for i in range(2)) or len(ended) < 4) \
                and time.monotonic() < deadline:
            try:
                tag, msg = merged.get(timeout=0.5)
            except queue.Empty:
                continue
            if msg is None:
                ended.add(tag)
                continue
            kind, name, payload = msg
            assert kind == "RAG" and name == tag
            (res,) = payload
            i = int(res["id"].rsplit("-", 1)[1])
            assert res["blob"] == bytes([i % 256]) * PAYLOAD, f"seed {seed}: torn message from {tag}"
            got.setdefault(tag, []).append(i)
        for i in range(2):
            assert got.get(f"good{i}") == list(range(n_good)), f"seed {seed}: good{i} results lost or reordered"
        assert ended == {f"victim{i}" for i in range(4)}, f"seed {seed}: killed writers' channels must end"
        for _, r in victims:
            assert r.closed.is_set()
        # the stopped writer sends nothing (no heartbeat either) but blocks nobody; killing it ends its channel
        seen = stopped_reader.last_seen
        time.sleep(1.0)
        assert stopped_reader.last_seen == seen and not stopped_reader.closed.is_set()
        os.kill(stopped_proc.pid, signal.SIGKILL)
        assert stopped_reader.closed.wait(10)
        # the good writers are alive and still heartbeating
        before = [r.last_seen for _, r in good]
        time.sleep(0.6)
        assert all(r.last_seen > b for (_, r), b in zip(good, before, strict=True))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
