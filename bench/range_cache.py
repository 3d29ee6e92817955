"""What verifying cached ranges costs: `RangeCache.get` (read, then check the CRC-32 each file carries) against
reading the same files' bytes without a check (what it did before, when only the length was compared), in one run.

A cache stage over S3 with `--cache-dir` serves every range it fetched before from these files, so a check that
slowed reads down would show in the second run of a cache. NSD rows are 541,875 bytes; ranges of a few rows are
coalesced, so the default is 2 MB ranges. Prints MB/s for each and the ratio (checked ÷ unchecked; 1 is free).

    .venv/bin/python bench/range_cache.py [--ranges 200] [--size 2000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from clipforge.storage.range_reader import RangeCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranges", type=int, default=200)
    parser.add_argument("--size", type=int, default=2_000_000, help="bytes per cached range")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each; the best is kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        cache = RangeCache(root, "bucket", "nsd_stimuli.hdf5", "etag")
        starts = [n * args.size for n in range(args.ranges)]
        for start in starts:
            cache.put(start, os.urandom(args.size))
        paths = [cache._path(start, args.size) for start in starts]
        best = {"checked": float("inf"), "unchecked": float("inf")}
        for _ in range(args.repeat):
            began = time.perf_counter()
            for start in starts:
                assert cache.get(start, args.size) is not None
            best["checked"] = min(best["checked"], time.perf_counter() - began)
            began = time.perf_counter()
            for path in paths:  # the baseline: the bytes, their length compared, nothing else
                assert len(path.read_bytes()[: args.size]) == args.size
            best["unchecked"] = min(best["unchecked"], time.perf_counter() - began)
    total = args.ranges * args.size / 1e6
    print(f"{args.ranges} cached ranges of {args.size / 1e6:.1f} MB (page cache warm), best of {args.repeat}:")
    for name, seconds in best.items():
        print(f"  {name:9s} {seconds:.3f} s  {total / seconds:,.0f} MB/s")
    print(f"ratio (checked / unchecked throughput): {best['unchecked'] / best['checked']:.2f}")


if __name__ == "__main__":
    main()
