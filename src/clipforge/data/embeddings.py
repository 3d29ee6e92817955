"""Reading an embedding cache: the parquet shards the cache stage commits.

Layout under a cache prefix: `shard-*.parquet` files with columns `id`
(int64, or string for image folders), `split` (string, may be null) and
`embedding` (fixed-size list of float32, L2-normalised), the model described in
the schema metadata under `clipforge`, and `_manifest.json` last.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipforge.errors import UserError
from clipforge.storage import uri as storage
from clipforge.storage.manifest import read_manifest

METADATA_KEY = b"clipforge"


@dataclass
class EmbeddingTable:
    """A whole cache in memory: row i of `embeddings` belongs to `ids[i]`."""

    ids: np.ndarray
    splits: np.ndarray  # object array of str or None
    embeddings: np.ndarray  # float32 (n, dim)
    model: dict
    manifest: dict

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def has_splits(self) -> bool:
        return any(s is not None for s in self.splits)


def embedding_schema(dim: int, id_type: pa.DataType, model: dict) -> pa.Schema:
    return pa.schema(
        [("id", id_type), ("split", pa.string()), ("embedding", pa.list_(pa.float32(), dim))],
        metadata={METADATA_KEY: json.dumps({"model": model}).encode()},
    )


def embeddings_to_table(ids, splits, embeddings: np.ndarray, model: dict) -> pa.Table:
    """One shard's rows as an Arrow table in the cache schema."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = embeddings.shape
    id_type = pa.string() if len(ids) and isinstance(ids[0], str) else pa.int64()
    schema = embedding_schema(dim, id_type, model)
    flat = pa.array(embeddings.reshape(-1), type=pa.float32())
    return pa.Table.from_arrays(
        [pa.array(list(ids), type=id_type), pa.array(list(splits), type=pa.string()),
         pa.FixedSizeListArray.from_arrays(flat, dim)],
        schema=schema,
    )


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def cache_manifest(prefix: str, role: str = "cache") -> dict:
    """A committed cache's manifest; a prefix without one, or with another stage's, is a UserError naming `role`."""
    manifest = read_manifest(prefix)
    if manifest is None:
        raise UserError(f"{role} {prefix} is incomplete or missing: no _manifest.json (has the cache stage finished?)")
    if manifest.get("kind") != "cache":
        raise UserError(f"{role} {prefix} holds the output of a {manifest.get('kind')} stage, not an embedding cache")
    return manifest


def read_embeddings(prefix: str, role: str = "cache") -> EmbeddingTable:
    """Load a committed cache; an uncommitted one (no manifest) or another stage's output is a UserError."""
    manifest = cache_manifest(prefix, role)
    tables = []
    for shard in manifest["shards"]:
        raw = storage.read_bytes(storage.join(prefix, shard["path"]))
        tables.append(pq.read_table(io.BytesIO(raw)))
    if not tables:
        raise UserError(f"cache {prefix} has no rows")
    table = pa.concat_tables(tables)
    dim = table.schema.field("embedding").type.list_size
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return EmbeddingTable(
        ids=table.column("id").to_numpy(zero_copy_only=False),
        splits=np.array(table.column("split").to_pylist(), dtype=object),
        embeddings=np.array(flat, dtype=np.float32).reshape(len(table), dim),  # a writable copy
        model=manifest.get("model", {}),
        manifest=manifest,
    )
