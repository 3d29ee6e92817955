"""How fast `storage.delete_tree` empties an S3 prefix (what `clipforge prune` and checkpoint rotation call),
against one DELETE per object (what it did before), on a loopback S3 server (moto), in one run.

A generate output holds one PNG per id (1,000 for NSD's shared test images), so per-object deletes are that
many round trips. Prints seconds for each and the ratio (baseline ÷ delete_tree; higher is better).

    .venv/bin/python bench/s3_delete.py [--objects 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from clipforge.storage import s3
from clipforge.storage import uri as storage
from clipforge.storage.local_s3 import local_s3_server


def fill(bucket: str, prefix: str, count: int) -> list[str]:
    keys = [f"{prefix}/images/{n:05d}.png" for n in range(count)]
    client = s3.client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket, Key=key, Body=b"x" * 1024), keys))
    return keys


def one_by_one(bucket: str, prefix: str) -> None:
    """The baseline: list the prefix, then one DeleteObject per key (storage.delete_tree before batching)."""
    for name in storage.list_tree(f"s3://{bucket}/{prefix}"):
        storage.delete(f"s3://{bucket}/{prefix}/{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each; the best is kept")
    args = parser.parse_args()
    with local_s3_server():
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3.client().create_bucket(Bucket=bucket)
        best = {"one DELETE per object": float("inf"), "storage.delete_tree": float("inf")}
        for attempt in range(args.repeat):
            for label, delete in (("one DELETE per object", lambda p: one_by_one(bucket, p)),
                                  ("storage.delete_tree", lambda p: storage.delete_tree(f"s3://{bucket}/{p}"))):
                prefix = f"run{attempt}-{label[:3]}"
                fill(bucket, prefix, args.objects)
                start = time.perf_counter()
                delete(prefix)
                best[label] = min(best[label], time.perf_counter() - start)
                assert not storage.list_tree(f"s3://{bucket}/{prefix}"), f"{label} left objects behind"
    for label, seconds in best.items():
        print(f"{label:<24} {args.objects} objects  {seconds:7.3f} s")
    print(f"ratio (one by one / delete_tree): {best['one DELETE per object'] / best['storage.delete_tree']:.1f}x")


if __name__ == "__main__":
    main()
