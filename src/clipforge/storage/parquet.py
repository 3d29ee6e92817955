"""Parquet files held in memory as bytes (what `storage.read_bytes` returns, local or S3), read to a table;
and a DataFrame made parquet bytes, to write in one piece.

`pq.read_table(io.BytesIO(data))` scans through Arrow's dataset machinery, whose
background threads can still hold the Python file object when the call returns.
If the process exits then (a stage that read a cache and stopped on a bad
config), a thread asks for the GIL during interpreter shutdown and the process
aborts with "terminate called without an active exception" instead of exiting
with its own code (apache/arrow#34314, #39862). Reading a `BufferReader` with
`ParquetFile` leaves no scan behind, but its `read` still decoded columns on
Arrow's thread pool, whose workers can drop the last reference to the Python
bytes after the call returns: CI saw that abort once in 24 runs. Decoding on the
calling thread starts no thread at all, and a cache shard (an id column and an
embedding column) decodes as fast that way.
"""

from __future__ import annotations

import io

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def read_table(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """The table in parquet `data`; pyarrow's errors (ArrowException, OSError) pass through to the caller."""
    with pq.ParquetFile(pa.BufferReader(data)) as parquet:
        return parquet.read(columns=columns, use_threads=False)


def read_frame(data: bytes) -> pd.DataFrame:
    """The table in parquet `data` as a DataFrame, converted on the calling thread too (`to_pandas` would start
    Arrow's thread pool)."""
    return read_table(data).to_pandas(use_threads=False)


def read_schema(data: bytes) -> pa.Schema:
    """The Arrow schema of parquet `data`, with its key-value metadata."""
    with pq.ParquetFile(pa.BufferReader(data)) as parquet:
        return parquet.schema_arrow


def frame_bytes(frame: pd.DataFrame) -> bytes:
    """A DataFrame as parquet bytes (no index column), to write in one piece."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()
