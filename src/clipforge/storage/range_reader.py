"""A seekable, read-only file over an S3 object, fetched by HTTP range requests.

`h5py.File(RangeReader(uri))` opens a remote HDF5 without downloading it.
Reads the caller announces with `prefetch(ranges)` (the byte ranges of the rows
a shard needs) are coalesced into one request per run of neighbouring ranges
and fetched in parallel; anything else (HDF5 metadata) is read in small
aligned blocks. Where the caller knows the file offsets itself (HDF5's
contiguous layout), `fill` writes ranges straight into its buffers: each byte
crosses the network once and is copied once. Every body is checked against the range asked for: transient
errors and short or truncated bodies are retried with backoff, never served.
With `cache_dir`, ranges persist on disk keyed by bucket, key, ETag and range,
each written atomically with its CRC-32 and verified on read, so a torn or damaged
file is refetched and a changed object (new ETag) never hits old bytes.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import logging
import os
import random
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions

from clipforge.errors import ObjectChanged, StorageUnreachable, UserError
from clipforge.storage import s3
from clipforge.storage.uri import file_mode

log = logging.getLogger(__name__)


@dataclass
class FetchStats:
    """What a reader cost: requests and bytes over the network, retries, disk cache hits."""

    requests: int = 0
    bytes: int = 0
    retries: int = 0
    cache_hits: int = 0

    def add(self, other: FetchStats) -> None:
        self.requests += other.requests
        self.bytes += other.bytes
        self.retries += other.retries
        self.cache_hits += other.cache_hits


REQUEST_BYTES = 16 << 20


def coalesce(ranges: list[tuple[int, int]], max_gap: int = 0, max_size: int = 256 << 20) -> list[tuple[int, int]]:
    """Merge sorted half-open ranges that touch or lie within `max_gap` bytes, up to `max_size` each."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start - merged[-1][1] <= max_gap and end - merged[-1][0] <= max_size:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


class RangeCache:
    """On-disk store of fetched ranges: one file per (object version, start, length), the range's bytes then
    their CRC-32 (`CHECK_BYTES`). A file that is short, long or whose bytes no longer match (a bad disk, a
    shared cache someone wrote into) is deleted and refetched, never served."""

    LAYOUT = "v2"  # files with their CRC-32: apart from the length-only files of before, which an older
    # clipforge sharing the cache (a rollout not yet done) would otherwise take for torn and delete, and back

    def __init__(self, root: str | Path, bucket: str, key: str, etag: str):
        digest = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()[:20]
        self.root = str(root)
        self.dir = Path(root) / self.LAYOUT / bucket / digest / etag.replace("/", "_")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.given_up = False  # a full disk or quota: the run reads on without keeping ranges

    def _path(self, start: int, length: int) -> Path:
        return self.dir / f"{start:015d}-{length}"

    def get(self, start: int, length: int) -> bytes | None:
        path = self._path(start, length)
        try:
            stored = path.read_bytes()
        except OSError:
            return None
        data, check = stored[:length], stored[length:]
        if len(data) != length or check != crc(data):
            log.warning("cached range %s does not verify (%s): fetching it again", path,
                        "torn" if len(stored) < length + CHECK_BYTES else "its bytes changed")
            path.unlink(missing_ok=True)
            return None
        return data

    def put(self, start: int, data: bytes) -> None:
        """Keep a range. The cache only saves refetching: one that cannot be written (a full disk, a quota, a
        folder where the range's file goes) is said once, and the run reads on without it."""
        if self.given_up:
            return
        path, tmp = self._path(start, len(data)), None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
            os.fchmod(fd, file_mode(path))  # a cache dir may be shared by several users
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.write(crc(data))
            os.replace(tmp, path)
        except OSError as exc:
            self.given_up = True
            say_unusable(self.root, exc)
        finally:
            if tmp is not None and os.path.exists(tmp):
                Path(tmp).unlink(missing_ok=True)


CHECK_BYTES = 4


def open_range_cache(cache_dir: str | Path | None, bucket: str, key: str, etag: str) -> RangeCache | None:
    """The range cache under `cache_dir`, or None: none asked for, or a folder that cannot be made (read-only,
    full), which is said, once per process, and read past: the cache only saves refetching."""
    if not cache_dir:
        return None
    try:
        return RangeCache(cache_dir, bucket, key, etag)
    except OSError as exc:
        say_unusable(str(cache_dir), exc)
        return None


_UNUSABLE_CACHE_DIRS: set[str] = set()


def say_unusable(cache_dir: str, exc: OSError) -> None:
    """Warn that `cache_dir` takes no ranges: once per process, since Ray opens a reader per shard."""
    if cache_dir not in _UNUSABLE_CACHE_DIRS:
        _UNUSABLE_CACHE_DIRS.add(cache_dir)
        where = f"{cache_dir} ({exc.filename})" if exc.filename else cache_dir
        log.warning("cannot keep fetched ranges in %s (%s): reading on without caching them", where,
                    exc.strerror or type(exc).__name__)


def crc(data: bytes | memoryview) -> bytes:
    return zlib.crc32(data).to_bytes(CHECK_BYTES, "big")


def _stream_into(body, view: memoryview) -> int:
    """Bytes of a streamed response body written into `view`, up to its length (no further)."""
    got = 0
    while got < len(view):
        n = body.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class RangeReader(io.RawIOBase):
    """File object over `s3://bucket/key`; see the module docstring for the contract."""

    def __init__(
        self,
        uri: str,
        *,
        unsigned: bool = False,
        cache_dir: str | Path | None = None,
        block_size: int = 64 << 10,
        max_attempts: int = 8,
        threads: int = 8,
        etag: str | None = None,
    ):
        """`etag`: the version to read (the one a run planned from); another there now is `ObjectChanged`."""
        super().__init__()
        self.uri = uri
        self.location = s3.parse_s3(uri)
        self.client = s3.client(unsigned)
        self.block_size = block_size
        self.max_attempts = max_attempts
        self.threads = threads
        self.stats = FetchStats()
        self._lock = threading.Lock()
        try:
            head = self.client.head_object(Bucket=self.location.bucket, Key=self.location.key)
        except botocore.exceptions.ClientError as exc:
            raise self._client_error(exc) from None
        self.size = int(head["ContentLength"])
        self.etag = head["ETag"].strip('"')
        if etag is not None and self.etag != etag:
            raise ObjectChanged(f"{uri} changed since this run planned it (ETag {self.etag}, was {etag})")
        self.cache = open_range_cache(cache_dir, self.location.bucket, self.location.key, self.etag)
        self._pos = 0
        self._span_starts: list[int] = []
        self._spans: list[memoryview] = []
        self._blocks: dict[int, bytes] = {}
        self._getters: ThreadPoolExecutor | None = None

    # -- io.RawIOBase -------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self._pos)
        if n <= 0:
            return 0
        view = memoryview(buffer).cast("B")
        view[:n] = self.pread(self._pos, n)
        self._pos += n
        return n

    # -- reading ----------------------------------------------------------------
    def pread(self, start: int, length: int) -> bytes | memoryview:
        """`length` bytes at `start`: from prefetched spans when they cover it, else from blocks."""
        data = self._from_spans(start, length)
        if data is not None:
            return data
        first, last = start // self.block_size, (start + length - 1) // self.block_size
        missing = [b for b in range(first, last + 1) if b not in self._blocks]
        if missing:
            wanted = [(b * self.block_size, min((b + 1) * self.block_size, self.size)) for b in missing]
            for (a, _), chunk in zip(wanted, self._fetch_many(wanted), strict=True):
                self._blocks[a // self.block_size] = chunk
        joined = b"".join(self._blocks[b] for b in range(first, last + 1))
        offset = start - first * self.block_size
        return joined[offset : offset + length]

    def prefetch(self, ranges: list[tuple[int, int]], max_gap: int = 0) -> None:
        """Hold these half-open byte ranges in memory (replacing earlier ones), in few requests.

        Touching ranges make one span, whatever its size: h5py reads a run of rows in one call, and a read
        that straddles two spans would miss both and be fetched again.
        """
        ranges = sorted({(max(0, a), min(b, self.size)) for a, b in ranges if b > a})
        pieces = dict(zip(ranges, self._fetch_many(ranges, max_gap=max_gap), strict=True))
        merged = coalesce(ranges, max_size=self.size)
        self._span_starts = [a for a, _ in merged]
        self._spans = []
        for a, b in merged:
            buf = bytearray(b - a)
            for (ra, rb), data in pieces.items():
                if a <= ra and rb <= b:
                    buf[ra - a : rb - a] = data
            self._spans.append(memoryview(buf))

    def fill(self, targets: list[tuple[int, memoryview]]) -> FetchStats:
        """Write the object's bytes from each `start` into its byte view, in parallel GETs of at most
        REQUEST_BYTES (the disk cache first, if any); returns what this call cost."""
        tally = FetchStats()
        parts = [(start + a, view[a : a + REQUEST_BYTES]) for start, view in targets
                 for a in range(0, len(view), REQUEST_BYTES)]
        for start, view in parts:
            if start < 0 or start + len(view) > self.size:
                raise UserError(f"{self.uri}: bytes {start}-{start + len(view) - 1} lie beyond its "
                                f"{self.size} bytes (truncated file?)")

        def fetch(part: tuple[int, memoryview]) -> None:
            start, view = part
            data = self.cache.get(start, len(view)) if self.cache else None
            if data is not None:
                view[:] = data
                with self._lock:
                    tally.cache_hits += 1
                return
            self._get(start, start + len(view), tally, into=view)
            if self.cache:
                self.cache.put(start, bytes(view))

        list(self._pool().map(fetch, parts))
        with self._lock:
            self.stats.add(tally)
        return tally

    def _pool(self) -> ThreadPoolExecutor:
        """The reader's GET threads, one pool for every call: `threads` GETs at most, however many threads read."""
        with self._lock:
            if self._getters is None:
                self._getters = ThreadPoolExecutor(self.threads, thread_name_prefix="range-get")
            return self._getters

    def close(self) -> None:
        getters = getattr(self, "_getters", None)  # absent when __init__ failed (IOBase's __del__ still closes)
        if getters is not None:
            getters.shutdown(wait=True, cancel_futures=True)
            self._getters = None
        super().close()

    def release(self) -> None:
        self._span_starts, self._spans = [], []

    def _from_spans(self, start: int, length: int) -> memoryview | None:
        i = bisect.bisect_right(self._span_starts, start) - 1
        if i < 0:
            return None
        span_start, span = self._span_starts[i], self._spans[i]
        if start + length <= span_start + len(span):
            return span[start - span_start : start - span_start + length]
        return None

    def _fetch_many(self, ranges: list[tuple[int, int]], max_gap: int = 0) -> list[bytes]:
        """Bytes of each range: disk cache first, the rest coalesced into parallel requests."""
        results: dict[tuple[int, int], bytes] = {}
        if self.cache:
            for a, b in ranges:
                hit = self.cache.get(a, b - a)
                if hit is not None:
                    results[(a, b)] = hit
                    with self._lock:
                        self.stats.cache_hits += 1
        todo = [r for r in ranges if r not in results]
        # Parts of at most REQUEST_BYTES: a shard of neighbouring rows becomes several parallel GETs (S3
        # serves one connection at ~100 MB/s; AWS suggests 8-16 MB byte-range parts), not one long one.
        groups = coalesce(todo, max_gap=max_gap, max_size=REQUEST_BYTES)
        if len(groups) == 1:
            bodies = [self._get(*groups[0])]
        else:
            bodies = list(self._pool().map(lambda g: self._get(*g), groups))
        for (ga, gb), body in zip(groups, bodies, strict=True):
            for a, b in todo:
                if ga <= a and b <= gb:
                    piece = body[a - ga : b - ga]
                    results[(a, b)] = piece
                    if self.cache:
                        self.cache.put(a, piece)
        return [results[r] for r in ranges]

    def _get(self, start: int, end: int, tally: FetchStats | None = None, into: memoryview | None = None) -> bytes:
        """One range GET, verified and retried; end is exclusive. The body is returned, or streamed into `into`
        (a view of end - start bytes; nothing is returned) with no copy on the way. Its cost goes to `tally`
        (default: the reader's own running total)."""
        tally = self.stats if tally is None else tally
        expected = end - start
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = self.client.get_object(
                    Bucket=self.location.bucket,
                    Key=self.location.key,
                    Range=f"bytes={start}-{end - 1}",
                    IfMatch=self.etag,
                )
                if into is None:
                    body = response["Body"].read()
                    got = len(body)
                else:
                    body, got = b"", _stream_into(response["Body"], into)
                content_range = response.get("ContentRange", "")
                if got == expected and content_range.startswith(f"bytes {start}-{end - 1}/"):
                    with self._lock:
                        tally.requests += 1
                        tally.bytes += got
                    return body
                problem = f"short or mismatched body: {got} of {expected} bytes, Content-Range {content_range!r}"
            except botocore.exceptions.ClientError as exc:
                if s3.status_of(exc) and not s3.is_overloaded(exc):
                    raise self._client_error(exc) from None
                problem = str(exc)
            except (botocore.exceptions.BotoCoreError, OSError, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            with self._lock:
                tally.retries += 1
                tally.requests += 1
            if attempt == self.max_attempts:
                last = problem.strip().splitlines()[0] if problem.strip() else "no answer"
                raise StorageUnreachable(f"{self.uri}: bytes {start}-{end - 1} failed {attempt} times; last: {last}")
            delay = min(5.0, 0.05 * 2**attempt) * (0.5 + random.random())
            log.debug("retrying %s bytes %d-%d after %s (%.2fs)", self.uri, start, end - 1, problem, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _client_error(self, exc: botocore.exceptions.ClientError) -> UserError:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if s3.is_not_found(exc) or status == 404:
            return UserError(f"{self.uri} not found")
        if status == 412 or code == "PreconditionFailed":
            return ObjectChanged(f"{self.uri} changed while it was being read (ETag no longer {self.etag})")
        if status == 403:
            return UserError(f"access denied to {self.uri} (for a public bucket pass --no-sign-request)")
        return UserError(f"{self.uri}: {code or status}: {exc}")
