"""Messages between the main process and its workers (plain tuples and dicts: cheap to pickle).

Main -> worker inbox: a list of work items, or ``None`` (the sentinel: finish in-flight work, then exit).
Worker -> main results queue:
    ("READY", worker_name, detail)       startup finished (rank0: the store is ready)
    ("ERROR", worker_name, traceback)    fatal error in the worker; traceback as formatted text
    ("RAG", worker_name, [rag_result])   one dict per record (see workers.rag_worker)
    ("GEN", worker_name, [gen_result])   one dict per record (see workers.generation)
"""

from __future__ import annotations

import os
import queue
import signal
from typing import Any

POLL_S = 0.5


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
