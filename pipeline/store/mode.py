"""One copy of the vector index per node: whether a run shares one Chroma server among its RAG workers.

Every RAG worker with a local store opens its own ``chromadb.PersistentClient``, which loads the collection's
HNSW index (vectors + graph) into that process: N workers hold it N times. With ``store.shared`` the run itself
starts ONE Chroma server over the local store (:class:`pipeline.store.server.StoreServer`: own process group,
PR_SET_PDEATHSIG, port owner named if the port is taken, stopped at exit) and every RAG worker, rank0's ingest
included, uses it through ``store.chroma_url``; the BM25 index and the ingest ledger stay where a local run
keeps them (``store.bm25_path`` = ``<store>/bm25`` unless set), so local and shared runs use the same files.

``store.shared``: ``"on"`` always (local store), ``"off"`` never, ``"auto"`` (default) when more than one RAG
worker would each hold a copy and the duplicated memory, ``chunks x INDEX_BYTES_PER_CHUNK x (workers - 1)``,
exceeds :data:`AUTO_MIN_DUPLICATE_BYTES`. A configured ``store.chroma_url`` is already one server: nothing to do.

Measured (bench/ingest.py, part ``workers``; random float32 [n, 384] in a cosine collection; RSS of a process
that opened the client and ran queries of depth 100): see :data:`INDEX_BYTES_PER_CHUNK`. The HTTP hop costs
queries/s (printed by the same bench), which is why small collections stay local.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

INDEX_BYTES_PER_CHUNK = 2000
"""RSS a local client process gains per stored chunk once its collection is loaded and queried (HNSW vectors
float32 [384] = 1,536 bytes + graph links + id maps): measured 1,936 bytes per chunk from 10k to 200k chunks
(146 -> 497 MiB above a bare process), 2,021 from 50k to 200k (bench/ingest.py, part ``workers``; README
"Corpus scale")."""

AUTO_MIN_DUPLICATE_BYTES = 1 << 30
"""``auto`` shares the index when the copies beyond the first would hold more than this (1 GiB). Below it the
duplicated memory is small next to a GPU node's RAM while the shared server costs a fixed ~120 MB process and
0-11 % of retrieval queries/s (the HTTP hop, measured by the same bench under load); 8 RAG workers share from
~77k chunks, 2 workers from ~537k."""


@dataclass(frozen=True)
class StoreMode:
    """The decision for one run, recorded in ``manifest.json["store"]``.

    Attributes:
        mode: ``"local"`` (each RAG worker opens the local store), ``"shared"`` (the run's own Chroma server over
            the local store), ``"server"`` (``store.chroma_url`` given by the user).
        reason: one line saying why.
        setting: the ``store.shared`` value.
        rag_workers: RAG workers planned.
        chunks: chunks in the collections read, counted before the run (None if unknown).
        duplicate_bytes: memory the extra local copies would hold (estimate, None if unknown).
        url: the server's URL in shared/server mode.
    """

    mode: str
    reason: str
    setting: str
    rag_workers: int
    chunks: int | None = None
    duplicate_bytes: int | None = None
    url: str = ""

    @property
    def shared(self) -> bool:
        """The run starts its own Chroma server."""
        return self.mode == "shared"

    def as_dict(self) -> dict[str, Any]:
        """For the manifest."""
        return asdict(self)


def decide(setting: str, rag_workers: int, chunks: int | None, chroma_url: str = "") -> StoreMode:
    """Whether the run shares one Chroma server among its RAG workers (see the module docstring).

    Args:
        setting: ``store.shared`` (``auto``, ``on``, ``off``).
        rag_workers: RAG workers the run plans (one per GPU server / endpoint).
        chunks: chunks in the collections read (:func:`pipeline.store.chroma_files.count_chunks`), None if
            unknown.
        chroma_url: ``store.chroma_url``.

    Raises:
        pipeline.errors.ConfigError: an unknown setting.
    """
    from pipeline.config import choices
    from pipeline.errors import ConfigError

    allowed = choices("store.shared")
    if setting not in allowed:
        raise ConfigError(f"[store] shared: {setting!r} is not one of {', '.join(allowed)}")
    dup = None if chunks is None else chunks * INDEX_BYTES_PER_CHUNK * max(0, rag_workers - 1)
    common = {"setting": setting, "rag_workers": rag_workers, "chunks": chunks, "duplicate_bytes": dup}
    if chroma_url:
        return StoreMode("server", "store.chroma_url is set: every RAG worker is a client of that server",
                         url=chroma_url, **common)
    if setting == "off":
        return StoreMode("local", "store.shared = off", **common)
    if setting == "on":
        return StoreMode("shared", "store.shared = on", **common)
    mib = 2**20
    if rag_workers < 2:
        return StoreMode("local", "store.shared = auto and one RAG worker: no copy to save", **common)
    if dup is None or dup <= AUTO_MIN_DUPLICATE_BYTES:
        return StoreMode(
            "local", f"store.shared = auto: {chunks or 0} chunks x {rag_workers - 1} extra RAG workers would "
            f"duplicate ~{(dup or 0) / mib:.0f} MiB <= {AUTO_MIN_DUPLICATE_BYTES / mib:.0f} MiB", **common)
    return StoreMode(
        "shared", f"store.shared = auto: {chunks} chunks x {rag_workers - 1} extra RAG workers would duplicate "
        f"~{dup / mib:.0f} MiB > {AUTO_MIN_DUPLICATE_BYTES / mib:.0f} MiB", **common)


__all__ = ["AUTO_MIN_DUPLICATE_BYTES", "INDEX_BYTES_PER_CHUNK", "StoreMode", "decide"]
