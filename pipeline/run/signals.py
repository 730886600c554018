"""Stop signals of the main process: the first asks for a graceful stop, the second forces it."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class StopSignals:
    """First SIGINT/SIGTERM/SIGUSR1: stop feeding and drain within the grace period. Second: stop now.

    Attributes:
        count: signals received so far.
        first_at: monotonic time of the first one, or None.
        name: name of the last one (``SIGTERM``...), "" before any.
        on_first: called once, inside the handler, at the first signal (e.g. freeze server restarts).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.count = 0
        self.first_at: float | None = None
        self.name = ""
        self.on_first: Callable[[], None] | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        self.count += 1
        self.name = signal.Signals(signum).name
        if self.first_at is None:
            self.first_at = time.monotonic()
            if self.on_first is not None:
                self.on_first()
            log.warning("%s received: finishing in-flight records, then stopping (again to force)", self.name)
        else:
            log.warning("%s received again: stopping now", self.name)

    def install(self) -> None:
        """Install the handlers (main thread only)."""
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handler)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
