"""How fast the cache stage's reader takes NSD rows from S3, against plain parallel range GETs of the same bytes.

One run, any machine: NSD-sized images (425x425x3 uint8) in a contiguous HDF5
served by a loopback S3 endpoint that answers range GETs with just those bytes
(bench/device/range_server.py), read in shards as the local engine does
(`read_workers` shards at once, 500 rows each). Prints img/s and bytes fetched
per image for:
  - the baseline: 16 threads of 16 MB range GETs, bodies read and dropped (the network's ceiling here);
  - `RowReader.read_into` (contiguous layout: GETs straight into the shard buffer);
  - the h5py path (what chunked or compressed data takes: prefetch, then h5py decodes through the reader);
each as a ratio of the baseline (goal for the reader: >= 0.9).

    .venv/bin/python bench/s3_rows.py [--images 4000] [--shard 500] [--read-workers 4]
"""

from __future__ import annotations

import argparse
import queue
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "device"))

from gpu import ROW_BYTES, s3_read_rate, write_images  # noqa: E402
from range_server import range_server  # noqa: E402

from clipforge.data.hdf5_source import RowReader, read_through_h5py  # noqa: E402
from clipforge.storage.range_reader import FetchStats  # noqa: E402


def read_shards(read_shard, shards: list[np.ndarray], workers: int) -> tuple[float, FetchStats]:
    """img/s of reading every shard, `workers` shards at once, into reused buffers whose pages are already mapped
    (the stage's pinned pool); and what fetching cost."""
    total = FetchStats()
    free: queue.Queue = queue.Queue()
    for _ in range(workers):
        free.put(np.ones((len(shards[0]), 425, 425, 3), np.uint8))

    def one(i: int) -> FetchStats:
        buffer = free.get()
        try:
            return read_shard(shards[i], buffer)
        finally:
            free.put(buffer)

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for stats in pool.map(one, range(len(shards))):
            total.add(stats)
    return sum(len(s) for s in shards) / (time.perf_counter() - start), total


def h5py_shard(uri: str):
    """The h5py path for any layout: prefetch the rows' byte ranges, then h5py reads them through the reader."""
    return lambda rows, out: read_through_h5py(uri, "imgBrick", rows, out[: len(rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--shard", type=int, default=500, help="rows per shard (the cache stage's batch_size)")
    parser.add_argument("--read-workers", type=int, default=4, help="shards read at once (the stage's default)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nsd.hdf5"
        write_images(path, args.images)
        ids = np.arange(args.images)
        shards = [ids[a : a + args.shard] for a in range(0, len(ids), args.shard)]
        uri = "s3://bench/nsd.hdf5"
        with range_server({"bench/nsd.hdf5": path}):
            baseline, how = s3_read_rate(uri, path, ids, [16])
            reader = RowReader(uri, "imgBrick")
            try:
                direct, direct_stats = read_shards(reader.read_into, shards, args.read_workers)
            finally:
                reader.close()
            through_h5py, h5py_stats = read_shards(h5py_shard(uri), shards, args.read_workers)

    print(f"\nS3 row reads: {args.images} NSD-sized images ({args.images * ROW_BYTES / 1e9:.2f} GB) on a loopback "
          f"range server, shards of {args.shard} rows, {args.read_workers} at once")
    rows = [(f"baseline: plain range GETs ({how})", baseline, None),
            ("RowReader.read_into (contiguous: GETs into the buffer)", direct, direct_stats),
            ("h5py through RangeReader (chunked/compressed path)", through_h5py, h5py_stats)]
    for name, rate, stats in rows:
        fetched = "" if stats is None else (f"  {stats.bytes / args.images / ROW_BYTES:.3f} x the image bytes, "
                                            f"{stats.requests} requests")
        goal = "  (goal >= 0.9)" if "RowReader" in name else ""
        print(f"  {name:<58} {rate:>9,.1f} img/s  {rate / baseline:.2f}x{goal}{fetched}")


if __name__ == "__main__":
    main()
