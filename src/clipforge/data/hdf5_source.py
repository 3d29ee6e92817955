"""Rows of an image dataset inside an HDF5 file, local or on S3, reading only their bytes.

On S3 the file is opened through a `RangeReader`. Before h5py reads the rows,
their byte ranges (contiguous layout: offset arithmetic; chunked layout: the
chunk index) are prefetched in coalesced range requests, so h5py itself
decodes chunked, compressed or contiguous data while the network carries
little more than the requested images.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass

import h5py
import numpy as np

from clipforge.errors import ObjectChanged, StorageUnreachable, UserError
from clipforge.storage import uri as storage
from clipforge.storage.range_reader import FetchStats, RangeReader

# Range GETs in flight for one source, over all the shards being read at once: S3 serves one connection at
# ~100 MB/s, and more threads than this only contend for the GIL (bench/s3_rows.py).
RANGE_GETS = 16


@dataclass(frozen=True)
class ImageDataset:
    """What the plan needs to know about `file[dataset]`."""

    length: int
    image_shape: tuple[int, int, int]
    layout: str

    @property
    def image_bytes(self) -> int:
        return int(np.prod(self.image_shape))


def check_unchanged(source: str, found: os.stat_result, version: dict | None) -> None:
    """A local file as `version` (its `storage.fingerprint` when a run planned from it) says, or ObjectChanged:
    rows read from another version would be cached under the planned one's name."""
    if version and "mtime_ns" in version and (found.st_size, found.st_mtime_ns) != (version["size"],
                                                                                    version["mtime_ns"]):
        what = (f"size {found.st_size}, was {version['size']}" if found.st_size != version["size"] else
                f"modified {found.st_mtime_ns / 1e9:.3f}, was {version['mtime_ns'] / 1e9:.3f} (seconds since 1970)")
        raise ObjectChanged(f"{source} changed since this run planned it ({what})")


@contextlib.contextmanager
def open_hdf5(source: str, *, unsigned: bool = False, cache_dir: str | None = None, version: dict | None = None):
    """Yield (h5py.File, RangeReader | None); a missing or unreadable file is a UserError. `version`: the
    source's fingerprint to read (the planned one), else `ObjectChanged`."""
    reader = None
    if storage.is_s3(source):
        reader = RangeReader(source, unsigned=unsigned, cache_dir=cache_dir, etag=(version or {}).get("etag"))
        target = reader
    else:
        target = storage.local_path(source)
        if not target.is_file():
            raise UserError(f"source {source} not found")
        check_unchanged(source, target.stat(), version)
    try:
        handle = h5py.File(target, "r")
    except StorageUnreachable:  # h5py passes on what the reader raised: the file may be fine
        raise
    except OSError as exc:
        raise UserError(f"source {source} is not a readable HDF5 file: {exc}") from None
    try:
        yield handle, reader
    finally:
        handle.close()
        if reader is not None:
            reader.close()  # its GET threads


def image_dataset(handle: h5py.File, source: str, name: str) -> h5py.Dataset:
    found = handle.get(name)
    if isinstance(found, h5py.Dataset):
        return found
    if isinstance(found, h5py.Group):
        inside = datasets_in(found, prefix=found.name.lstrip("/") + "/")
        raise UserError(f"source {source}: {name!r} is a group, not a dataset; datasets in it: {inside} (give one "
                        "as --dataset)")
    raise UserError(f"source {source} has no dataset {name!r}; datasets found: {datasets_in(handle)}")


def datasets_in(group: h5py.Group, prefix: str = "", shown: int = 5) -> str:
    """The paths of the datasets under `group`, at any depth: the first `shown`, and how many there are."""
    names = []
    group.visititems(lambda path, item: names.append(prefix + path) if isinstance(item, h5py.Dataset) else None)
    return ", ".join(names[:shown]) + (f", … ({len(names)} in all)" if len(names) > shown else "") or "none"


def describe_dataset(dset: h5py.Dataset, source: str) -> ImageDataset:
    """Validate an (N, H, W, 3) uint8 image dataset."""
    if dset.ndim != 4 or dset.shape[-1] != 3 or dset.dtype != np.uint8:
        raise UserError(
            f"dataset {dset.name!r} in {source} has shape {dset.shape} and dtype {dset.dtype}; "
            "expected (N, H, W, 3) uint8 images"
        )
    layout = "chunked" if dset.chunks else "contiguous"
    return ImageDataset(length=int(dset.shape[0]), image_shape=tuple(int(s) for s in dset.shape[1:]), layout=layout)


def row_byte_ranges(dset: h5py.Dataset, rows: np.ndarray) -> list[tuple[int, int]]:
    """Half-open file byte ranges that hold these rows (empty when the layout does not tell)."""
    row_bytes = int(np.prod(dset.shape[1:])) * dset.dtype.itemsize
    if dset.chunks is None:
        offset = dset.id.get_offset()
        if offset is None:
            return []
        return [(offset + int(r) * row_bytes, offset + (int(r) + 1) * row_bytes) for r in rows]
    chunks = dset.chunks
    starts_per_dim = [range(0, size, step) for size, step in zip(dset.shape[1:], chunks[1:], strict=True)]
    ranges = set()
    for first in sorted({int(r) // chunks[0] * chunks[0] for r in rows}):
        for rest in itertools.product(*starts_per_dim):
            info = dset.id.get_chunk_info_by_coord((first, *rest))
            if info.byte_offset is not None and info.size:
                ranges.add((int(info.byte_offset), int(info.byte_offset) + int(info.size)))
    return sorted(ranges)


def read_rows(
    source: str,
    dataset: str,
    rows: np.ndarray,
    *,
    unsigned: bool = False,
    cache_dir: str | None = None,
    version: dict | None = None,
) -> tuple[np.ndarray, FetchStats]:
    """uint8 images (len(rows), H, W, 3) for sorted unique `rows`, and what fetching them cost."""
    reader = RowReader(source, dataset, unsigned=unsigned, cache_dir=cache_dir, version=version)
    try:
        images = np.empty((len(rows), *reader.image_shape), np.uint8)
        return images, reader.read_into(rows, images)
    finally:
        reader.close()


def _coalesced_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """(first position, count) of each run of consecutive row numbers in sorted `rows`."""
    if not len(rows):
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return [(int(a), int(b - a)) for a, b in zip(starts, ends, strict=True)]


def read_through_h5py(source: str, dataset: str, rows: np.ndarray, target: np.ndarray, *, unsigned: bool = False,
                      cache_dir: str | None = None, version: dict | None = None) -> FetchStats:
    """Fill `target` with sorted unique `rows` by h5py, for any layout (chunked, compressed): on S3 the rows'
    byte ranges (or chunks) are prefetched first, then h5py decodes them from memory."""
    with open_hdf5(source, unsigned=unsigned, cache_dir=cache_dir, version=version) as (handle, reader):
        dset = image_dataset(handle, source, dataset)
        if reader is not None:
            reader.prefetch(row_byte_ranges(dset, rows))
        dset.read_direct(target, np.s_[rows])
        if reader is None:  # on disk: written over meanwhile, as `RowReader`'s direct reads are checked
            check_unchanged(source, os.stat(storage.local_path(source)), version)
            return FetchStats(requests=0, bytes=int(target.nbytes))
        reader.release()
        return reader.stats


class RowReader:
    """Reads rows of one image dataset into caller-owned buffers (pinned host memory on a GPU machine).

    A file in HDF5's contiguous layout holds each image as raw bytes at
    offset + row * row_bytes, so its rows go straight into the buffer: with
    `os.preadv` from a local file, with parallel range GETs (`RangeReader.fill`)
    from S3. No h5py lock (threads read in parallel), and each byte is fetched
    once. Chunked or compressed data goes through h5py, after the S3 byte ranges
    have been prefetched. Safe to share between threads.
    """

    def __init__(self, source: str, dataset: str, *, unsigned: bool = False, cache_dir: str | None = None,
                 version: dict | None = None):
        """`version`: the source's fingerprint when the run planned (`storage.fingerprint`); another version
        found, now or while reading, is `ObjectChanged`."""
        self.source, self.dataset, self.unsigned, self.cache_dir = source, dataset, unsigned, cache_dir
        self.version = version
        with open_hdf5(source, unsigned=unsigned, cache_dir=cache_dir, version=version) as (handle, _):
            dset = image_dataset(handle, source, dataset)
            self.image_shape = tuple(int(s) for s in dset.shape[1:])
            self.length = int(dset.shape[0])
            offset = dset.id.get_offset() if dset.chunks is None and dset.dtype == np.uint8 else None
        self.row_bytes = int(np.prod(self.image_shape))
        self._offset = offset
        self._fd = self._remote = None
        if offset is not None and storage.is_s3(source):
            self._remote = RangeReader(source, unsigned=unsigned, cache_dir=cache_dir, threads=RANGE_GETS,
                                       etag=(version or {}).get("etag"))
        elif offset is not None:
            self._fd = os.open(storage.local_path(source), os.O_RDONLY)
            try:
                check_unchanged(source, os.fstat(self._fd), version)
            except ObjectChanged:
                os.close(self._fd)
                raise

    def read_into(self, rows: np.ndarray, out: np.ndarray) -> FetchStats:
        """Fill out[:len(rows)] with the images of sorted unique `rows`; returns what fetching cost."""
        rows = np.asarray(rows, dtype=np.int64)
        target = out[: len(rows)]
        if not len(rows):
            return FetchStats()
        if self._fd is not None or self._remote is not None:
            view = memoryview(target.reshape(-1))
            runs = [(self._offset + int(rows[first]) * self.row_bytes,
                     view[first * self.row_bytes : (first + count) * self.row_bytes])
                    for first, count in _coalesced_runs(rows)]
            if self._remote is not None:
                beyond = rows[self._offset + (rows + 1) * self.row_bytes > self._remote.size]
                if len(beyond):
                    raise self._cut_short(int(beyond[0]))
                return self._remote.fill(runs)
            for at, part in runs:
                self._read_fully(at, part)
            # Written over in place meanwhile (its mtime moves): rows of two versions under the planned one's name.
            check_unchanged(self.source, os.fstat(self._fd), self.version)
            return FetchStats(requests=0, bytes=int(target.nbytes))
        return read_through_h5py(self.source, self.dataset, rows, target, unsigned=self.unsigned,
                                 cache_dir=self.cache_dir, version=self.version)

    def _read_fully(self, at: int, part: memoryview) -> None:
        """Fill `part` from byte `at` of the file. One read returns at most ~2 GiB on Linux (a shard of 4,000 NSD
        images is more), so a short read is continued; only a read of nothing means the file ends early."""
        while len(part):
            got = os.preadv(self._fd, [part], at)
            if not got:
                raise self._cut_short((at - self._offset) // self.row_bytes)
            at, part = at + got, part[got:]

    def _cut_short(self, row: int) -> UserError:
        return UserError(f"source {self.source} ended early: rows from {row} are cut short (truncated file?)")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._remote is not None:
            self._remote.close()
            self._remote = None
