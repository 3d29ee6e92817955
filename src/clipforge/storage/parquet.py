"""Parquet files held in memory as bytes (what `storage.read_bytes` returns, local or S3), read to a table.

`pq.read_table(io.BytesIO(data))` scans through Arrow's dataset machinery, whose
background threads can still hold the Python file object when the call returns.
If the process exits then (a stage that read a cache and stopped on a bad
config), a thread asks for the GIL during interpreter shutdown and the process
aborts with "terminate called without an active exception" instead of exiting
with its own code (apache/arrow#34314, #39862). Reading a `BufferReader` with
`ParquetFile` decodes in the calling call and leaves no thread behind.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq


def read_table(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """The table in parquet `data`; pyarrow's errors (ArrowException, OSError) pass through to the caller."""
    with pq.ParquetFile(pa.BufferReader(data)) as parquet:
        return parquet.read(columns=columns)


def read_schema(data: bytes) -> pa.Schema:
    """The Arrow schema of parquet `data`, with its key-value metadata."""
    with pq.ParquetFile(pa.BufferReader(data)) as parquet:
        return parquet.schema_arrow
