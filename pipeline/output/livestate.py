"""A run's live state as readers see it: ``.rag-pipeline/state.json`` (written by the run, :mod:`pipeline.run.state`)
judged by ``.rag-pipeline/lock.json``'s heartbeat (:mod:`pipeline.output.lock`).

Whether a run is alive has one source, the lock: a live lock (its holder's pid exists on this machine, or its
heartbeat is fresh when held from another node) is a running run, whatever the state file says; a stale lock is a
run that died; no lock is a run that ended (its last state file says how: ``complete`` or ``stopped``). A state
file left with a running phase by a run that died is read as a dead run, never as a running one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.output.layout import LOCK_FILE, STATE_FILE, locate

LIVE_PHASES = ("starting servers", "starting workers", "running", "draining")
"""Phases of a run that holds its lock (``draining``: a stop signal arrived, in-flight records finish)."""
FINAL_PHASES = ("stopped", "complete")
"""Phases written once, at the end of an invocation."""


def read_state(run_dir: str | Path) -> dict[str, Any] | None:
    """The content of ``run_dir/.rag-pipeline/state.json``, or None when absent or unreadable (it is replaced atomically, so
    unreadable means damaged, not half-written)."""
    try:
        data = json.loads(locate(run_dir, STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_liveness(run_dir: str | Path, *, complete: bool, stale_s: float = 60.0) -> dict[str, Any]:
    """Whether the run of ``run_dir`` is running, stopped or complete, and what its live state says.

    Args:
        run_dir: a run (or shard) directory.
        complete: every record has its row and the manifest says complete (:func:`pipeline.output.dir_status`).
        stale_s: ``run.lock_stale_s`` of the run (a lock held from another node is stale past it).

    Returns:
        ``{"state": "running" | "stopped" | "complete", "reason": str | None, "host", "pid",
        "heartbeat_age_s": float | None, "phase", "phase_since", "updated_age_s": float | None (seconds since
        the state file was written), "live": the state dict of the run holding the lock, or None}``.
        ``live`` is given only for a running run whose state file is its own (same host and pid).
    """
    import time

    from pipeline.output.lock import inspect_lock

    d = Path(run_dir)
    st = read_state(d)
    lock = inspect_lock(d, stale_s=stale_s, path=locate(d, LOCK_FILE))
    updated_age_s = None
    if st is not None and isinstance(st.get("updated_unix"), (int, float)):
        updated_age_s = round(max(0.0, time.time() - float(st["updated_unix"])), 1)
    out: dict[str, Any] = {"state": "stopped", "reason": None, "host": None, "pid": None, "heartbeat_age_s": None,
                           "phase": st.get("phase") if st else None, "phase_since": st.get("phase_since") if st else None,
                           "updated_age_s": updated_age_s, "live": None}
    if lock is not None:
        out.update(host=lock["host"], pid=lock["pid"], heartbeat_age_s=lock["heartbeat_age_s"])
        own = st is not None and st.get("host") == lock["host"] and st.get("pid") == lock["pid"]
        if lock["alive"]:
            out["state"] = "running"
            if own:
                out["live"] = st
            else:  # the holder has not written its state yet (it checks its input first)
                out.update(phase="starting", phase_since=lock.get("started"), updated_age_s=None)
            return out
        out["reason"] = f"the run died: {lock['reason']}"
        return out
    if st is not None:
        out.update(host=st.get("host"), pid=st.get("pid"))
        if st.get("phase") in LIVE_PHASES:
            out["reason"] = "the run died (its lock is gone, its state was never finished)"
        elif st.get("phase") == "stopped":
            out["reason"] = st.get("stop_reason") or "stopped"
    if complete:
        out.update(state="complete", reason=None)
    elif out["reason"] is None:
        out["reason"] = "no run holds it"
    return out


def live_counts(live: dict[str, Any], committed_rows: int) -> dict[str, Any] | None:
    """The rows a running run has finished but not committed yet, as its state file says, when that state was
    written after the last commit ``committed_rows`` describes; None otherwise (a commit happened since: the
    caller reads again).

    Returns:
        ``{"rows": int, "rag_status": {value: n}, "gen_status": {value: n}}``.
    """
    pending = live.get("pending") or {}
    if live.get("committed_rows") != committed_rows:
        return None
    return {"rows": int(pending.get("rows") or 0), "rag_status": dict(pending.get("rag_status") or {}),
            "gen_status": dict(pending.get("gen_status") or {})}


__all__ = ["FINAL_PHASES", "LIVE_PHASES", "STATE_FILE", "live_counts", "read_state", "run_liveness"]
