"""Reading rows of an HDF5 image dataset from S3 costs little more than the rows' bytes."""

import boto3
import numpy as np
import pytest

from clipforge.data.hdf5_source import read_rows
from clipforge.data.synthetic import write_nsd_hdf5
from clipforge.errors import UserError


@pytest.fixture(scope="module")
def stimuli(tmp_path_factory):
    root = tmp_path_factory.mktemp("h5")
    files = {}
    for layout in ("contiguous", "chunked"):
        path = root / f"{layout}.hdf5"
        images = write_nsd_hdf5(path, 40, layout=layout, seed=3)
        files[layout] = path
    return files, images


@pytest.fixture(params=["contiguous", "chunked"])
def on_s3(request, stimuli, s3_bucket):
    files, images = stimuli
    key = f"{request.param}.hdf5"
    boto3.client("s3").upload_file(str(files[request.param]), s3_bucket, key)
    return request.param, f"s3://{s3_bucket}/{key}", images


def test_rows_equal_the_local_file(on_s3):
    layout, uri, images = on_s3
    rows = np.array([0, 1, 2, 7, 19, 20, 39])
    got, stats = read_rows(uri, "imgBrick", rows)
    assert np.array_equal(got, images[rows])
    if layout == "contiguous":  # straight into the buffer: each row's bytes once, one GET per run of neighbours
        assert stats.bytes == len(rows) * images[0].nbytes
        assert stats.requests == 4


def test_contiguous_rows_come_from_the_disk_cache_the_second_time(on_s3, tmp_path):
    layout, uri, images = on_s3
    rows = np.array([5, 6, 30])
    first, fetched = read_rows(uri, "imgBrick", rows, cache_dir=str(tmp_path))
    second, cached = read_rows(uri, "imgBrick", rows, cache_dir=str(tmp_path))
    assert np.array_equal(first, images[rows]) and np.array_equal(second, images[rows])
    if layout == "contiguous":
        assert (fetched.requests, fetched.cache_hits) == (2, 0)
        assert (cached.requests, cached.cache_hits) == (0, 2)


def test_local_source_reads_directly(stimuli):
    files, images = stimuli
    got, stats = read_rows(str(files["chunked"]), "imgBrick", np.array([3, 4]))
    assert np.array_equal(got, images[[3, 4]]) and stats.requests == 0


def test_faulty_network_gives_identical_rows(on_s3, faulty_proxy, monkeypatch):
    _, uri, images = on_s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_proxy.url)
    rows = np.arange(0, 40, 3)
    got, stats = read_rows(uri, "imgBrick", rows)
    assert np.array_equal(got, images[rows])
    assert faulty_proxy.broken > 0


def test_wrong_dataset_name_lists_what_is_there(stimuli):
    files, _ = stimuli
    with pytest.raises(UserError, match="no dataset 'images'; datasets found: imgBrick"):
        read_rows(str(files["contiguous"]), "images", np.array([0]))


def test_missing_source_is_named(tmp_path, s3_bucket):
    with pytest.raises(UserError, match="not found"):
        read_rows(str(tmp_path / "none.hdf5"), "imgBrick", np.array([0]))
    with pytest.raises(UserError, match=f"s3://{s3_bucket}/none.hdf5 not found"):
        read_rows(f"s3://{s3_bucket}/none.hdf5", "imgBrick", np.array([0]))


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / "x.hdf5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        read_rows(str(path), "imgBrick", np.array([0]))


def test_a_group_named_as_the_dataset_lists_the_datasets_inside(tmp_path):
    """`imgBrick` a group holding `imgBrick/x`: said as such (it was "no dataset 'imgBrick'; datasets found: none")."""
    import h5py

    path = tmp_path / "group.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick/x", data=np.zeros((2, 4, 4, 3), np.uint8))
        for n in range(6):
            f.create_dataset(f"imgBrick/more/y{n}", data=np.zeros(1))
    with pytest.raises(UserError, match=r"^source \S+: 'imgBrick' is a group, not a dataset; datasets in it: "
                                        r"imgBrick/more/y0, imgBrick/more/y1, .*, … \(7 in all\) \(give one as "
                                        r"--dataset\)$"):
        read_rows(str(path), "imgBrick", np.array([0]))
    with pytest.raises(UserError, match=r"no dataset 'images'; datasets found: imgBrick/more/y0, "):
        read_rows(str(path), "images", np.array([0]))
    assert read_rows(str(path), "imgBrick/x", np.array([1]))[0].shape == (1, 4, 4, 3)


def test_a_read_the_kernel_returns_short_is_continued(stimuli, monkeypatch):
    """Linux returns at most ~2 GiB from one read, less than a shard of 4,000 NSD images: the rest is read on,
    not taken for a truncated file. Here every read returns at most a third of an image."""
    import os

    from clipforge.data import hdf5_source

    files, images = stimuli
    real = os.preadv
    cap = images[0].nbytes // 3

    def short_preadv(fd, buffers, offset):
        return real(fd, [memoryview(buffers[0])[:cap]], offset)

    monkeypatch.setattr(hdf5_source.os, "preadv", short_preadv)
    rows = np.array([2, 3, 4, 30])
    got, _ = read_rows(str(files["contiguous"]), "imgBrick", rows)
    assert np.array_equal(got, images[rows])



def test_a_local_source_written_over_in_place_while_rows_are_read_is_refused(tmp_path):
    """The local engine opens the file once: a copy written over it in place (`dd conv=notrunc`) mid-run made a
    cache half of one version and half of the other, recorded as the first."""
    import os

    from clipforge.data.hdf5_source import RowReader
    from clipforge.errors import ObjectChanged
    from clipforge.storage import uri as storage

    path = tmp_path / "stimuli.hdf5"
    write_nsd_hdf5(path, 8, seed=3, size=32)
    planned = storage.fingerprint(str(path))
    reader = RowReader(str(path), "imgBrick", version=planned)
    out = np.empty((8, 32, 32, 3), np.uint8)
    reader.read_into(np.arange(4), out)  # the planned version: read
    with open(path, "r+b") as f:  # written over in place: same size, a new mtime
        f.seek(-16, os.SEEK_END)
        f.write(b"\xff" * 16)
    os.utime(path, ns=(planned["mtime_ns"] + 10**9, planned["mtime_ns"] + 10**9))
    with pytest.raises(ObjectChanged, match=f"{path} changed since this run planned it"):
        reader.read_into(np.arange(4, 8), out)
    reader.close()


def test_a_chunked_local_source_written_over_during_a_read_is_refused(tmp_path, monkeypatch):
    """Chunked data goes through h5py, which opens the file for each shard: a write landing during the read
    itself (its mtime moves) was missed."""
    import os

    import h5py

    from clipforge.data.hdf5_source import RowReader
    from clipforge.errors import ObjectChanged
    from clipforge.storage import uri as storage

    path = tmp_path / "stimuli.hdf5"
    write_nsd_hdf5(path, 8, layout="chunked", seed=3, size=32)
    reader = RowReader(str(path), "imgBrick", version=storage.fingerprint(str(path)))
    out = np.empty((8, 32, 32, 3), np.uint8)
    reader.read_into(np.arange(4), out)
    real = h5py.Dataset.read_direct

    def written_over_meanwhile(self, *args, **kwargs):
        real(self, *args, **kwargs)
        os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)

    monkeypatch.setattr(h5py.Dataset, "read_direct", written_over_meanwhile)
    with pytest.raises(ObjectChanged, match=f"{path} changed since this run planned it \\(modified"):
        reader.read_into(np.arange(4, 8), out)
