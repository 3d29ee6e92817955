"""The cache stage's in-process engine: one process, one device, reads overlapping encoding.

A single-GPU job is short (on an H100 the encoder needs ~10 s for NSD's 9,000
images), so start-up and idle time decide its wall time. Ray takes seconds to
start, and its actor builds the model only once the reads have begun. Here:

- the model loads in a thread while reader threads fill the first shards;
- readers write rows straight into reusable host buffers (pinned on a GPU);
- the main thread copies each shard to the device and preprocesses it there on
  a side stream, so the next shard's copy and preprocessing overlap this one's
  encoding, then encodes it and starts copying the embeddings back without
  waiting;
- writer threads commit each shard's parquet file once its copy has landed
  (several at once: each waits for an fsync).

Every stage is bounded (`read_workers` + 1 host buffers, a few shards of
embeddings in flight), so memory stays at a few shards whatever the job's
size. Images from a folder are resized to the model's input as soon as each
is decoded (which waits for the model, whose preprocessing says how), so a
shard of photos holds 150 KB per image, not the 36 MB of a 12 MP photo.
Shards, names and the commit rule are the Ray engine's: resume and rerun
behave the same with either.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from clipforge.config.cache import CacheConfig
from clipforge.cpus import usable_cpus
from clipforge.data.hdf5_source import RowReader
from clipforge.data.image_folder import collection_root, is_image_collection, read_images
from clipforge.models.encode import ImageEncoder, resolve_device
from clipforge.models.encoders import EncoderSpec
from clipforge.progress import Progress, process_age
from clipforge.stages.cache_shards import commit_shard, steady_rate
from clipforge.storage.range_reader import FetchStats

log = logging.getLogger("clipforge.cache")

COMMITS_IN_FLIGHT = 4  # shards of embeddings waiting for the writers before the encoder waits
# Shards committed at once. Each commit is a parquet file written and fsynced: one thread commits 53-58
# shards/s on the CPU machine (~28,000 img/s of 500-row shards), near ViT-B-32's rate on an H200; four
# commit 92-99 (bench/cache_commit.py). Each shard is a file of its own, so their order does not matter.
COMMIT_WORKERS = 4
DECODERS = min(16, usable_cpus())  # image files decoded at once, over all shards being read


class BufferPool:
    """Reusable host buffers, one shard of fixed-size images each; pinned when the encoder is on a GPU.

    A slot comes back with the CUDA event that marks the end of its copy to the
    device; whoever takes it next waits for that event before writing into it.
    Buffers are allocated on first use, by the reader that needs one.
    """

    def __init__(self, count: int, shape: tuple[int, ...], pinned: bool):
        self.shape, self.pinned = shape, pinned
        self.buffers: list[torch.Tensor | None] = [None] * count
        self.free: queue.Queue = queue.Queue()
        for slot in range(count):
            self.free.put((slot, None))

    def acquire(self) -> tuple[int, torch.Tensor]:
        slot, copied = self.free.get()
        if copied is not None:
            copied.synchronize()
        if self.buffers[slot] is None:
            self.buffers[slot] = torch.empty(self.shape, dtype=torch.uint8, device="cpu", pin_memory=self.pinned)
        return slot, self.buffers[slot]

    def release(self, slot: int, copied: torch.cuda.Event | None = None) -> None:
        self.free.put((slot, copied))


@dataclass
class ReadShard:
    """A shard's images on their way to the encoder: in a pool slot (HDF5), or an array of image files shrunk
    to the model's input."""

    shard: object
    images: torch.Tensor | np.ndarray
    stats: FetchStats
    slot: int | None = None
    copied: torch.cuda.Event | None = field(default=None, repr=False)  # the copy to the device has landed
    ready: torch.cuda.Event | None = field(default=None, repr=False)  # ... and been preprocessed there
    released: bool = False  # the host side is done with: its slot is free and the next read is queued


class ShardReader:
    """Reads one shard's images, for any source the cache stage takes; safe to call from many threads."""

    def __init__(self, cfg: CacheConfig, pinned: bool, slots: int, encoder: Future, rows: int,
                 version: dict | None = None):
        """`rows`: the most images of any shard to read (`batch_size`, or fewer for a job smaller than one);
        `version`: the HDF5 source's, as planned."""
        self.cfg = cfg
        self.encoder = encoder  # an ImageEncoder to come: its preprocessing shrinks folder images
        self.rows = self.pool = self.decoding = None
        if not is_image_collection(cfg.source):
            self.rows = RowReader(cfg.source, cfg.dataset, unsigned=cfg.no_sign_request, cache_dir=cfg.cache_dir,
                                  version=version)
            self.pool = BufferPool(slots, (rows, *self.rows.image_shape), pinned)
        else:  # one pool of decoders for every shard being read: a bound on full-size photos in memory
            self.decoding = ThreadPoolExecutor(DECODERS, thread_name_prefix="cache-decode")

    def __call__(self, shard) -> ReadShard:
        if self.rows is None:
            images, size = read_images(collection_root(self.cfg.source), [str(i) for i in shard.ids],
                                       shrink=self.encoder.result().preprocess.shrink, pool=self.decoding,
                                       unsigned=self.cfg.no_sign_request)
            return ReadShard(shard, np.stack(images), FetchStats(requests=len(images), bytes=size))
        slot, buffer = self.pool.acquire()
        try:
            stats = self.rows.read_into(shard.ids, buffer.numpy())
        except BaseException:
            self.pool.release(slot)
            raise
        return ReadShard(shard, buffer[: len(shard.ids)], stats, slot)

    def close(self) -> None:
        if self.rows is not None:
            self.rows.close()
        if self.decoding is not None:
            self.decoding.shutdown(wait=True, cancel_futures=True)


def encode_shards_locally(cfg: CacheConfig, spec: EncoderSpec, todo: list,
                          version: dict | None = None) -> tuple[FetchStats, dict, float | None]:
    """Encode and commit the pending shards in this process; same results as `cache_ray`'s engine."""
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    depth = min(len(todo), cfg.read_workers + 1)
    loading = ThreadPoolExecutor(1, thread_name_prefix="cache-model")
    reading = ThreadPoolExecutor(cfg.read_workers, thread_name_prefix="cache-read")
    writing = ThreadPoolExecutor(COMMIT_WORKERS, thread_name_prefix="cache-commit")
    reader = None
    try:
        # The model loads while the first shards are read: neither waits for the other to start.
        model = loading.submit(ImageEncoder, spec, str(device), cfg.precision, cfg.inference_batch_size,
                               cfg.cache_dir)
        reader = ShardReader(cfg, pinned=cuda, slots=depth, encoder=model, rows=max(len(s.ids) for s in todo),
                             version=version)
        shards = iter(todo)
        reads: deque[Future] = deque()

        def read_next() -> None:
            shard = next(shards, None)
            if shard is not None:
                reads.append(reading.submit(reader, shard))

        for _ in range(depth):
            read_next()
        encoder = model.result()
        log.info("encoder %s ready on %s in %s, %.1f s after the process started", spec.model, device,
                 encoder.precision, process_age())
        copies = torch.cuda.Stream(device) if cuda else None
        if copies is not None:  # the preprocessing's constants were put on the device by the loading thread
            copies.wait_stream(torch.cuda.current_stream(device))

        def release(item: ReadShard) -> None:
            """The host side of a shard is done with: its slot goes back, and the next shard's read starts."""
            if not item.released:
                if item.slot is not None:
                    reader.pool.release(item.slot, item.copied)
                item.released = True
                read_next()

        def stage(item: ReadShard) -> ReadShard:
            """Queue a shard's copy to the device and its preprocessing there on the side stream, where both
            overlap the previous shard's encoding; its host slot is free once the copy lands."""
            if copies is not None and item.slot is not None:
                # no_grad, not inference_mode: the main stream's record_stream must be allowed on the result.
                with torch.cuda.stream(copies), torch.no_grad():
                    pixels = item.images.to(device, non_blocking=True)
                    item.copied = torch.cuda.Event()
                    item.copied.record(copies)
                    # Float pixels, which `encode` takes as they are; in inference batches, so that the
                    # full-size float copies resizing makes stay one batch's worth (0.5 GB at NSD's 425 px).
                    step = encoder.batch_size
                    item.images = torch.cat([encoder.preprocess(pixels[i : i + step])
                                             for i in range(0, len(pixels), step)])
                    item.ready = torch.cuda.Event()
                    item.ready.record(copies)
                release(item)
            return item

        def commit(shard, host: torch.Tensor, landed: torch.cuda.Event | None) -> tuple[float, int]:
            if landed is not None:
                landed.synchronize()
            commit_shard(cfg.output, shard.name, shard.ids, shard.splits, host.numpy(), encoder.description)
            return time.time(), len(shard.ids)

        progress = Progress(log, sum(len(s.ids) for s in todo))
        stats, commits, writes = FetchStats(), [], deque()

        def collect(block: bool) -> None:
            while writes and (block or writes[0].done()):
                finished, rows = writes.popleft().result()
                commits.append((finished, rows))
                progress.update(rows, f"shard {len(commits)}/{len(todo)}, {stats.bytes / 1e6:.1f} MB read")

        staged = None
        while staged is not None or reads:
            current = staged if staged is not None else stage(reads.popleft().result())
            staged = stage(reads.popleft().result()) if reads and reads[0].done() else None
            stats.add(current.stats)
            if current.ready is not None:
                current.images.record_stream(torch.cuda.current_stream(device))
                torch.cuda.current_stream(device).wait_event(current.ready)
            embeddings = encoder.encode(current.images)
            release(current)  # on the CPU (or for image files) the encoder read the host memory itself
            host, landed = embeddings, None
            if cuda:
                host = torch.empty(embeddings.shape, dtype=embeddings.dtype, device="cpu", pin_memory=True)
                host.copy_(embeddings, non_blocking=True)
                landed = torch.cuda.Event()
                landed.record()
            # The shard alone: its preprocessed images (301 MB of a 500-image shard on the device) go now.
            writes.append(writing.submit(commit, current.shard, host, landed))
            collect(block=len(writes) > COMMITS_IN_FLIGHT)
        collect(block=True)
        return stats, encoder.description, steady_rate(commits)
    finally:
        reading.shutdown(wait=True, cancel_futures=True)
        writing.shutdown(wait=True)
        loading.shutdown(wait=True, cancel_futures=True)
        if reader is not None:
            reader.close()
