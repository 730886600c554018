"""Endpoint health as the main process sees it: one owner, fed by probes and by the workers' reports.

Two sources feed it, and the scheduler reads only this object:

- **probes** (:class:`pipeline.servers.health.EndpointMonitor` in a thread): the orchestrator copies the monitor's
  ``{url: state}`` in through :meth:`pipeline.run.scheduler.Scheduler.observe_probes` once per scheduling tick.
  States are ``up``, ``down``, ``restarting``, ``failed`` (given up on). An endpoint never observed counts as up.
  An endpoint probed up after being seen otherwise is *back*: its report breaker closes at once.
- **worker reports**: each result lists the endpoints on which one of its attempts failed with a connection
  error, timeout or 5xx (``bad_endpoints``) and the endpoint that served it. ``llm.breaker_failures`` such
  reports in a row mark the endpoint unhealthy for ``llm.breaker_cooldown_s``; a result it served resets the
  count. This is the run-wide view of the per-process circuit breakers of the LLM clients.

Pure: no thread, socket or clock of its own (``now`` is passed in, monotonic seconds).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

UP = "up"
FAILED = "failed"


class EndpointHealth:
    """Probe states and report-based breakers of every LLM endpoint of a run.

    Args:
        breaker_failures: consecutive failure reports that open an endpoint's breaker (``llm.breaker_failures``).
        breaker_cooldown_s: how long an open breaker keeps generations away from the endpoint, seconds.
    """

    def __init__(self, breaker_failures: int, breaker_cooldown_s: float) -> None:
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_s = breaker_cooldown_s
        self._probes: dict[str, str] = {}
        self._bad_reports: collections.Counter[str] = collections.Counter()
        self._unhealthy_until: dict[str, float] = {}

    # -- probes -------------------------------------------------------------------------------
    def observe_probes(self, states: dict[str, str]) -> list[str]:
        """Replace the probe states of the endpoints in ``states`` (``{url: state}``).

        Returns:
            the endpoints that came back: probed up now after a probe had seen them otherwise. Their
            report breaker is closed with it (the probe is the fresher news).
        """
        back = [u for u, st in states.items() if st == UP and self._probes.get(u, UP) != UP]
        self._probes.update(states)
        for u in back:
            self._unhealthy_until.pop(u, None)
            self._bad_reports[u] = 0
        return back

    def any_up(self, urls: Iterable[str]) -> bool:
        """True if at least one of ``urls`` is up by probe (an endpoint never probed counts as up)."""
        urls = list(urls)
        return not urls or any(self._probes.get(u, UP) == UP for u in urls)

    def all_up(self, urls: Iterable[str]) -> bool:
        """True if every one of ``urls`` not given up on (``failed``) is up by probe, and at least one is."""
        live = [u for u in urls if self._probes.get(u, UP) != FAILED]
        return bool(live) and all(self._probes.get(u, UP) == UP for u in live)

    def states(self, urls: Iterable[str]) -> dict[str, str]:
        """``{url: probe state}`` of ``urls``, for messages."""
        return {u: self._probes.get(u, UP) for u in urls}

    # -- reports ------------------------------------------------------------------------------
    def report(self, served_by: str | None, failed_on: Iterable[str], now: float) -> None:
        """One result's view of the endpoints: ``failed_on`` had a failed attempt, ``served_by`` answered it.

        Logs (warning) when an endpoint's breaker opens.
        """
        failed = list(failed_on)
        for e in failed:
            self._bad_reports[e] += 1
            if self._bad_reports[e] >= self.breaker_failures and self.healthy(e, now):
                self._unhealthy_until[e] = now + self.breaker_cooldown_s
                log.warning("endpoint %s failing: generations routed to other endpoints for %g s", e,
                            self.breaker_cooldown_s, extra={"repeat_key": f"endpoint {e} failing"})
        if served_by and served_by not in failed:
            self._bad_reports[served_by] = 0

    def healthy(self, url: str, now: float) -> bool:
        """False while the endpoint's report breaker is open."""
        return self._unhealthy_until.get(url, 0.0) <= now
