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
    assert parquet.read_frame(data)["id"].tolist() == list(range(100))
    assert parquet.read_schema(data).metadata[b"clipforge"] == b'{"model": "m"}'
    with pytest.raises((pa.ArrowException, OSError)):
        parquet.read_table(data[: len(data) // 2])


def test_reading_starts_no_thread_and_exits_with_its_own_code(tmp_path):
    """Arrow threads that outlived a read could abort the process at exit (SIGABRT, not the stage's exit code:
    ~3-6% of runs with `pq.read_table`, once in 24 in CI with `ParquetFile.read` on the thread pool). A read that
    starts no thread cannot: the script counts its threads before and after reading twelve files (as tables and
    as DataFrames), then exits."""
    for i in range(12):
        (tmp_path / f"{i}.parquet").write_bytes(parquet_bytes(1000, 512, seed=i))
    script = (f"import os, pathlib, sys\nfrom clipforge.storage import parquet\n"
              f"threads = lambda: len(os.listdir('/proc/self/task'))\nbefore = threads()\n"
              f"for path in sorted(pathlib.Path({str(tmp_path)!r}).glob('*.parquet')):\n"
              f"    parquet.read_table(path.read_bytes()), parquet.read_frame(path.read_bytes())\n"
              f"print(before, threads())\nsys.exit(2)\n")

    def run(_):
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)

    with ThreadPoolExecutor(2) as pool:
        finished = list(pool.map(run, range(4)))
    assert [p.returncode for p in finished] == [2] * 4, next(p.stderr for p in finished if p.returncode != 2)
    before, after = finished[0].stdout.split()
    assert after == before
