"""One logging set-up for every process of a run: the main process, the RAG workers, the generation processes.

Every line has the same shape, wherever it was written::

    2026-12-03 14:05:01 WARNING gen-2 pipeline.llm.client: endpoint http://127.0.0.1:8001: 7 failures in a row ...

(local time, level, the process's role and rank: ``main``, ``rag-0``, ``gen-2``; the logger; the message).

Verbosity (``-q`` = -1, default 0, ``-v`` = 1, ``-vv`` = 2), enforced by a filter on every handler, so a library
that sets its own logger to DEBUG (bm25s does at import) cannot leak DEBUG lines:

======  =========================================  ==========================
level   the project's loggers (pipeline, workers)  third-party loggers
======  =========================================  ==========================
-q      WARNING                                    WARNING
0       INFO                                       WARNING
-v      DEBUG                                      WARNING
-vv     DEBUG                                      DEBUG
======  =========================================  ==========================

Worker processes (spawned) call :func:`setup_worker` first thing with the :class:`LogSetup` main handed them:
their full log (at least INFO) goes to their own file ``OUTPUT/.rag-pipeline/logs/<role>.log``, and what the run's stderr
would show is sent to main as a :class:`pipeline.messages.LogLine` over the worker's own result pipe (never a
shared queue a killed worker could leave locked); main's channel reader hands it to :func:`emit_forwarded`,
which logs it in main with the worker's role and time.

Repeated events are aggregated on main's stderr: a record logged with ``extra={"repeat_key": KEY}`` is shown
the first time; later records with the same key within :data:`REPEAT_WINDOW_S` are counted (with the roles that
logged them) and shown as one summary line when the window closes (:func:`flush_repeats`, called by the run's
main loop, or the next record of that key). The per-process files keep every record.

Nothing here runs at import time; :func:`setup` and :func:`setup_worker` configure the root logger.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(role)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
PROJECT_LOGGERS = ("pipeline", "workers")
"""Top-level names of the project's own loggers (INFO at default verbosity)."""
REPEAT_WINDOW_S = 30.0
"""Records of one ``repeat_key`` within this many seconds of its first are shown as one summary line."""

_state: dict[str, Any] = {"role": "main", "verbosity": 0, "handlers": [], "aggregators": []}
_state_lock = threading.Lock()


def levels(verbosity: int) -> tuple[int, int]:
    """``(project level, third-party level)`` for a verbosity (-1 quiet, 0 default, 1 ``-v``, 2 ``-vv``)."""
    if verbosity < 0:
        return logging.WARNING, logging.WARNING
    if verbosity == 0:
        return logging.INFO, logging.WARNING
    if verbosity == 1:
        return logging.DEBUG, logging.WARNING
    return logging.DEBUG, logging.DEBUG


def is_project(name: str) -> bool:
    """True for a logger of this project (``pipeline.*``, ``workers.*``)."""
    return name.split(".", 1)[0] in PROJECT_LOGGERS


def role() -> str:
    """This process's role and rank as it appears in log lines (``main``, ``rag-0``, ``gen-2``)."""
    return _state["role"]


def verbosity() -> int:
    """The verbosity this process was set up with (-1 quiet ... 2)."""
    return _state["verbosity"]


def hhmmss(wall_s: float) -> str:
    """Local wall-clock time ``HH:MM:SS`` of ``wall_s`` (seconds since the epoch), as in log lines."""
    return time.strftime("%H:%M:%S", time.localtime(wall_s))


class _RoleFilter(logging.Filter):
    """Gives every record a ``role`` (this process's, unless it came from another process)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "role"):
            record.role = _state["role"]
        return True


class VerbosityFilter(logging.Filter):
    """Passes a record if its level reaches the verbosity's level for its origin (see the module table).

    Args:
        verbosity: -1 quiet, 0 default, 1 ``-v``, 2 ``-vv``.
    """

    def __init__(self, verbosity: int) -> None:
        super().__init__()
        self.project, self.other = levels(verbosity)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= (self.project if is_project(record.name) else self.other)


class _NoConsole(logging.Filter):
    """Drops records meant for files only (``extra={"console": False}``: progress lines, written to stderr
    directly)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True) is not False


@dataclass
class _Group:
    t0: float
    name: str
    levelno: int
    count: int = 0
    roles: set[str] = field(default_factory=set)
    last: str = ""


class RepeatAggregator(logging.Filter):
    """Aggregates records that carry the same ``repeat_key`` on one handler (see the module docstring).

    Args:
        window_s: length of an aggregation window in seconds, from the first record of a key.
        clock: monotonic clock (seconds); tests pass their own.

    Attributes:
        handler: the handler the summaries are written to (set by :func:`attach_aggregator`).
    """

    def __init__(self, window_s: float = REPEAT_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock
        self.handler: logging.Handler | None = None
        self._groups: dict[str, _Group] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = getattr(record, "repeat_key", None)
        if not key:
            return True
        now = self.clock()
        closed = None
        with self._lock:
            g = self._groups.get(key)
            if g is not None and now - g.t0 < self.window_s:
                g.count += 1
                g.roles.add(str(getattr(record, "role", "") or _state["role"]))
                g.last = record.getMessage()
                return False
            if g is not None and g.count:
                closed = (key, g, now)
            self._groups[key] = _Group(now, record.name, record.levelno)
        if closed is not None:
            self._emit(*closed)
        return True

    def flush(self, now: float | None = None, *, all_groups: bool = False) -> int:
        """Write the summary of every window that has closed (all of them with ``all_groups``).

        Returns:
            the number of summary lines written.
        """
        now = self.clock() if now is None else now
        done: list[tuple[str, _Group]] = []
        with self._lock:
            for key, g in list(self._groups.items()):
                if all_groups or now - g.t0 >= self.window_s:
                    del self._groups[key]
                    if g.count:
                        done.append((key, g))
        for key, g in done:
            self._emit(key, g, now)
        return len(done)

    def summary(self, key: str, g: _Group, now: float) -> str:
        """The summary line of a closed window: ``KEY: N more times in S s (roles); last: MESSAGE``."""
        span_s = min(max(0.0, now - g.t0), self.window_s)
        roles = {r for r in g.roles if r}
        who = "" if roles == {_state["role"]} else ", ".join(sorted(roles))  # no "(main)" for main's own lines
        return (f"{key}: {g.count} more time{'s' if g.count != 1 else ''} in {span_s:.0f} s"
                f"{f' ({who})' if who else ''}; last: {g.last}")

    def _emit(self, key: str, g: _Group, now: float) -> None:
        if self.handler is None:
            return
        rec = logging.LogRecord(g.name, g.levelno, __file__, 0, self.summary(key, g, now), None, None)
        rec.role = _state["role"]
        self.handler.handle(rec)


def attach_aggregator(handler: logging.Handler, window_s: float = REPEAT_WINDOW_S,
                      clock: Callable[[], float] = time.monotonic) -> RepeatAggregator:
    """Add a :class:`RepeatAggregator` to ``handler`` (its summaries are written there); returns it."""
    agg = RepeatAggregator(window_s, clock)
    agg.handler = handler
    handler.addFilter(agg)
    with _state_lock:
        _state["aggregators"].append(agg)
    return agg


def flush_repeats(*, all_groups: bool = False) -> None:
    """Write the summaries of closed aggregation windows (``all_groups``: of every window, at the end)."""
    for agg in list(_state["aggregators"]):
        agg.flush(all_groups=all_groups)


class _StderrHandler(logging.StreamHandler):
    """A stream handler writing to whatever ``sys.stderr`` is at the time of each record."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


class _FileHandler(logging.FileHandler):
    """A log file that never prints a traceback when it cannot be written (a full disk): the line is dropped
    (stderr has it) and counted in ``dropped``."""

    dropped = 0

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self.dropped += 1


def _formatter() -> logging.Formatter:
    return logging.Formatter(FORMAT, DATEFMT)


def _add_handler(handler: logging.Handler, verbosity: int) -> logging.Handler:
    handler.setFormatter(_formatter())
    handler.addFilter(_RoleFilter())
    handler.addFilter(VerbosityFilter(verbosity))
    logging.getLogger().addHandler(handler)
    with _state_lock:
        _state["handlers"].append(handler)
    return handler


def _reset(role_name: str, verbosity_: int) -> None:
    """Remove the handlers a previous set-up of this process added; set role, verbosity and logger levels."""
    root = logging.getLogger()
    with _state_lock:
        for h in _state["handlers"]:
            root.removeHandler(h)
            with contextlib.suppress(Exception):
                h.close()
        _state.update(role=role_name, verbosity=verbosity_, handlers=[], aggregators=[])
    project, other = levels(verbosity_)
    root.setLevel(min(project, other, logging.INFO))  # files keep INFO even with -q
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(min(project, logging.INFO))


def setup(verbosity: int = 0, *, role_name: str = "main") -> None:
    """Configure logging of a command's process: one stderr handler with the format, the verbosity filter and
    the repeat aggregator. Idempotent (a second call replaces what the first added).

    If the process's root logger already has handlers this module did not add (an application or pytest
    configured logging), only the role and verbosity are recorded (for the workers): their configuration,
    handlers and levels, is left as it is.

    Args:
        verbosity: -1 (``-q``), 0, 1 (``-v``), 2 (``-vv``).
        role_name: the process's role in log lines.
    """
    root = logging.getLogger()
    if any(h not in _state["handlers"] for h in root.handlers):
        with _state_lock:
            _state.update(role=role_name, verbosity=verbosity)
        return
    _reset(role_name, verbosity)
    console = _add_handler(_StderrHandler(), verbosity)
    console.addFilter(_NoConsole())
    attach_aggregator(console)


@contextlib.contextmanager
def log_to_file(path: str | Path) -> Iterator[logging.Handler | None]:
    """Also write this process's log to ``path`` (appended; at least INFO whatever the verbosity) while the
    context is open. Records forwarded from workers are included. A file that cannot be opened is logged
    once and skipped (the run goes on).
    """
    handler = _open_file(Path(path))
    try:
        yield handler
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            with _state_lock:
                if handler in _state["handlers"]:
                    _state["handlers"].remove(handler)
            handler.close()


def _open_file(path: Path) -> logging.Handler | None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _FileHandler(path, mode="a", encoding="utf-8")
    except OSError as exc:
        logging.getLogger(__name__).warning("cannot write the log file %s: %s", path, exc.strerror or exc)
        return None
    return _add_handler(handler, max(0, _state["verbosity"]))


@dataclass(frozen=True)
class LogSetup:
    """How a worker process logs (picklable: handed to the spawned process).

    Attributes:
        role: the process's role and rank (``rag-0``, ``gen-2``).
        verbosity: the run's verbosity (-1 .. 2).
        log_file: the process's full log (appended), or None.
    """

    role: str
    verbosity: int = 0
    log_file: str | None = None


def child_setup(role_name: str, log_dir: str | Path | None) -> LogSetup:
    """The :class:`LogSetup` for a worker ``role_name`` of this process: same verbosity, its file in
    ``log_dir`` (``<log_dir>/<role>.log``)."""
    return LogSetup(role_name, _state["verbosity"], str(Path(log_dir) / f"{role_name}.log") if log_dir else None)


class ForwardHandler(logging.Handler):
    """Sends each record as a :class:`pipeline.messages.LogLine` through ``send`` (a worker's result channel).

    A record logged while sending (by the send itself) is dropped rather than sent recursively.
    """

    def __init__(self, send: Callable[[Any], None]) -> None:
        super().__init__()
        self.send = send
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        from pipeline.messages import LogLine

        if getattr(self._local, "busy", False):
            return
        self._local.busy = True
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self.send(LogLine(str(getattr(record, "role", _state["role"])), record.created, record.levelno,
                              record.name, text, getattr(record, "repeat_key", None)))
        except Exception:  # noqa: BLE001 - logging must never break the worker
            self.handleError(record)
        finally:
            self._local.busy = False


def setup_worker(setup_: LogSetup, send: Callable[[Any], None] | None) -> None:
    """Configure a worker process (call first thing in its entry point): its file (full log) and forwarding
    to main of what the run's stderr shows (``send``: the result channel's ``put``; None = not forwarded)."""
    _reset(setup_.role, setup_.verbosity)
    if setup_.log_file:
        _open_file(Path(setup_.log_file))
    if send is not None:
        _add_handler(ForwardHandler(send), setup_.verbosity)
    logging.captureWarnings(True)


def emit_forwarded(line: Any) -> None:
    """Log a :class:`pipeline.messages.LogLine` received from a worker in this (main) process, with the
    worker's role, time and logger name."""
    rec = logging.LogRecord(line.name, line.levelno, "", 0, line.text, None, None)
    rec.created = line.created
    rec.msecs = (line.created - int(line.created)) * 1000
    rec.role = line.role
    if line.repeat_key:
        rec.repeat_key = line.repeat_key
    logging.getLogger(line.name).handle(rec)


__all__ = [
    "DATEFMT",
    "FORMAT",
    "REPEAT_WINDOW_S",
    "ForwardHandler",
    "LogSetup",
    "RepeatAggregator",
    "VerbosityFilter",
    "attach_aggregator",
    "child_setup",
    "emit_forwarded",
    "flush_repeats",
    "hhmmss",
    "levels",
    "log_to_file",
    "role",
    "setup",
    "setup_worker",
    "verbosity",
]
