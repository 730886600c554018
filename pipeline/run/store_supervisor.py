"""Supervision of the run's own Chroma server (``store.shared``): restarts it on its port when it dies."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline.errors import StoreError

log = logging.getLogger(__name__)

STORE_RESTARTS = 3
"""Failed restarts in a row of the run's shared Chroma server before the run stops (exit 4)."""


class StoreSupervisor:
    """Watches a :class:`pipeline.store.server.StoreServer` and restarts it after it died.

    The restarts run in ONE long-lived thread: the server is started with PR_SET_PDEATHSIG, which Linux
    delivers when the *thread* that started it exits (a thread per restart would kill the new server at once).

    Args:
        server: the started store server.
        stopping: returns True once the run stops (no restart then; an ongoing start is aborted).
    """

    def __init__(self, server: Any, stopping: Callable[[], bool]) -> None:
        self.server = server
        self._run_stopping = stopping
        self._closed = False
        self._restarting = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarted_at = float("-inf")
        self.failed_restarts = 0

    def _stopping(self) -> bool:
        return self._closed or self._run_stopping()

    def down(self) -> bool:
        """The server is dead or being restarted."""
        return self._restarting.is_set() or not self.server.alive()

    def watch(self) -> None:
        """Called once per scheduling tick: if the server died, have the restart thread start it again.

        Raises:
            StoreError: ``STORE_RESTARTS`` restarts in a row failed (the run stops, resumable).
        """
        s = self.server
        if self._stopping() or self._restarting.is_set() or s.alive():
            return
        if self.failed_restarts >= STORE_RESTARTS:
            raise StoreError(f"the run's Chroma server {s.url} could not be restarted ({STORE_RESTARTS} attempts); "
                             f"see {s.log_path}")
        log.warning("the run's Chroma server %s exited (%s): restarting it; RAG dispatch paused", s.url,
                    s.proc.returncode if s.proc is not None else "?")
        self._restarting.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._restarter, name="store-restart", daemon=True)
            self._thread.start()

    def _restarter(self) -> None:
        s = self.server
        while True:
            self._restarting.wait()
            try:
                s.start(abort=self._stopping)
            except Exception as exc:  # noqa: BLE001 - logged; the main loop tries again or stops the run
                self.failed_restarts += 1
                log.error("restarting the run's Chroma server failed (%d of %d): %s", self.failed_restarts,
                          STORE_RESTARTS, exc)
            else:
                self.failed_restarts = 0
                self.restarted_at = time.monotonic()
                log.warning("the run's Chroma server %s is back", s.url)
            self._restarting.clear()

    def stop(self) -> None:
        """Stop the server (after the RAG workers, its only clients); a restart in progress is aborted."""
        self._closed = True
        self.server.stop()
