"""Parquet bytes read back whole, and a process that reads them and exits at once exits with its own code."""

import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipforge.storage import parquet


def parquet_bytes(rows: int, dim: int, seed: int) -> bytes:
    values = np.random.default_rng(seed).random(rows * dim, dtype=np.float32)
    table = pa.table({"id": np.arange(rows), "embedding": pa.FixedSizeListArray.from_arrays(pa.array(values), dim)},
                     metadata={b"clipforge": b'{"model": "m"}'})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def test_tables_schema_and_columns_read_back():
    data = parquet_bytes(100, 8, seed=0)
    assert parquet.read_table(data).equals(pq.read_table(io.BytesIO(data)))
    assert parquet.read_table(data, ["id"]).column_names == ["id"]
    assert parquet.read_schema(data).metadata[b"clipforge"] == b'{"model": "m"}'
    with pytest.raises((pa.ArrowException, OSError)):
        parquet.read_table(data[: len(data) // 2])


def test_reading_then_exiting_at_once_never_aborts(tmp_path):
    """Arrow's dataset scan (pq.read_table on a file object) could leave a thread that aborted the process at
    exit, ~3-6% of runs on this machine: a stage stopped by a bad config died with SIGABRT, not its exit code."""
    for i in range(12):
        (tmp_path / f"{i}.parquet").write_bytes(parquet_bytes(1000, 512, seed=i))
    script = (f"import pathlib, sys\nfrom clipforge.storage import parquet\n"
              f"for path in sorted(pathlib.Path({str(tmp_path)!r}).glob('*.parquet')):\n"
              f"    parquet.read_table(path.read_bytes())\nsys.exit(2)\n")

    def run(_):
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)

    with ThreadPoolExecutor(3) as pool:
        finished = list(pool.map(run, range(24)))
    assert [p.returncode for p in finished] == [2] * 24, next(p.stderr for p in finished if p.returncode != 2)
