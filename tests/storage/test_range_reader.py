"""The S3 range reader against a real S3 HTTP server on loopback, with and without injected faults."""

import os

import boto3
import numpy as np
import pytest

from clipforge.errors import UserError
from clipforge.storage.range_reader import RangeReader, coalesce


@pytest.fixture
def blob(s3_bucket):
    data = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="blob.bin", Body=data)
    return f"s3://{s3_bucket}/blob.bin", data


def test_random_reads_equal_the_bytes(blob):
    uri, data = blob
    reader = RangeReader(uri, block_size=64 << 10)
    rng = np.random.default_rng(1)
    for _ in range(200):
        start = int(rng.integers(0, len(data)))
        length = int(rng.integers(0, 300_000))
        reader.seek(start)
        assert reader.read(length) == data[start : start + length]
    reader.seek(-10, os.SEEK_END)
    assert reader.read() == data[-10:]
    assert reader.read(5) == b""


def test_prefetch_coalesces_neighbours_into_one_request(blob):
    uri, data = blob
    reader = RangeReader(uri)
    ranges = [(0, 1000), (1000, 2000), (2000, 3000), (100_000, 101_000), (2_000_000, 2_500_000)]
    reader.prefetch(ranges)
    assert reader.stats.requests == 3
    assert reader.stats.bytes == sum(b - a for a, b in ranges)
    for a, b in ranges:
        assert reader.pread(a, b - a) == data[a:b]
    assert reader.pread(500, 2000) == data[500:2500]  # across merged neighbours
    assert reader.stats.requests == 3  # all served from memory


def test_coalesce_respects_gaps_and_size():
    assert coalesce([(10, 20), (0, 10), (25, 30)]) == [(0, 20), (25, 30)]
    assert coalesce([(0, 10), (15, 20)], max_gap=5) == [(0, 20)]
    assert coalesce([(0, 10), (10, 20)], max_size=15) == [(0, 10), (10, 20)]


def test_faults_are_retried_and_never_served(blob, faulty_proxy, monkeypatch):
    uri, data = blob
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_proxy.url)
    reader = RangeReader(uri, block_size=32 << 10)
    rng = np.random.default_rng(2)
    ranges = sorted({(int(a), int(a) + 20_000) for a in rng.integers(0, len(data) - 20_000, 60)})
    reader.prefetch(ranges)
    for a, b in ranges:
        assert reader.pread(a, b - a) == data[a:b]
    for _ in range(40):
        start = int(rng.integers(0, len(data) - 50_000))
        reader.seek(start)
        assert reader.read(50_000) == data[start : start + 50_000]
    assert faulty_proxy.broken > 0
    assert reader.stats.retries > 0


def test_disk_cache_serves_verified_ranges_and_refetches_torn_ones(blob, tmp_path):
    uri, data = blob
    first = RangeReader(uri, cache_dir=tmp_path)
    first.prefetch([(0, 5000), (10_000, 20_000)])
    assert first.stats.requests == 2
    second = RangeReader(uri, cache_dir=tmp_path)
    second.prefetch([(0, 5000), (10_000, 20_000)])
    assert second.stats.requests == 0 and second.stats.cache_hits == 2
    assert second.pread(10_000, 10_000) == data[10_000:20_000]
    # Tear one cached range: it must be refetched, never served short.
    torn = next(p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith("000000000010000"))
    torn.write_bytes(torn.read_bytes()[:100])
    third = RangeReader(uri, cache_dir=tmp_path)
    third.prefetch([(0, 5000), (10_000, 20_000)])
    assert third.stats.requests == 1 and third.stats.cache_hits == 1
    assert third.pread(10_000, 10_000) == data[10_000:20_000]
    # Damage bytes in place, the length unchanged (a bad disk, a shared cache written into): refetched too.
    damaged = next(p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith("000000000000000"))
    stored = bytearray(damaged.read_bytes())
    stored[100:104] = b"XXXX"
    damaged.write_bytes(bytes(stored))
    fourth = RangeReader(uri, cache_dir=tmp_path)
    fourth.prefetch([(0, 5000), (10_000, 20_000)])
    assert fourth.stats.requests == 1 and fourth.stats.cache_hits == 1
    assert fourth.pread(0, 5000) == data[:5000]


def test_a_cache_dir_that_fills_is_said_once_and_the_reads_go_on_uncached(blob, tmp_path, monkeypatch, caplog):
    """The range cache only saves refetching: a full --cache-dir stopped the whole cache run with a traceback."""
    import errno
    import logging

    uri, data = blob
    writes = []

    def disk_full(source, target):  # as the last write's flush or the rename meets a full disk
        writes.append(target)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    monkeypatch.setattr("clipforge.storage.range_reader._UNUSABLE_CACHE_DIRS", set())
    reader = RangeReader(uri, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        reader.prefetch([(0, 5000), (10_000, 20_000), (30_000, 40_000)])
        assert reader.pread(10_000, 10_000) == data[10_000:20_000]
    monkeypatch.undo()
    assert len(writes) == 1 and caplog.text.count("reading on without caching them") == 1
    assert "No space left on device" in caplog.text
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no temporary file left behind


def test_a_cache_dir_that_cannot_be_made_is_said_once_and_read_past(blob, tmp_path, monkeypatch, caplog):
    """A read-only or full --cache-dir failed at its first mkdir with a traceback; Ray opens a reader per shard."""
    import logging

    uri, data = blob
    monkeypatch.setattr("clipforge.storage.range_reader._UNUSABLE_CACHE_DIRS", set())
    (tmp_path / "cache").write_text("a file where the folder goes")
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        for _ in range(3):
            reader = RangeReader(uri, cache_dir=tmp_path / "cache")
            assert reader.cache is None and reader.pread(10_000, 100) == data[10_000:10_100]
    assert caplog.text.count("reading on without caching them") == 1


def test_new_etag_invalidates_the_cache(blob, tmp_path):
    uri, data = blob
    RangeReader(uri, cache_dir=tmp_path).prefetch([(0, 1000)])
    bucket, key = uri[5:].split("/", 1)
    changed = bytes(255 - b for b in data[:1000]) + data[1000:]
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=changed)
    reader = RangeReader(uri, cache_dir=tmp_path)
    reader.prefetch([(0, 1000)])
    assert reader.stats.requests == 1
    assert reader.pread(0, 1000) == changed[:1000]


def test_object_changed_mid_read_is_reported(blob):
    uri, data = blob
    reader = RangeReader(uri)
    bucket, key = uri[5:].split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b"x" * len(data))
    with pytest.raises(UserError, match="changed while it was being read"):
        reader.pread(0, 100)


def test_missing_object_is_named(s3_bucket):
    with pytest.raises(UserError, match=f"s3://{s3_bucket}/nope.hdf5 not found"):
        RangeReader(f"s3://{s3_bucket}/nope.hdf5")


def test_storage_that_stops_answering_is_one_line_naming_the_object(blob, faulty_proxy, monkeypatch):
    """Every range GET failing (the S3 server went away mid-run): StorageUnreachable after the retries."""
    from clipforge.errors import StorageUnreachable

    uri, _ = blob
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_proxy.url)
    reader = RangeReader(uri, max_attempts=2)
    faulty_proxy.fail_share = 1.0
    with pytest.raises(StorageUnreachable, match=rf"^{uri}: bytes 0-\d+ failed 2 times; last: .*ServiceUnavailable"):
        reader.pread(0, 100)


def test_an_hdf5_source_whose_storage_stops_answering_is_not_called_unreadable(s3_bucket, faulty_proxy, tmp_path,
                                                                                monkeypatch):
    """h5py passes on what the reader raised: StorageUnreachable, not "not a readable HDF5 file" (exit 2)."""
    import functools

    from clipforge.data import hdf5_source
    from clipforge.data.synthetic import write_nsd_hdf5
    from clipforge.errors import StorageUnreachable

    write_nsd_hdf5(tmp_path / "s.hdf5", 4, seed=0, size=16)
    boto3.client("s3").upload_file(str(tmp_path / "s.hdf5"), s3_bucket, "s.hdf5")
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_proxy.url)
    monkeypatch.setattr(hdf5_source, "RangeReader", functools.partial(RangeReader, max_attempts=1))
    faulty_proxy.fail_share = 1.0
    with pytest.raises(StorageUnreachable, match=f"^s3://{s3_bucket}/s.hdf5: bytes "):
        hdf5_source.read_rows(f"s3://{s3_bucket}/s.hdf5", "imgBrick", np.array([0, 1]))


def test_the_cli_says_storage_unreachable_in_one_line_and_exit_1(monkeypatch, capsys):
    from clipforge import cli
    from clipforge.errors import StorageUnreachable

    def unreachable(args):
        raise StorageUnreachable("s3://bkt/s.hdf5: bytes 0-99 failed 8 times; last: Could not connect")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.commands["runs"].set_defaults(func=unreachable)
    assert cli.main(["runs", "s3://bkt/artifacts"]) == 1
    assert capsys.readouterr().err == "clipforge runs: error: s3://bkt/s.hdf5: bytes 0-99 failed 8 times; last: " \
                                      "Could not connect; what it committed is kept: run the same command again " \
                                      "to go on from there\n"


def test_a_whole_object_read_over_a_flaky_network_comes_whole(blob, faulty_proxy, monkeypatch):
    """botocore retries a request whose reply never came, not a body cut short: a manifest or a folder's photo
    read through a reset connection was a traceback (ResponseStreamingError), and a cut body was never checked."""
    from clipforge.storage import conditional, s3
    from clipforge.storage import uri as storage

    uri, data = blob
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_proxy.url)
    monkeypatch.setattr(s3.time, "sleep", lambda seconds: None)
    faulty_proxy.whole_gets = True
    for _ in range(8):
        assert storage.read_bytes(uri) == data
    assert conditional.read_versioned(uri)[0] == data
    assert faulty_proxy.broken > 0


def test_a_whole_object_that_never_comes_whole_is_one_line_naming_it(blob, faulty_proxy, monkeypatch):
    from clipforge.errors import StorageUnreachable
    from clipforge.storage import s3
    from clipforge.storage import uri as storage

    uri, _ = blob
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_proxy.url)
    monkeypatch.setattr(s3.time, "sleep", lambda seconds: None)
    faulty_proxy.whole_gets, faulty_proxy.fail_share, faulty_proxy.truncate_share = True, 0.0, 1.0
    with pytest.raises(StorageUnreachable, match=rf"^{uri}: \w+, 5 times; the store or the network is failing"):
        storage.read_bytes(uri)


def test_a_store_that_keeps_refusing_a_write_is_one_line_naming_the_object(s3_bucket, faulty_proxy, monkeypatch):
    """503 SlowDown on every PUT of a shard: after botocore's five tries, a ClientError traceback (exit 1)."""
    import time

    from clipforge.errors import StorageUnreachable
    from clipforge.storage import conditional
    from clipforge.storage import uri as storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_proxy.url)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # botocore's backoff between its tries
    faulty_proxy.fail_puts = True
    uri = f"s3://{s3_bucket}/cache/shard-00000.parquet"
    with pytest.raises(StorageUnreachable, match=rf"^{uri}: writing it failed \(ServiceUnavailable\) after retries"):
        storage.write_bytes(uri, b"rows")
    with pytest.raises(StorageUnreachable, match="writing it failed"):
        conditional.write_if(uri + ".lease", b"held", None)


def test_an_s3_mistake_the_user_can_fix_is_not_retried_as_a_failing_store(s3_bucket, monkeypatch):
    """Only a body cut short or a dropped connection is tried again: a bad bucket name (or no credentials, or
    an endpoint nobody answers at) goes up as it is, for the CLI's one line and exit 2, not "the store is
    failing" (exit 1, which a driver retries) after five tries."""
    import botocore.exceptions

    from clipforge.errors import StorageUnreachable
    from clipforge.storage import s3
    from clipforge.storage import uri as storage

    tries = []
    monkeypatch.setattr(s3.time, "sleep", tries.append)
    with pytest.raises(botocore.exceptions.BotoCoreError) as refused:
        storage.read_bytes("s3://not_a valid bucket/x.json")
    assert not isinstance(refused.value, StorageUnreachable) and tries == []


def test_an_upload_the_store_keeps_refusing_is_one_line_naming_it(s3_bucket, faulty_proxy, monkeypatch, tmp_path):
    """Checkpoints on S3 go up with `upload_file` (in parts when large): a 503 past botocore's retries was an
    S3UploadFailedError traceback, where a shard's PUT was one line."""
    import time

    from clipforge.errors import StorageUnreachable
    from clipforge.storage import uri as storage

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_proxy.url)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    faulty_proxy.fail_puts = True
    uri = f"s3://{s3_bucket}/out/checkpoints/step-000001/model.safetensors"
    with pytest.raises(StorageUnreachable, match=rf"^{uri}: uploading .*model.safetensors failed \(.*Unavailable"):
        storage.upload_file(tmp_path / "model.safetensors", uri)
