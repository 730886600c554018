"""The usual readers of a Parquet directory, as users call them, for the exactly-once tests of output directories.

Each reader returns the ``id`` column of what it reads from directory ``D``; a reader that is not installed here
is skipped by the test that asks for it (``pytest.importorskip``).
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _pyarrow(d: Path, tmp: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(d, columns=["id"]).column("id").to_pylist()


def _pandas(d: Path, tmp: Path) -> list[str]:
    pd = pytest.importorskip("pandas")
    return pd.read_parquet(d, columns=["id"])["id"].tolist()


def _duckdb(d: Path, tmp: Path) -> list[str]:
    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    try:
        pattern = f"{d}/**/*.parquet".replace("'", "''")
        return [r[0] for r in con.execute(f"SELECT id FROM read_parquet('{pattern}', union_by_name = true)").fetchall()]
    finally:
        con.close()


def _datasets(d: Path, tmp: Path, **how: str) -> list[str]:
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", **how, cache_dir=str(tmp / "hf-cache"))
    return [x for split in ds.values() for x in split["id"]]


def _datasets_data_dir(d: Path, tmp: Path) -> list[str]:
    return _datasets(d, tmp, data_dir=str(d))


def _datasets_glob(d: Path, tmp: Path) -> list[str]:
    return _datasets(d, tmp, data_files=f"{d}/**/*.parquet")


READERS = {
    "pyarrow.parquet.read_table(D)": _pyarrow,
    "pandas.read_parquet(D)": _pandas,
    "duckdb.read_parquet('D/**/*.parquet')": _duckdb,
    "datasets.load_dataset('parquet', data_files='D/**/*.parquet')": _datasets_glob,
    "datasets.load_dataset('parquet', data_dir=D)": _datasets_data_dir,
}
"""name -> reader(D, tmp_dir) -> ids read."""

def reader_params() -> list:
    """``pytest.param`` per reader, named by how a user calls it."""
    return [pytest.param(fn, id=name) for name, fn in READERS.items()]


def assert_each_once(reader, d: Path, expected: list[str], tmp: Path) -> None:
    """``reader`` reads every id of ``expected`` from ``d`` exactly once, and nothing else."""
    got = reader(d, tmp)
    assert sorted(got) == sorted(expected), (d, sorted(got))
