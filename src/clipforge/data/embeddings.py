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

from clipforge.errors import UserError, first_line
from clipforge.storage import parquet
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
    if manifest is None and storage.is_file(prefix):
        raise UserError(f"{role} {prefix} is a file: give the folder the cache stage wrote (its --output)")
    if manifest is None:
        raise UserError(f"{role} {prefix} is incomplete or missing: no _manifest.json (has the cache stage finished?)")
    if manifest.get("kind") != "cache":
        raise UserError(f"{role} {prefix} holds a stage's output ({manifest.get('kind')}), not an embedding cache")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("path"), str) for s in shards):
        raise UserError(f"{role} {prefix}: its _manifest.json lists no shards (a list of {{path, rows}}); delete it "
                        "and run its cache stage again")
    return manifest


def read_shard(prefix: str, name: str, columns: list[str] | None = None) -> pa.Table:
    """One shard a committed cache's manifest lists; one that is gone or does not read back (a disk, a copy cut
    short) is a UserError naming it and saying how to rebuild: the cache stage encodes such shards again."""
    uri = storage.join(prefix, name)
    rebuild = f"the cache must be rebuilt: delete {storage.join(prefix, '_manifest.json')} and run its cache " \
              "stage again, which encodes only missing or damaged shards"
    try:
        data = storage.read_bytes(uri)
    except UserError:
        raise UserError(f"cache shard {uri} is missing; {rebuild}") from None
    try:
        table = parquet.read_table(data, columns)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"cache shard {uri} is not a readable parquet file ({first_line(exc)}); {rebuild}") from None
    missing = [column for column in columns or ("id", "split", "embedding") if column not in table.column_names]
    if missing:
        raise UserError(f"cache shard {uri} has no {', '.join(missing)} column; {rebuild}")
    return table


def read_embeddings(prefix: str, role: str = "cache") -> EmbeddingTable:
    """Load a committed cache; an uncommitted one (no manifest) or another stage's output is a UserError.

    Shard by shard into one array sized from the manifest: memory is the cache plus one shard, where
    concatenating tables and then converting held three copies (a 100,000-row cache is 400 MB at 1024-D)."""
    manifest = cache_manifest(prefix, role)
    shards = manifest["shards"]
    sized = all(isinstance(shard.get("rows"), int) for shard in shards)
    total = sum(shard["rows"] for shard in shards) if sized else 0
    embeddings, parts, ids, splits, at = None, [], [], [], 0
    for shard in shards:
        table = read_shard(prefix, shard["path"])
        dim = table.schema.field("embedding").type.list_size
        values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        values = values.reshape(len(table), dim)
        if not sized:
            parts.append(values.astype(np.float32, copy=True))
        else:
            if embeddings is None:
                embeddings = np.empty((total, dim), dtype=np.float32)
            if at + len(values) > total:
                raise UserError(f"cache {prefix}: shard {shard['path']} holds more rows than its manifest lists")
            embeddings[at : at + len(values)] = values
        at += len(values)
        ids.append(table.column("id").to_numpy(zero_copy_only=False))
        splits.extend(table.column("split").to_pylist())
    if at == 0:
        raise UserError(f"cache {prefix} has no rows")
    if sized and at != total:
        raise UserError(f"cache {prefix}: its shards hold {at} rows, its manifest lists {total}")
    return EmbeddingTable(
        ids=np.concatenate(ids),
        splits=np.array(splits, dtype=object),
        embeddings=embeddings if sized else np.concatenate(parts),  # writable, float32
        model=manifest.get("model", {}),
        manifest=manifest,
    )
