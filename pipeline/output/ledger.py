"""The run ledger: which record ids have a committed row, loaded once per run and updated in memory.

The committed Parquet parts are the durable ledger (a part is committed by an atomic rename, see
:mod:`pipeline.output.rundir`); :class:`Ledger` is its in-memory index. It is loaded once, by one streamed
scan of the parts' ``id`` column, and every commit adds the part's ids to it, so a commit costs time
proportional to the part's rows, whatever the number of parts already committed. Memory: one Python string
per committed id (about 60-100 bytes per short id).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import RunError
from pipeline.output.reading import PART_RE, iter_tables_of_parts, part_paths, scan_batches

log = logging.getLogger(__name__)


def _few(items: list[str], k: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:k])
    return shown + (f" ... ({len(items)} in all)" if len(items) > k else "")


class Ledger:
    """Committed ids and the next part index of one run directory.

    Args:
        path: the run directory.
        track_ids: keep the committed ids in memory and enforce exactly-once on :meth:`check`; False for a
            writer that has verified exactly-once itself (merge), which then keeps only the part index.
    """

    def __init__(self, path: str | Path, *, track_ids: bool = True) -> None:
        self.path = Path(path)
        self.track_ids = track_ids
        self.ids: set[str] = set()
        self.next_index = 0
        self.load_s = 0.0
        self._load()

    def _load(self) -> None:
        import time

        t0 = time.perf_counter()
        parts = part_paths(self.path)
        names = [PART_RE.match(p.name) for p in self.path.iterdir()] if self.path.is_dir() else []
        self.next_index = max((int(m.group(1)) for m in names if m), default=-1) + 1
        if self.track_ids:
            rows = 0
            for batch in scan_batches(parts, ["id"]):
                col = batch.column(0)
                if col.null_count:
                    raise RunError(f"{self.path}: a committed part has a null id")
                self.ids.update(col.to_pylist())
                rows += batch.num_rows
            if rows != len(self.ids):
                self._raise_duplicate(parts)
        self.load_s = time.perf_counter() - t0
        log.debug("ledger of %s: %d ids in %d parts loaded in %.3f s", self.path, len(self.ids), len(parts),
                  self.load_s)

    def _raise_duplicate(self, parts: list[Path]) -> None:
        seen: set[str] = set()
        for part, table in iter_tables_of_parts(parts, ["id"]):
            for i in table.column("id").to_pylist():
                if i in seen:
                    raise RunError(f"{part}: id {i!r} is committed twice in {self.path}")
                seen.add(i)
        raise RunError(f"{self.path}: committed parts hold duplicate ids")

    def __contains__(self, rid: object) -> bool:
        return rid in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def check(self, ids: list[str]) -> None:
        """Check that ``ids`` (one part's) are unique and none is committed yet.

        Cost: O(len(ids)), independent of the number of committed rows and parts.

        Raises:
            RunError: an id duplicated within ``ids`` or already committed (a bug in the caller).
        """
        if len(set(ids)) != len(ids):
            dups = sorted(k for k, c in collections.Counter(ids).items() if c > 1)
            raise RunError(f"commit to {self.path}: ids duplicated within the part: {_few(dups)}")
        if self.track_ids:
            again = sorted(i for i in ids if i in self.ids)
            if again:
                raise RunError(f"commit to {self.path}: ids already committed: {_few(again)}")

    def add(self, ids: Iterable[str]) -> int:
        """Record a committed part's ids; returns the part's index and advances :attr:`next_index`."""
        if self.track_ids:
            self.ids.update(ids)
        n = self.next_index
        self.next_index += 1
        return n
