"""One writer per run directory: a heartbeat lock file that works on local and shared (NFS, Lustre) filesystems.

Why a heartbeat file and not ``fcntl``/``flock``: on the shared filesystems of clusters flock is often local to
one node (Lustre ``localflock``, GPFS/NFS mounted ``nolock``: two nodes both "get" the lock, silently) or is
held by the server long after the node died (NFSv3 NLM). A file created with ``O_CREAT | O_EXCL`` (atomic on
local filesystems and on NFSv3+) plus an mtime the holder refreshes works the same everywhere and can be
inspected (``cat .rag-pipeline/lock.json`` names the holder).

Protocol (file ``.rag-pipeline/lock.json`` in the run directory, :mod:`pipeline.output.layout`):

* **Acquire**: create it exclusively with ``{"host", "pid", "boot_id", "pid_ns", "pid_started", "token",
  "started"}``. A thread of the holder touches it every ``refresh_s`` seconds (its mtime is the heartbeat)
  and checks that the file still carries its token.
* **Held by a live process**: the second run is refused at once (:class:`LockHeld`, names host and pid).
* **Stale** when the holder is on this machine (same host, boot id and pid namespace) and its pid is gone (or
  was reused: its start time differs), decided at once; else when the heartbeat is older than ``stale_s``,
  measured against the filesystem's own clock (the mtime of a file we just wrote in the directory), so clock
  skew between nodes does not matter.
* **Takeover** (atomic): rename the stale file to a unique name (only one contender's rename succeeds), check
  that the renamed file is the one judged stale (else put it back with ``os.link``, which never overwrites),
  delete it and acquire as above.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.errors import RagPipelineError
from pipeline.output.layout import LOCK_FILE, meta_path

log = logging.getLogger(__name__)

class LockHeld(RagPipelineError):
    """Another live run holds the output directory's lock (exit 2: the user's command conflicts)."""

    exit_code = 2


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_started(pid: int) -> float | None:
    """Start time of a process (psutil create_time, seconds since the epoch), None if it does not exist."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _read(path: Path) -> dict[str, Any] | None:
    """The lock file's content; None if absent; {} if unreadable (being written or corrupt)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def inspect_lock(directory: str | Path, *, stale_s: float = 60.0, path: Path | None = None) -> dict[str, Any] | None:
    """The holder of a run directory's lock as a reader (``rag-pipeline status``) sees it, by the same staleness
    rules as :meth:`DirLock.acquire`; never takes, refreshes or changes the lock.

    Args:
        directory: the run directory; ``stale_s``: the run's ``run.lock_stale_s``.
        path: the lock file (default: the directory's ``.rag-pipeline/lock.json``).

    Returns:
        None when there is no lock file; else ``{"host", "pid", "started", "heartbeat_age_s" (float, by the
        filesystem's clock), "alive" (bool), "reason" (why it is stale, or None while alive)}``.
    """
    lock = DirLock(directory, stale_s=stale_s, path=path)
    info = _read(lock.path)
    if info is None:
        return None
    try:
        mtime = lock.path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        fs_now = lock._fs_now()
    except OSError:  # a directory the reader may not write to
        fs_now = time.time()
    age_s = max(0.0, fs_now - mtime)
    if info:
        reason = lock.stale_reason(info, mtime)
    else:  # being written by its creator right now, or corrupt: judge by its age only
        reason = None if age_s <= max(stale_s, 2.0) else "unreadable lock file"
    return {"host": info.get("host"), "pid": info.get("pid"), "started": info.get("started"),
            "heartbeat_age_s": round(age_s, 1), "alive": reason is None, "reason": reason}


class DirLock:
    """The lock of one run directory (see the module docstring). Use as a context manager or acquire/release.

    Args:
        directory: the run directory (must exist).
        path: the lock file (default ``directory/.rag-pipeline/lock.json``; its folder is created on acquire).
        refresh_s: seconds between heartbeats (mtime refreshes) of the holder.
        stale_s: a lock whose heartbeat is older than this (and whose holder cannot be checked locally) is
            taken over.

    Raises (acquire):
        LockHeld: a live process holds it; the message names its host and pid.
        OSError: the directory cannot be written.
    """

    def __init__(self, directory: str | Path, *, refresh_s: float = 10.0, stale_s: float = 60.0,
                 path: Path | None = None) -> None:
        self.directory = Path(directory)
        self.path = Path(path) if path is not None else meta_path(self.directory, LOCK_FILE)
        self.refresh_s = refresh_s
        self.stale_s = stale_s
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()  # set by the heartbeat if the file no longer carries our token
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _identity(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "boot_id": _boot_id(),
            "pid_ns": _pid_ns(),
            "pid_started": _pid_started(os.getpid()),
            "token": self.token,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(self._identity(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _fs_now(self) -> float:
        """Current time by the filesystem's clock: mtime of a file written now in the directory."""
        probe = self.path.parent / f"_lock.probe.{self.token}"
        try:
            probe.write_bytes(b"")
            return probe.stat().st_mtime
        except OSError:
            return time.time()
        finally:
            probe.unlink(missing_ok=True)

    def _is_local(self, info: dict[str, Any]) -> bool:
        return (info.get("host") == socket.gethostname() and info.get("boot_id") == _boot_id()
                and info.get("pid_ns") == _pid_ns() and isinstance(info.get("pid"), int))

    def stale_reason(self, info: dict[str, Any], mtime: float) -> str | None:
        """Why the lock described by ``info`` (file mtime ``mtime``) is stale, or None if it is live."""
        if self._is_local(info):
            started = _pid_started(info["pid"])
            if started is None:
                return f"process {info['pid']} is gone"
            if info.get("pid_started") is not None and abs(started - info["pid_started"]) > 1.0:
                return f"process {info['pid']} is gone (its pid was reused)"
            return None
        age_s = self._fs_now() - mtime
        if age_s > self.stale_s:
            return f"no heartbeat for {age_s:.0f} s (stale after {self.stale_s:.0f} s)"
        return None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; start the heartbeat thread.

        A lock held from another host whose heartbeat is fresh (refreshed within two periods) is refused at
        once; one that has missed heartbeats is watched until it is refreshed (refused) or stale (taken over),
        so a job requeued on another node just after its first node died waits for the lock instead of failing.
        """
        self.path.parent.mkdir(exist_ok=True)
        attempts = 0
        while attempts < 20:
            attempts += 1
            if self._create():
                self.held = True
                self._start_heartbeat()
                return
            info = _read(self.path)
            try:
                mtime = self.path.stat().st_mtime
            except FileNotFoundError:
                continue
            if info is None:
                continue
            if not info:  # being written by its creator right now, or corrupt: judge by its age only
                if self._fs_now() - mtime <= max(self.stale_s, 2.0):
                    time.sleep(0.1)
                    continue
                reason = "unreadable lock file"
            else:
                reason = self.stale_reason(info, mtime)
            if reason is None and not self._is_local(info) and self._fs_now() - mtime > 2 * self.refresh_s:
                log.warning("the lock of %s (host %s, pid %s) missed heartbeats: waiting until it is refreshed "
                            "or %.0f s old", self.directory, info.get("host"), info.get("pid"), self.stale_s)
                time.sleep(min(self.refresh_s, 2.0))
                attempts -= 1
                continue
            if reason is None:
                raise LockHeld(
                    f"output dir {self.directory} is in use by another run (host {info.get('host')}, pid "
                    f"{info.get('pid')}, since {info.get('started')}); wait for it to finish or stop it "
                    f"(lock file {self.path})")
            self._take_over(info, reason)
        raise LockHeld(f"output dir {self.directory}: could not take the lock {self.path} (contended)")

    def _take_over(self, info: dict[str, Any], reason: str) -> None:
        aside = self.path.parent / f"_lock.stale.{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another contender took it first: try again
        moved = _read(aside) or {}
        if info and moved.get("token") != info.get("token"):
            # a contender replaced the stale lock between our read and our rename: give it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        log.warning("taking over the lock of %s held by host %s pid %s: %s", self.directory, info.get("host"),
                    info.get("pid"), reason)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.refresh_s):
            info = _read(self.path)
            if info is None or (info and info.get("token") != self.token):
                log.error("the lock %s was taken by another process; this run no longer owns its output",
                          self.path)
                self.lost.set()
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.held:
            info = _read(self.path)
            if info and info.get("token") == self.token:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self.held = False

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
