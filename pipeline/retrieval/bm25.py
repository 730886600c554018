"""BM25 index per collection (``bm25s``), kept in step with the Chroma collection it mirrors.

Scoring: Lucene's BM25 (bm25s ``method="lucene"``; Robertson & Zaragoza, "The Probabilistic Relevance
Framework: BM25 and Beyond", 2009; Lu, "BM25S: Orders of magnitude faster lexical search via eager sparse
scoring", 2024)::

    score(q, d) = sum_{t in q} idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

with ``k1 = 1.2, b = 0.75`` by default: the Lucene / Elasticsearch defaults, the setting of the BEIR paper's
BM25 baseline (not tuned on any test set). Tokens: lowercased ``\\w\\w+`` words (scikit-learn's pattern, bm25s'
default), English stopwords removed and Snowball English stems (PyStemmer) with ``language = "english"``;
``"none"`` keeps every word unstemmed.

One index per collection, over exactly the chunks of the collection (same ids, same texts). It is built from
the collection itself after every ingest that changed it (bm25s has no incremental update: adding documents
changes every idf), so it follows the collection's hash-based add/update/remove exactly.

Where it lives (:func:`index_root`): ``store.bm25_path``, or ``<store.path>/bm25`` for a local store:
``<root>/<collection>/<build_id>/`` holds the bm25s arrays (``*.index.npy``, loaded memory-mapped with bm25s'
``BM25.load(mmap=True)``, so RAG workers on one node share the pages), ``chunk_ids.npy`` (row -> chunk id, UTF-8
in a fixed-width bytes array, also memory-mapped: a Python list of 21M ids would be ~1.5 GB in every worker) and
``meta.json`` (settings, counts). The collection's metadata key :data:`BUILD_KEY` names the build that matches its content:

1. an ingest that is about to change the collection clears the key first;
2. after writing, it builds a new index into a fresh ``<build_id>/`` directory, then sets the key, then removes
   older builds. The stored build (:meth:`BM25Index.build_stored`) pages through the collection and never holds
   its texts or tokens: memory ~30-40 B per chunk plus the vocabulary; spill and index go to disk. The in-memory
   build (:meth:`BM25Index.build`) remains for readers without a stored build and for Chroma servers without
   ``store.bm25_path``.

A reader (:func:`open_index`) loads the build named by the key. A crash between 1 and 2, an index built with
other settings, a store without an index (made before this existed), or a Chroma server without a shared
``store.bm25_path`` leave no usable build: the reader then builds the index in memory from the collection
(logged with its duration; :func:`read_collection` pages through the chunks) instead of using a stale one.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    from chromadb.api.models.Collection import Collection

    from pipeline.config import RetrievalConfig, StoreConfig

log = logging.getLogger(__name__)

BUILD_KEY = "rag_pipeline_bm25_build"
"""Collection metadata key holding the id of the BM25 build that matches the collection ('' = none)."""

INDEX_VERSION = 2
"""Layout version of a stored index (``meta.json``); another version is rebuilt (2: ``chunk_ids.npy``)."""

READ_PAGE = 5000
"""Chunks fetched per ``collection.get`` when building an index from a collection."""

SCATTER_ENTRIES = 250_000
"""(row, term, tf) triples scored and scattered per step of :meth:`BM25Index.build_stored` (~25 MB of
temporaries; 1,000,000 measured ~30 MB more peak memory and no faster)."""


@dataclass(frozen=True)
class BM25Settings:
    """Everything that changes the index: an index built with other settings is rebuilt.

    Attributes:
        k1: term-frequency saturation (>= 0).
        b: document-length normalisation in [0, 1].
        language: ``"english"`` (English stopwords + Snowball English stemmer) or ``"none"`` (lowercased words
            only); the choices of ``retrieval.bm25_language``.
    """

    k1: float = 1.2
    b: float = 0.75
    language: str = "english"

    @classmethod
    def from_config(cls, cfg: RetrievalConfig) -> BM25Settings:
        """Settings from ``retrieval.bm25_k1``, ``bm25_b``, ``bm25_language``."""
        return cls(k1=cfg.bm25_k1, b=cfg.bm25_b, language=cfg.bm25_language)

    def check(self) -> None:
        """Raise ConfigError for an out-of-range k1/b or an unknown language."""
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ConfigError(f"bm25 k1 must be >= 0 and b in [0, 1], got k1={self.k1}, b={self.b}")
        from pipeline.config import choices

        languages = choices("retrieval.bm25_language")
        if self.language not in languages:
            raise ConfigError(f"bm25 language must be one of {', '.join(languages)}, got {self.language!r}")


def tokenize(texts: Sequence[str], settings: BM25Settings) -> list[list[str]]:
    """Tokens of each text (lowercased words of >= 2 characters; stopwords and stemming per ``settings``)."""
    import bm25s

    stemmer = None
    stopwords: Any = []
    if settings.language == "english":
        import Stemmer

        stemmer = Stemmer.Stemmer("english")
        stopwords = "en"
    return bm25s.tokenize(list(texts), stopwords=stopwords, stemmer=stemmer, return_ids=False, show_progress=False)


class ChunkIds:
    """Chunk ids of the index rows over a fixed-width UTF-8 bytes array (``numpy`` dtype ``S<n>``), typically
    memory-mapped from ``chunk_ids.npy``; behaves as a read-only sequence of ``str``."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr

    @classmethod
    def from_list(cls, ids: Sequence[str]) -> ChunkIds:
        """Pack ``ids`` into an in-memory array."""
        enc = [i.encode("utf-8") for i in ids]
        width = max((len(e) for e in enc), default=1) or 1
        return cls(np.array(enc, dtype=f"S{width}") if enc else np.zeros(0, dtype="S1"))

    def __len__(self) -> int:
        return int(self.arr.shape[0])

    def __getitem__(self, i: int) -> str:
        return bytes(self.arr[i]).decode("utf-8")

    def __iter__(self):  # noqa: ANN204 - Iterator[str]
        return (bytes(b).decode("utf-8") for b in self.arr)


class BM25Index:
    """A bm25s index over the chunks of one collection.

    Args:
        model: a ``bm25s.BM25`` that has been indexed (or loaded).
        chunk_ids: chunk id of each indexed row, in index order.
        settings: the settings it was built with.
        build_id: the build's id (``""`` for an index built in memory and never stored).
    """

    def __init__(self, model: Any, chunk_ids: Sequence[str] | ChunkIds, settings: BM25Settings,
                 build_id: str = "") -> None:
        self.model = model
        self.chunk_ids = chunk_ids if isinstance(chunk_ids, ChunkIds) else ChunkIds.from_list(chunk_ids)
        self.settings = settings
        self.build_id = build_id

    def __len__(self) -> int:
        return len(self.chunk_ids)

    @classmethod
    def build(cls, chunk_ids: list[str], texts: list[str], settings: BM25Settings) -> BM25Index:
        """Index ``texts`` (one per chunk id).

        Raises:
            pipeline.errors.ConfigError: invalid settings.
        """
        import bm25s

        settings.check()
        model = bm25s.BM25(k1=settings.k1, b=settings.b, method="lucene")
        if texts:
            model.index(tokenize(texts, settings), show_progress=False)
        return cls(model, ChunkIds.from_list(chunk_ids), settings, uuid.uuid4().hex)

    @classmethod
    def build_stored(cls, pages: Iterable[tuple[list[str], list[str]]], settings: BM25Settings,
                     root: Path) -> BM25Index:
        """Index the chunks of ``pages`` into a new build directory ``root/<build_id>`` in bounded memory, and
        return it loaded (memory-mapped).

        The same index as :meth:`build` + :meth:`save` (same files, same scores: bm25s's ``lucene`` method), built
        in two passes so that neither the texts nor their tokens of the whole collection are ever in memory:

        1. each page is tokenized (:func:`tokenize`) and its (row, term id, term frequency) triples are appended to
           spill files in the build directory; the vocabulary (``dict`` token -> id), document frequencies
           (int64 [n_terms]), document lengths (int32 [n_chunks]) and chunk ids stay in memory;
        2. the spill is read back in slices of :data:`SCATTER_ENTRIES` triples, scored with Lucene's BM25
           (idf = ln(1 + (N - df + 0.5) / (df + 0.5)), tf part = tf / (tf + k1 (1 - b + b dl / avgdl));
           Kamphuis et al., "Which BM25 do you mean?", ECIR 2020, the variant bm25s implements as
           ``method="lucene"``) and scattered column by column into memory-mapped ``.npy`` files, the
           column-compressed (CSC) arrays bm25s loads: ``data`` float32 [nnz], ``indices`` int32 [nnz],
           ``indptr`` int64 [n_terms + 1].

        Memory: ~30-40 B per chunk (token counts, length norms, the chunk id array) + the vocabulary + one page of
        texts and one slice of triples (bench/corpus_scale.py measured 138 MiB at 400k chunks); the spill
        (12 B per distinct term of a chunk) and the index are on disk (written through the page cache).

        Args:
            pages: ``(chunk ids, texts)`` pages, e.g. :func:`iter_collection`; ids must be unique.
            settings: BM25 settings.
            root: the collection's index root (:func:`index_root`); created if missing.

        Raises:
            pipeline.errors.ConfigError: invalid settings.
            OSError: the build directory cannot be written.
        """
        import bm25s

        settings.check()
        build_id = uuid.uuid4().hex
        tmp = root / f".{build_id}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        spill = tmp / "spill"
        spill.mkdir(parents=True)
        vocab: dict[str, int] = {}
        df = np.zeros(1 << 16, dtype=np.int64)
        doc_lens: list[np.ndarray] = []
        id_parts: list[np.ndarray] = []
        n_docs = nnz = 0
        with open(spill / "rows.bin", "wb") as f_rows, open(spill / "cols.bin", "wb") as f_cols, \
                open(spill / "tf.bin", "wb") as f_tf:
            for ids, texts in pages:
                toks = tokenize(texts, settings)
                lens = np.fromiter((len(t) for t in toks), dtype=np.int64, count=len(toks))
                terms = np.fromiter((vocab.setdefault(w, len(vocab)) for t in toks for w in t), dtype=np.int64,
                                    count=int(lens.sum()))
                rows = np.repeat(np.arange(n_docs, n_docs + len(toks), dtype=np.int64), lens)
                pairs, tf = np.unique((rows << 32) | terms, return_counts=True)  # sorted by (row, term)
                cols = (pairs & 0xFFFFFFFF).astype(np.int32)
                if len(vocab) > len(df):
                    df = np.concatenate([df, np.zeros(max(len(vocab), 2 * len(df)) - len(df), dtype=np.int64)])
                df += np.bincount(cols, minlength=len(df))
                f_rows.write((pairs >> 32).astype(np.int32).tobytes())
                f_cols.write(cols.tobytes())
                f_tf.write(tf.astype(np.float32).tobytes())
                doc_lens.append(lens.astype(np.int32))
                id_parts.append(ChunkIds.from_list(ids).arr)
                n_docs += len(toks)
                nnz += len(pairs)
        chunk_ids = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype="S1")
        del id_parts
        if n_docs:
            n_terms = len(vocab)
            df = df[:n_terms]
            dl = np.concatenate(doc_lens).astype(np.float32)
            del doc_lens
            k1, b = settings.k1, settings.b
            norm = (k1 * (1 - b + b * dl / max(float(dl.mean()), 1e-9))).astype(np.float32)  # [n_chunks]
            idf = np.log1p((n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)  # [n_terms]
            indptr = np.zeros(n_terms + 1, dtype=np.int64)
            np.cumsum(df, out=indptr[1:])
            cursor = indptr[:-1].copy()
            data = np.lib.format.open_memmap(tmp / "data.csc.index.npy", mode="w+", dtype=np.float32, shape=(nnz,))
            indices = np.lib.format.open_memmap(tmp / "indices.csc.index.npy", mode="w+", dtype=np.int32,
                                                shape=(nnz,))
            rows_m = np.memmap(spill / "rows.bin", dtype=np.int32, mode="r", shape=(nnz,))
            cols_m = np.memmap(spill / "cols.bin", dtype=np.int32, mode="r", shape=(nnz,))
            tf_m = np.memmap(spill / "tf.bin", dtype=np.float32, mode="r", shape=(nnz,))
            for lo in range(0, nnz, SCATTER_ENTRIES):
                r = np.asarray(rows_m[lo:lo + SCATTER_ENTRIES])
                c = np.asarray(cols_m[lo:lo + SCATTER_ENTRIES])
                tf_s = np.asarray(tf_m[lo:lo + SCATTER_ENTRIES])
                order = np.argsort(c, kind="stable")  # rows stay ascending inside each column
                cs = c[order]
                uc, start, count = np.unique(cs, return_index=True, return_counts=True)
                pos = cursor[cs] + (np.arange(len(cs)) - np.repeat(start, count))
                cursor[uc] += count
                tf_o = tf_s[order]
                data[pos] = idf[cs] * tf_o / (tf_o + norm[r[order]])
                indices[pos] = r[order]
            data.flush()
            indices.flush()
            del data, indices, rows_m, cols_m, tf_m
            np.save(tmp / "indptr.csc.index.npy", indptr)
            # bm25s writes its own vocabulary and parameter files (an empty score matrix into a scratch folder)
            model = bm25s.BM25(k1=settings.k1, b=settings.b, method="lucene")
            vocab[""] = n_terms  # bm25s's empty token, as its own index() adds it
            model.vocab_dict = vocab
            model.nonoccurrence_array = None
            model.scores = {"data": np.zeros(0, dtype=np.float32), "indices": np.zeros(0, dtype=np.int32),
                            "indptr": np.zeros(1, dtype=np.int64), "num_docs": n_docs}
            model.save(str(spill / "meta"), show_progress=False)
            del model, vocab
            for name in ("vocab.index.json", "params.index.json"):
                (spill / "meta" / name).rename(tmp / name)
        shutil.rmtree(spill)
        np.save(tmp / "chunk_ids.npy", chunk_ids)
        meta = {"version": INDEX_VERSION, "build_id": build_id, "settings": asdict(settings),
                "n_chunks": n_docs, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        d = root / build_id
        tmp.rename(d)
        index = cls.load(d, settings)
        if index is None:
            raise OSError(f"the BM25 build {d} cannot be read back")
        return index

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every indexed chunk for one query: float32 [len(self)] (0 where no term matches)."""
        if not len(self.chunk_ids):
            return np.zeros(0, dtype=np.float32)
        tokens = tokenize([query], self.settings)[0]
        ids = self.model.get_tokens_ids(tokens)
        if not ids:
            return np.zeros(len(self.chunk_ids), dtype=np.float32)
        return np.asarray(self.model.get_scores_from_ids(ids), dtype=np.float32)

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """Top ``k`` chunks per query with a positive score: ``[(chunk_id, bm25 score), ...]`` best first.

        Ties are broken by index row (stable), so results are deterministic.
        """
        out = []
        for q in queries:
            s = self.scores(q)
            n = min(k, int(np.count_nonzero(s > 0)))
            if n <= 0:
                out.append([])
                continue
            top = np.argpartition(-s, n - 1)[:n] if n < len(s) else np.arange(len(s))
            top = top[np.lexsort((top, -s[top]))]
            out.append([(self.chunk_ids[i], float(s[i])) for i in top if s[i] > 0])
        return out

    # --- persistence ---------------------------------------------------------------------------
    def save(self, root: Path) -> Path:
        """Write the index into a new directory ``root/<build_id>`` (never over an existing build)."""
        d = root / self.build_id
        tmp = root / f".{self.build_id}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if len(self.chunk_ids):
            self.model.save(str(tmp), show_progress=False)
        np.save(tmp / "chunk_ids.npy", self.chunk_ids.arr)
        meta = {"version": INDEX_VERSION, "build_id": self.build_id, "settings": asdict(self.settings),
                "n_chunks": len(self.chunk_ids), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        tmp.rename(d)
        return d

    @classmethod
    def load(cls, d: Path, settings: BM25Settings) -> BM25Index | None:
        """Load the build in directory ``d`` (memory-mapped); None if absent, unreadable or other settings."""
        import bm25s

        try:
            meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
            if meta.get("version") != INDEX_VERSION or meta.get("settings") != asdict(settings):
                log.info("BM25 index %s was built with other settings: not used", d)
                return None
            chunk_ids = (ChunkIds(np.load(d / "chunk_ids.npy", mmap_mode="r")) if meta.get("n_chunks")
                         else ChunkIds.from_list([]))
            model = (bm25s.BM25.load(str(d), mmap=True, show_progress=False) if len(chunk_ids)
                     else bm25s.BM25(k1=settings.k1, b=settings.b, method="lucene"))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("BM25 index %s is unreadable (%s): not used", d, exc)
            return None
        return cls(model, chunk_ids, settings, str(meta.get("build_id", d.name)))


# --- the collection side ------------------------------------------------------------------------
def index_root(store_cfg: StoreConfig, collection: str) -> Path | None:
    """Directory holding the builds of ``collection``: ``store.bm25_path/<collection>``, else
    ``<store.path>/bm25/<collection>`` for a local store; None for a Chroma server without ``bm25_path``
    (then every reader builds the index in memory)."""
    if store_cfg.bm25_path:
        return Path(store_cfg.bm25_path) / collection
    if store_cfg.chroma_url:
        return None
    return Path(store_cfg.path) / "bm25" / collection


def build_marker(col: Collection) -> str:
    """The build id recorded in the collection's metadata ('' = no matching build)."""
    return str((col.metadata or {}).get(BUILD_KEY, "") or "")


def set_build_marker(col: Collection, build_id: str) -> None:
    """Record ``build_id`` in the collection's metadata (keeping its other keys)."""
    from pipeline.store.client import store_errors

    meta = {k: v for k, v in (col.metadata or {}).items() if not k.startswith("hnsw:")}
    meta[BUILD_KEY] = build_id
    with store_errors(f"update metadata of collection {col.name!r}"):
        col.modify(metadata=meta)


def iter_collection(col: Collection, page: int = READ_PAGE) -> Iterator[tuple[list[str], list[str]]]:
    """Pages ``(chunk ids, texts)`` of ``page`` chunks of the collection (paged ``get``), in the collection's order.

    Raises:
        pipeline.errors.StoreError: the store fails.
    """
    from pipeline.store.client import store_errors

    offset = 0
    while True:
        with store_errors(f"read collection {col.name!r}"):
            res = col.get(include=["documents"], limit=page, offset=offset)
        ids = list(res["ids"])
        if ids:
            yield ids, [d or "" for d in (res["documents"] or [""] * len(ids))]
        if len(ids) < page:
            return
        offset += len(ids)


def read_collection(col: Collection, page: int = READ_PAGE) -> tuple[list[str], list[str]]:
    """Every chunk id and text of the collection (paged ``get``), in the collection's order.

    Raises:
        pipeline.errors.StoreError: the store fails.
    """
    ids: list[str] = []
    texts: list[str] = []
    for page_ids, page_texts in iter_collection(col, page):
        ids.extend(page_ids)
        texts.extend(page_texts)
    return ids, texts


def stored_build(col: Collection, store_cfg: StoreConfig, settings: BM25Settings) -> BM25Index | None:
    """The stored build the collection's marker names, if it exists with these settings; else None."""
    root = index_root(store_cfg, col.name)
    marker = build_marker(col)
    if root is None or not marker:
        return None
    return BM25Index.load(root / marker, settings)


def rebuild(col: Collection, store_cfg: StoreConfig, settings: BM25Settings) -> BM25Index:
    """Build the index from the collection, store it (if the store has an index root) and mark it current.

    Older builds of the collection are removed after the marker points at the new one.

    Raises:
        pipeline.errors.StoreError: the collection cannot be read, or the index cannot be written.
    """
    t0 = time.perf_counter()
    root = index_root(store_cfg, col.name)
    if root is None:
        index = BM25Index.build(*read_collection(col), settings)
        log.info("BM25 index of %r not stored: a Chroma server without store.bm25_path", col.name)
        return index
    try:
        index = BM25Index.build_stored(iter_collection(col), settings, root)
    except OSError as exc:
        raise StoreError(f"cannot write the BM25 index to {root}: {exc}") from exc
    set_build_marker(col, index.build_id)
    for old in root.iterdir():
        if old.name != index.build_id:
            shutil.rmtree(old, ignore_errors=True)
    log.info("BM25 index of %r: %d chunks, built in %.1f s (%s)", col.name, len(index),
             time.perf_counter() - t0, root / index.build_id)
    return index


def open_index(col: Collection, store_cfg: StoreConfig, settings: BM25Settings) -> BM25Index:
    """The collection's BM25 index: its current stored build, else one built in memory from the collection.

    Never writes (readers are not the store's writer). Raises:
        pipeline.errors.StoreError: the collection cannot be read.
    """
    index = stored_build(col, store_cfg, settings)
    if index is not None:
        return index
    t0 = time.perf_counter()
    ids, texts = read_collection(col)
    index = BM25Index.build(ids, texts, settings)
    index.build_id = ""
    log.warning(
        "collection %r has no current BM25 index%s: built it in memory from %d chunks in %.1f s "
        "(run `rag-pipeline ingest` again to store it)", col.name,
        "" if index_root(store_cfg, col.name) else " (Chroma server without store.bm25_path)",
        len(ids), time.perf_counter() - t0,
    )
    return index


def ensure_index(store_cfg: StoreConfig, settings: BM25Settings, name: str | None = None) -> bool:
    """Store a current build for collection ``name`` (default ``store_cfg.collection``) if it has none.

    For the single writer only (rank0 under the barrier), so that the other RAG workers load a stored, memory-
    mapped index instead of each building one in memory. Holds the store's writer lock (local stores).

    Returns:
        True if an index was built and stored; False if a current build exists, the collection is missing or
        empty, or the store keeps no index (Chroma server without ``store.bm25_path``).

    Raises:
        pipeline.errors.StoreError: the store cannot be read or the index cannot be written, or another ingest
            holds the store.
    """
    from pipeline.store.client import collection_exists, get_collection, open_client, writer_lock

    name = name or store_cfg.collection
    if index_root(store_cfg, name) is None:
        return False
    with writer_lock(store_cfg):
        client = open_client(store_cfg, create=False)
        if not collection_exists(client, name):
            return False
        col = get_collection(client, name, create=False)
        if col.count() == 0 or stored_build(col, store_cfg, settings) is not None:
            return False
        rebuild(col, store_cfg, settings)
        return True
