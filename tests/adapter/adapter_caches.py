"""Tiny embedding caches in the cache stage's own output format, with a planted map between them."""

from __future__ import annotations

import numpy as np

from clipforge.data.embeddings import embeddings_to_table, table_to_parquet_bytes
from clipforge.storage import uri as storage
from clipforge.storage.manifest import write_manifest

SRC_DIM, TGT_DIM = 16, 32


def write_cache(prefix: str, ids, splits, embeddings: np.ndarray, model: dict, shards: int = 2, *,
                source: dict | None = None, dataset: str = "imgBrick") -> str:
    """Parquet shards + `_manifest.json`, exactly what the cache stage commits; `source`: the source file's
    fingerprint the manifest records ({uri, size, mtime_ns} on disk, {uri, size, etag} on S3), none by default."""
    listing = []
    for number, rows in enumerate(np.array_split(np.arange(len(ids)), shards)):
        name = f"shard-{number:05d}.parquet"
        table = embeddings_to_table([ids[i] for i in rows], [splits[i] for i in rows], embeddings[rows], model)
        storage.write_bytes(storage.join(prefix, name), table_to_parquet_bytes(table))
        listing.append({"path": name, "rows": len(rows)})
    config = {"model": model["name"], **({"source": source["uri"], "dataset": dataset} if source else {})}
    write_manifest(prefix, kind="cache", config=config, config_fingerprint=model["name"],
                   inputs={"source": source} if source else {}, shards=listing, rows=len(ids), model=model)
    return prefix


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted_map(n: int = 600, n_test: int = 100, seed: int = 0, noise: float = 0.02):
    """ids, splits, sources (n, 16) and targets (n, 32) = normalise(nonlinear(source) + noise)."""
    rng = np.random.default_rng(seed)
    source = normalise(rng.normal(size=(n, SRC_DIM)))
    w1 = rng.normal(size=(SRC_DIM, 64)) * 2.0
    w2 = rng.normal(size=(64, TGT_DIM))
    target = normalise(np.tanh(source @ w1) @ w2 + noise * rng.normal(size=(n, TGT_DIM)))
    ids = np.arange(1000, 1000 + n)
    splits = np.array(["test" if i < n_test else "train" for i in range(n)], dtype=object)
    return ids, splits, source, target


def write_pair(root: str, n: int = 600, n_test: int = 100, *, with_splits: bool = True, **kwargs):
    """A source and a target cache under `root`; rows shuffled differently in each, as real caches may be."""
    ids, splits, source, target = planted_map(n, n_test, **kwargs)
    if not with_splits:
        splits = np.array([None] * n, dtype=object)
    rng = np.random.default_rng(99)
    order_s, order_t = rng.permutation(n), rng.permutation(n)
    src = write_cache(storage.join(root, "src"), list(ids[order_s]), list(splits[order_s]), source[order_s],
                      {"name": "ViT-B-32-tiny", "dim": SRC_DIM})
    tgt = write_cache(storage.join(root, "tgt"), list(ids[order_t]), list(splits[order_t]), target[order_t],
                      {"name": "ViT-H-14-tiny", "dim": TGT_DIM})
    return src, tgt


# Small, fast settings that still learn the planted map; tests override what they exercise.
FAST = dict(epochs=12, batch_size=32, lr=3e-3, hidden_dim=64, depth=1, dropout=0.0, device="cpu", log_every=60.0,
            warmup=0.05)



def config_args(values: dict) -> list[str]:
    """CLI flags for a dict of settings."""
    args = []
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def weights(out: str) -> dict:
    from clipforge.models.adapter import load_adapter

    return {k: v.clone() for k, v in load_adapter(out).state_dict().items()}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
