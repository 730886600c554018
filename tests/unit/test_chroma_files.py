"""pipeline.store.chroma_files: the one reader of Chroma's SQLite layout, and its two users (preflight, mode).

Stores are tiny SQLite files built here with the tables the reader expects (no chromadb, no process).
"""

from __future__ import annotations

import ast
import sqlite3
from pathlib import Path

import pytest

from pipeline.config import Config, RetrievalConfig, RunConfig, StoreConfig
from pipeline.errors import StoreError
from pipeline.store import chroma_files, preflight
from pipeline.store.chroma_files import (
    SQLITE_FILE,
    collection_names,
    count_chunks,
    has_sqlite_file,
    sqlite_file,
)

ROOT = Path(__file__).resolve().parents[2]


def make_store(path: Path, collections: dict[str, int], *, vector_rows: int = 0) -> Path:
    """A directory with a chroma.sqlite3 holding ``collections`` ({name: chunks}) in Chroma's layout: one
    METADATA segment per collection with one embeddings row per chunk (plus ``vector_rows`` rows in a VECTOR
    segment, which are not chunks)."""
    path.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path / SQLITE_FILE)
    con.executescript(
        "CREATE TABLE collections (id TEXT PRIMARY KEY, name TEXT);"
        "CREATE TABLE segments (id TEXT PRIMARY KEY, type TEXT, scope TEXT, collection TEXT);"
        "CREATE TABLE embeddings (id INTEGER PRIMARY KEY, segment_id TEXT, embedding_id TEXT);"
    )
    for i, (name, n) in enumerate(collections.items()):
        cid, meta, vec = f"c{i}", f"m{i}", f"v{i}"
        con.execute("INSERT INTO collections VALUES (?, ?)", (cid, name))
        con.execute("INSERT INTO segments VALUES (?, 'sqlite', 'METADATA', ?)", (meta, cid))
        con.execute("INSERT INTO segments VALUES (?, 'hnsw', 'VECTOR', ?)", (vec, cid))
        con.executemany("INSERT INTO embeddings (segment_id, embedding_id) VALUES (?, ?)",
                        [(meta, f"{name}-{k}") for k in range(n)] + [(vec, f"v-{k}") for k in range(vector_rows)])
    con.commit()
    con.close()
    return path


def other_layout(path: Path) -> Path:
    """A chroma.sqlite3 of another layout: an SQLite file without the expected tables."""
    path.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path / SQLITE_FILE)
    con.executescript("CREATE TABLE collection_v9 (uuid TEXT, label TEXT); INSERT INTO collection_v9 VALUES ('a', 'x');")
    con.commit()
    con.close()
    return path


def _cfg(store: Path, *collections: str) -> Config:
    """A run over the local store ``store`` reading collection "example" and ``collections``; nothing ingested."""
    return Config(store=StoreConfig(path=str(store), collection="example"),
                  retrieval=RetrievalConfig(collections=tuple(collections)),
                  run=RunConfig(ingest=""))


# -- the reader ---------------------------------------------------------------------------------------


def test_collection_names(tmp_path):
    store = make_store(tmp_path / "s", {"example": 3, "other": 0})
    assert collection_names(store) == {"example", "other"}


def test_collection_names_of_a_store_without_collections(tmp_path):
    assert collection_names(make_store(tmp_path / "s", {})) == set()


def test_count_chunks_counts_metadata_rows_only(tmp_path):
    store = make_store(tmp_path / "s", {"example": 5}, vector_rows=7)
    assert count_chunks(store, ["example"]) == 5


def test_count_chunks_sums_collections_and_absent_ones_count_zero(tmp_path):
    store = make_store(tmp_path / "s", {"a": 2, "b": 3, "c": 11})
    assert count_chunks(store, ["a", "b"]) == 5
    assert count_chunks(store, ["a", "absent"]) == 2
    assert count_chunks(store, ["absent"]) == 0
    assert count_chunks(store, []) == 0


def test_a_collection_name_is_a_parameter_not_sql(tmp_path):
    store = make_store(tmp_path / "s", {"it's": 4, "x": 1})
    assert count_chunks(store, ["it's"]) == 4
    assert count_chunks(store, ["x' OR '1'='1"]) == 0


def test_no_store_is_none(tmp_path):
    assert collection_names(tmp_path / "nothing") is None
    assert count_chunks(tmp_path / "nothing", ["example"]) is None
    assert not has_sqlite_file(tmp_path / "nothing")


def test_a_directory_named_like_the_file_is_no_store(tmp_path):
    (tmp_path / "s" / SQLITE_FILE).mkdir(parents=True)
    assert not has_sqlite_file(tmp_path / "s")
    assert collection_names(tmp_path / "s") is None


def test_another_layout_falls_back_to_none(tmp_path):
    store = other_layout(tmp_path / "s")
    assert has_sqlite_file(store)
    assert collection_names(store) is None
    assert count_chunks(store, ["x"]) is None


def test_missing_column_falls_back_to_none(tmp_path):
    store = tmp_path / "s"
    store.mkdir()
    con = sqlite3.connect(store / SQLITE_FILE)
    con.executescript("CREATE TABLE collections (id TEXT, title TEXT); CREATE TABLE segments (id TEXT);"
                      "CREATE TABLE embeddings (id INTEGER);")
    con.close()
    assert collection_names(store) is None
    assert count_chunks(store, ["x"]) is None


def test_a_file_that_is_not_sqlite_falls_back_to_none(tmp_path):
    store = tmp_path / "s"
    store.mkdir()
    (store / SQLITE_FILE).write_bytes(b"this is not a database, just forty-odd bytes of text\n" * 4)
    assert collection_names(store) is None
    assert count_chunks(store, ["x"]) is None


def test_an_empty_file_falls_back_to_none(tmp_path):
    store = tmp_path / "s"
    store.mkdir()
    (store / SQLITE_FILE).touch()
    assert collection_names(store) is None


def test_reading_leaves_the_store_unchanged(tmp_path):
    store = make_store(tmp_path / "s", {"example": 2})
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    collection_names(store)
    count_chunks(store, ["example"])
    collection_names(other_layout(tmp_path / "o"))
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before


def test_the_connection_is_read_only(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s", {"example": 2})

    def write(con):
        con.execute("DELETE FROM embeddings")
        con.commit()

    assert chroma_files._read(store, write) is None  # "attempt to write a readonly database": the fallback
    assert count_chunks(store, ["example"]) == 2


def test_a_store_locked_by_a_writer_falls_back_after_the_timeout(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s", {"example": 2})
    monkeypatch.setattr(chroma_files, "TIMEOUT_S", 0.05)
    writer = sqlite3.connect(store / SQLITE_FILE, isolation_level=None)
    try:
        writer.execute("BEGIN EXCLUSIVE")
        assert count_chunks(store, ["example"]) is None
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert count_chunks(store, ["example"]) == 2


@pytest.mark.parametrize("dirname", ["with space", "hash#dir", "percent%41dir", "quest?ion", "ünï"])
def test_odd_characters_in_the_path(tmp_path, dirname):
    store = make_store(tmp_path / dirname / "store", {"example": 3})
    assert collection_names(store) == {"example"}
    assert count_chunks(store, ["example"]) == 3


def test_a_relative_path(tmp_path, monkeypatch):
    make_store(tmp_path / "data" / "store", {"example": 1})
    monkeypatch.chdir(tmp_path)
    assert count_chunks("data/store", ["example"]) == 1
    assert sqlite_file("data/store") == Path("data/store") / SQLITE_FILE


# -- its users ----------------------------------------------------------------------------------------


def test_only_chroma_files_names_chromas_sqlite_file_or_tables():
    root = Path(chroma_files.__file__).resolve().parents[1]
    sql = ("FROM segments", "FROM collections", "FROM embeddings", "JOIN segments", "JOIN embeddings")
    spelled = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value == "chroma.sqlite3" or any(s in node.value for s in sql)):
                spelled.add(str(path.relative_to(root)))
    assert spelled == {"store/chroma_files.py"}, spelled


def test_preflight_accepts_a_store_with_the_collections(tmp_path):
    store = make_store(tmp_path / "s", {"example": 1, "extra": 1})
    preflight.check_store(_cfg(store, "extra"))


def test_preflight_names_a_missing_collection_and_the_known_ones(tmp_path):
    store = make_store(tmp_path / "s", {"example": 1, "b": 0})
    with pytest.raises(StoreError, match=r"collection 'extra' not found in .* \(collections: b, example\)"):
        preflight.check_store(_cfg(store, "extra"))


def test_preflight_rejects_a_directory_without_the_database(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(StoreError, match=r"not a Chroma store \(no chroma\.sqlite3\)"):
        preflight.check_store(_cfg(tmp_path / "s"))


def test_preflight_rejects_a_missing_directory(tmp_path):
    with pytest.raises(StoreError, match="vector store not found"):
        preflight.check_store(_cfg(tmp_path / "none"))


def test_preflight_skips_the_check_on_another_layout(tmp_path):
    preflight.check_store(_cfg(other_layout(tmp_path / "s"), "anything"))


def test_only_chroma_files_knows_the_layout():
    """No other module of pipeline/ or workers/ opens Chroma's SQLite file or names its tables."""
    for path in [*sorted((ROOT / "pipeline").rglob("*.py")), *sorted((ROOT / "workers").rglob("*.py"))]:
        if path.name == "chroma_files.py":
            continue
        code = _code_without_docstrings(path)
        assert "chroma.sqlite3" not in code, path
        assert "FROM collections" not in code and "JOIN segments" not in code, path


def test_the_main_side_store_modules_do_not_import_chromadb():
    for name in ("chroma_files.py", "preflight.py", "mode.py"):
        tree = ast.parse((ROOT / "pipeline" / "store" / name).read_text())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(m.split(".")[0] == "chromadb" for m in mods), name


def _code_without_docstrings(path: Path) -> str:
    """The file's string constants, docstrings left out (bare string statements: they may describe the layout)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return "\n".join(n.value for n in ast.walk(tree)
                     if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs)
