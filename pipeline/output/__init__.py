"""Run output: the row schema, the commit protocol and ledger, sharding, streamed statistics, status, merge.

Modules, one concern each:

* :mod:`~pipeline.output.schema`: the output row schema (the one place it is defined).
* :mod:`~pipeline.output.layout`: where a directory keeps what is not rows (``.rag-pipeline/``).
* :mod:`~pipeline.output.migrate`: an earlier version's names moved into ``.rag-pipeline/``.
* :mod:`~pipeline.output.files`: atomic writes, JSON bookkeeping files, the input fingerprint.
* :mod:`~pipeline.output.sharding`: ``--shard I/N`` partition and shard directories.
* :mod:`~pipeline.output.reading`: committed parts, streamed column-projected scans (pyarrow.dataset).
* :mod:`~pipeline.output.ledger`: committed ids of a run, loaded once, updated in memory by every commit.
* :mod:`~pipeline.output.rundir`: :class:`OutputDir`, one run directory and its atomic commit protocol.
* :mod:`~pipeline.output.stats`: counts, latency percentiles and errors over committed rows, streamed.
* :mod:`~pipeline.output.status`: ``rag-pipeline status``.
* :mod:`~pipeline.output.merge`: ``rag-pipeline merge`` (exactly-once by sorted id digests).
"""

from pipeline.output.files import atomic_write_bytes, atomic_write_json, input_fingerprint, read_json
from pipeline.output.layout import MANIFEST_FILE, META_DIR, REJECTED_FILE, RUN_FILE, locate, meta_path
from pipeline.output.ledger import Ledger
from pipeline.output.merge import merge_shards
from pipeline.output.reading import (
    PART_RE,
    is_run_dir,
    iter_part_tables,
    part_paths,
    read_rows,
    run_dirs,
    scan_batches,
)
from pipeline.output.rundir import OutputDir
from pipeline.output.schema import RESERVED_COLUMNS, row_schema
from pipeline.output.sharding import (
    SHARD_RE,
    default_merge_dir,
    in_shard,
    parse_shard,
    shard_dir,
    shard_dirs,
    shard_size,
)
from pipeline.output.stats import RowStats, scan_stats
from pipeline.output.status import dir_status, run_status

__all__ = [
    "MANIFEST_FILE",
    "META_DIR",
    "PART_RE",
    "REJECTED_FILE",
    "RESERVED_COLUMNS",
    "RUN_FILE",
    "SHARD_RE",
    "Ledger",
    "OutputDir",
    "RowStats",
    "atomic_write_bytes",
    "atomic_write_json",
    "default_merge_dir",
    "dir_status",
    "in_shard",
    "input_fingerprint",
    "is_run_dir",
    "iter_part_tables",
    "locate",
    "meta_path",
    "merge_shards",
    "parse_shard",
    "part_paths",
    "read_json",
    "read_rows",
    "row_schema",
    "run_dirs",
    "run_status",
    "scan_batches",
    "scan_stats",
    "shard_dir",
    "shard_dirs",
    "shard_size",
]
