"""Messages between the main process and its workers (plain tuples and dicts: cheap to pickle).

Main -> worker inbox: a list of work items, or ``None`` (the sentinel: finish in-flight work, then exit).
Worker -> main: the worker's own result pipe (:class:`ResultChannel`; pipeline.run.channels reads it):
    ("HB", worker_name, None)            heartbeat every ``run.heartbeat_interval_s`` (not forwarded)
    ("READY", worker_name, detail)       startup finished (rank0: the store is ready)
    ("ERROR", worker_name, traceback)    fatal error in the worker; traceback as formatted text
    ("RAG", worker_name, [rag_result])   one dict per record (see workers.rag_worker)
    ("GEN", worker_name, [gen_result])   one dict per record (see workers.generation)

A failed result carries ``retry_cause``: ``"llm"`` when its LLM request failed through no fault of the record
(:func:`pipeline.llm.outcome.retry_cause`: only retryable outcomes, no endpoint reachable, or overload),
``"store"`` for a vector-store error, None otherwise. Main decides from it whether the failure is the record's
(a failure row) or the run's (the record goes back to the queue, or stays uncommitted while the run stops).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from typing import Any

POLL_S = 0.5


class ResultChannel:
    """The worker's end of its result pipe: ``put(msg)`` sends one whole message, thread-safe.

    ``multiprocessing.connection.Connection.send`` is not safe from several threads at once (a RAG worker's LLM
    threads and a generation process's threads all report results), so sends are serialised by a lock.
    If main is gone (broken pipe) the process exits at once: nobody will read its results.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def put(self, msg: tuple) -> None:
        with self._lock:
            try:
                self.conn.send(msg)
            except (BrokenPipeError, EOFError, OSError):
                os._exit(0)


def start_heartbeat(chan: ResultChannel, name: str, interval_s: float, parent_pid: int) -> threading.Thread:
    """Send ``("HB", name, None)`` every ``interval_s`` seconds from a daemon thread; exit if main died.

    A worker that is alive but stopped (SIGSTOP) or frozen with the GIL held sends no heartbeat: main declares
    it hung after ``run.heartbeat_timeout_s`` and replaces it.
    """

    def beat() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            chan.put(("HB", name, None))
            time.sleep(interval_s)

    t = threading.Thread(target=beat, name=f"{name}-heartbeat", daemon=True)
    t.start()
    return t


def ignore_sigint() -> None:
    """Workers leave Ctrl-C, SIGTERM and SIGUSR1 to the parent, which coordinates shutdown (distilabel style).

    Ctrl-C reaches the whole foreground process group, and Slurm signals every process of a job on requeue or
    preemption: a worker that died on it would lose its in-flight records instead of finishing them in the grace
    period. The parent stops workers with the sentinel, then SIGKILL.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def get_work(inbox: Any, parent_pid: int) -> list | None:
    """Block until work or the sentinel (None) arrives.

    If the parent process died (kill -9 of main), exit the worker at once: nobody will read its results,
    and an orphan would keep its device and memory. The records it held are redone by the resumed run.
    """
    while True:
        try:
            return inbox.get(timeout=POLL_S)
        except queue.Empty:
            if os.getppid() != parent_pid:
                os._exit(0)
