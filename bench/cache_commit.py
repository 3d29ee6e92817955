"""How fast the cache stage can commit shards: one writer thread against the local engine's COMMIT_WORKERS.

Each shard's commit is `clipforge.stages.cache_shards.commit_shard`: its embeddings checked, a parquet file
written and fsynced. With a fast encoder (ViT-B-32 on an H200 encodes 500-row shards ~40 times a second)
the committing threads must keep up, or the encoder waits for them. One run: `--shards` shards of
`--rows` x `--dim` float32 embeddings into a fresh folder under `--dir` (the file system an output would be on)
each time, on 1 and on COMMIT_WORKERS threads, alternated (a change of load falls on both), best of `--repeat`;
prints shards/s, img/s and the ratio.

    .venv/bin/python bench/cache_commit.py [--shards 40] [--rows 500] [--dim 512] [--repeat 2] [--dir .]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from clipforge.stages.cache_local import COMMIT_WORKERS
from clipforge.stages.cache_shards import commit_shard


def commit_rate(workers: int, shards: int, embeddings: np.ndarray, folder: str) -> float:
    """Shards committed per second by `workers` threads."""
    ids, splits = np.arange(len(embeddings)), [""] * len(embeddings)
    out = tempfile.mkdtemp(prefix="clipforge-commit-", dir=folder)
    try:
        with ThreadPoolExecutor(workers) as pool:
            start = time.perf_counter()
            list(pool.map(lambda i: commit_shard(out, f"shard-{i:05d}.parquet", ids, splits, embeddings,
                                                 {"name": "bench", "dim": embeddings.shape[1]}), range(shards)))
            return shards / (time.perf_counter() - start)
    finally:
        shutil.rmtree(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=".", help="where the shards are written (and removed)")
    args = parser.parse_args()
    embeddings = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
    rates = {1: 0.0, COMMIT_WORKERS: 0.0}
    for _ in range(args.repeat):
        for workers in rates:
            rates[workers] = max(rates[workers], commit_rate(workers, args.shards, embeddings, args.dir))
    print(f"{args.shards} shards of {args.rows} x {args.dim} float32, best of {args.repeat}:")
    for workers, rate in rates.items():
        print(f"  {workers} commit thread(s): {rate:6.1f} shards/s ({rate * args.rows:8.0f} img/s)  "
              f"{rate / rates[1]:.2f}")


if __name__ == "__main__":
    main()
