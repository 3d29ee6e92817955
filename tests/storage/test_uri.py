import re
import stat

import pytest

from clipforge.errors import UserError
from clipforge.storage import conditional, folders
from clipforge.storage import uri as storage
from clipforge.storage.manifest import is_up_to_date, read_manifest, write_manifest


@pytest.fixture(params=["local", "s3"])
def prefix(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out"


def test_write_read_list_delete(prefix):
    storage.write_json(storage.join(prefix, "a.json"), {"x": 1})
    storage.write_bytes(storage.join(prefix, "b.bin"), b"abc")
    assert storage.read_json(storage.join(prefix, "a.json")) == {"x": 1}
    assert storage.list_names(prefix) == ["a.json", "b.bin"]
    assert storage.fingerprint(storage.join(prefix, "b.bin"))["size"] == 3
    storage.delete(storage.join(prefix, "b.bin"))
    assert not storage.exists(storage.join(prefix, "b.bin"))


def test_an_s3_folder_marker_is_not_a_name_in_the_folder(s3_bucket):
    """The AWS console's "Create folder" makes an empty `out/` object: listed as a name `""`, a cache refused
    its own new output as holding "a file that is not a cache's"."""
    import boto3

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="marked/", Body=b"")
    storage.write_bytes(f"s3://{s3_bucket}/marked/a.bin", b"1")
    assert storage.list_names(f"s3://{s3_bucket}/marked") == ["a.bin"]


def test_local_write_leaves_no_temp_files(tmp_path):
    storage.write_bytes(str(tmp_path / "x"), b"1")
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_a_disk_that_fills_mid_write_is_said_of_the_file_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """ENOSPC from write, fsync or rename carries no file name: the CLI, which says a path's error in one line,
    printed a traceback (a full disk under a cache's --output, a checkpoint)."""
    import errno

    from clipforge.cli import is_about_a_path, path_problem

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", disk_full)
    with pytest.raises(OSError) as full:
        storage.write_bytes(str(tmp_path / "out" / "shard.parquet"), b"rows")
    assert full.value.filename == str(tmp_path / "out" / "shard.parquet") and full.value.errno == errno.ENOSPC
    assert list((tmp_path / "out").iterdir()) == []  # no temporary file left behind
    assert is_about_a_path(full.value)  # so the CLI says it in one line, exit 2
    assert path_problem(full.value) == f"{tmp_path / 'out' / 'shard.parquet'}: No space left on device"
    monkeypatch.undo()
    (tmp_path / "out" / "taken").mkdir()  # the rename's error names the temporary file: said of the target
    with pytest.raises(OSError) as blocked:
        storage.write_bytes(str(tmp_path / "out" / "taken"), b"rows")
    assert path_problem(blocked.value) == f"{tmp_path / 'out' / 'taken'} is a folder, where a file is needed"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["taken"]


def test_local_write_honours_the_umask_and_keeps_a_files_mode(tmp_path):
    """mkstemp's 0600 must not leak: teammates and pods under other uids read these files."""
    new = tmp_path / "new.csv"
    storage.write_bytes(str(new), b"1")
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~storage._UMASK
    shared = tmp_path / "index.csv"
    shared.write_bytes(b"0")
    shared.chmod(0o664)
    storage.write_bytes(str(shared), b"1")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o664


def test_missing_object_is_a_user_error(prefix):
    with pytest.raises(UserError, match="not found"):
        storage.read_bytes(storage.join(prefix, "nope"))
    with pytest.raises(UserError, match="not found"):
        storage.fingerprint(storage.join(prefix, "nope"))


def test_json_that_is_not_even_utf8_is_a_user_error(prefix):
    """A damaged manifest, run record or planned config is one line naming it, not a UnicodeDecodeError."""
    uri = storage.join(prefix, "x.json")
    storage.write_bytes(uri, b'{\x80"a": 1}')
    with pytest.raises(UserError, match=f"{re.escape(uri)} is not valid JSON"):
        storage.read_json(uri)


def test_unknown_scheme_lists_the_accepted_ones():
    with pytest.raises(UserError, match="local path or s3://"):
        storage.read_bytes("gs://bucket/key")


def test_manifest_marks_a_prefix_done(prefix):
    assert read_manifest(prefix) is None
    manifest = write_manifest(prefix, kind="t", config={"a": 1}, config_fingerprint="f1", inputs={"i": 1})
    assert read_manifest(prefix) == manifest
    assert is_up_to_date(read_manifest(prefix), "f1", {"i": 1})
    assert not is_up_to_date(read_manifest(prefix), "f2", {"i": 1})
    assert not is_up_to_date(read_manifest(prefix), "f1", {"i": 2})


def test_join_never_turns_an_empty_base_into_the_root():
    assert storage.join("", "runs", "r1") == "runs/r1"
    assert storage.join("/", "runs") == "/runs"
    assert storage.join("s3://bucket/", "a/", "/b") == "s3://bucket/a/b"


def test_s3_mistakes_the_user_can_fix_are_one_line(s3_bucket, capsys):
    import botocore.exceptions

    from clipforge.cli import main
    from clipforge.storage.s3 import describe_failure

    assert main(["runs", "s3://no-such-bucket-here/prefix"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "clipforge runs: error: S3 ListObjectsV2: bucket no-such-bucket-here does not exist"
    down = botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    assert describe_failure(down).startswith("cannot reach the S3 endpoint http://127.0.0.1:9")
    assert describe_failure(RuntimeError("a bug")) is None


def test_a_folders_fingerprint_changes_with_what_it_holds_and_only_that(prefix):
    assert storage.tree_fingerprint(storage.join(prefix, "none")) is None
    folder = storage.join(prefix, "set")
    storage.write_bytes(storage.join(folder, "a/1.png"), b"one")
    storage.write_bytes(storage.join(folder, "index.csv"), b"filepath,caption\n")
    first = storage.tree_fingerprint(folder)
    assert first["files"] == 2
    storage.write_bytes(storage.join(folder, ".thumbnails/1.jpg"), b"not counted")
    assert storage.tree_fingerprint(folder) == first
    images_only = storage.tree_fingerprint(folder, lambda path: path.endswith(".png"))
    storage.write_bytes(storage.join(folder, "index.csv"), b"filepath,caption\na/1.png,x\n")
    assert storage.tree_fingerprint(folder) != first
    assert storage.tree_fingerprint(folder, lambda path: path.endswith(".png")) == images_only
    storage.write_bytes(storage.join(folder, "a/1.png"), b"ONE")  # same size, new content
    if not prefix.startswith("s3://"):  # the clock may not have ticked since the first write: say it did
        import os

        os.utime(storage.join(folder, "a/1.png"), ns=(1, 1))
    assert storage.tree_fingerprint(folder, lambda path: path.endswith(".png")) != images_only


def test_a_failed_block_takes_away_only_the_empty_folders_it_made(tmp_path):
    out = tmp_path / "runs" / "a" / "out"

    def fail_after(write: str | None = None):
        with pytest.raises(UserError), folders.removed_if_left_empty(str(out)):
            out.mkdir(parents=True, exist_ok=True)
            if write:
                (tmp_path / write).write_text("x")
            raise UserError("bad input")

    fail_after()
    assert tmp_path.exists() and not (tmp_path / "runs").exists()
    fail_after("runs/a/note.txt")  # a parent that now holds something stays, with its own parents
    assert (tmp_path / "runs" / "a" / "note.txt").exists() and not out.exists()
    out.mkdir()
    fail_after()  # there before: stays
    assert out.is_dir()
    with folders.removed_if_left_empty(str(tmp_path / "done")):
        (tmp_path / "done").mkdir()
    assert (tmp_path / "done").is_dir()


def test_delete_tree_takes_every_object_under_the_prefix_and_nothing_beside_it(prefix):
    """On S3 in requests of at most 1,000 keys: 1,003 objects are two of them."""
    import boto3

    names = [f"images/{n:04d}.png" for n in range(1003)] if prefix.startswith("s3://") else ["a/b.png", "c.json"]
    if prefix.startswith("s3://"):
        bucket, _, key = prefix.removeprefix("s3://").partition("/")
        client = boto3.client("s3")
        for name in names:  # by hand: the tree is the test's input, not what is under test
            client.put_object(Bucket=bucket, Key=f"{key}/{name}", Body=b"x")
    else:
        for name in names:
            storage.write_bytes(storage.join(prefix, name), b"x")
    storage.write_bytes(prefix + "-beside/keep.txt", b"x")  # shares the prefix's leading characters
    assert len(storage.list_tree(prefix)) == len(names)
    storage.delete_tree(prefix)
    assert storage.list_tree(prefix) == {} and storage.list_tree(prefix + "-beside") == {"keep.txt": 1}


def test_a_write_that_may_keep_the_file_still_writes_when_it_cannot_read_it(tmp_path, monkeypatch):
    """Credentials that may write an object but not read it (S3): the pre-read fails, the write goes on."""
    target = str(tmp_path / "x.csv")
    storage.write_bytes(target, b"old")

    def refused(uri, **kwargs):
        raise PermissionError(13, "Access Denied", uri)

    monkeypatch.setattr(storage, "read_bytes", refused)
    assert storage.write_bytes_if_changed(target, b"new")
    monkeypatch.undo()
    assert storage.read_bytes(target) == b"new" and not storage.write_bytes_if_changed(target, b"new")


def test_a_file_deleted_while_it_is_read_versioned_is_absent_not_an_error(tmp_path, monkeypatch):
    """A lease's holder releases it (deletes the file) while a waiter reads it: the waiter sees no lease. CI caught
    the race once, as a FileNotFoundError between a look at the file and its read; here the read itself is beaten."""
    target = tmp_path / "_lease.json"
    target.write_bytes(b"{}")
    read = type(target).read_bytes

    def released_first(self):
        self.unlink(missing_ok=True)
        return read(self)

    monkeypatch.setattr(type(target), "read_bytes", released_first)
    assert conditional.read_versioned(str(target)) is None
    monkeypatch.undo()
    assert conditional.read_versioned(str(tmp_path)) is None  # a folder where the file would be holds no version


def test_files_gone_between_a_listing_and_their_reads_are_absent_not_errors(tmp_path, monkeypatch):
    """Another run commits (renames away) its temporary files, or withdraws a manifest, while a listing or a read
    of the same folder runs: what is gone is not there, and says so as one line, never a FileNotFoundError."""
    (tmp_path / "shard-0.parquet").write_bytes(b"x")
    (tmp_path / ".shard-1.parquet.tmp").write_bytes(b"y")
    (tmp_path / "_manifest.json").write_bytes(b"{}")
    path_type = type(tmp_path)
    stat, read = path_type.stat, path_type.read_bytes

    def renamed_away(self, **kwargs):
        if self.name.endswith(".tmp"):
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return stat(self, **kwargs)

    def withdrawn_first(self):
        self.unlink(missing_ok=True)
        return read(self)

    monkeypatch.setattr(path_type, "stat", renamed_away)
    monkeypatch.setattr(path_type, "is_file", lambda self: True)  # a look before the stat saw it still there
    assert set(storage.list_tree(str(tmp_path))) == {"shard-0.parquet", "_manifest.json"}
    monkeypatch.setattr(path_type, "read_bytes", withdrawn_first)
    assert read_manifest(str(tmp_path)) is None
    with pytest.raises(UserError, match="shard-0.parquet not found$"):
        storage.read_bytes(str(tmp_path / "shard-0.parquet"))


def test_a_file_that_cannot_be_created_is_named_not_its_temporary_name():
    """`index --output /proc/x.parquet` said `/proc/.x.parquet.ic_c8ln1.tmp: No such file or directory`."""
    with pytest.raises(OSError) as info:
        storage.write_bytes("/proc/clipforge-x.parquet", b"x")  # a folder that takes no new files, even for root
    assert info.value.filename == "/proc/clipforge-x.parquet"


def test_an_object_this_identity_may_not_read_is_one_line_naming_it(s3_bucket, capsys):
    """A HEAD's 403 carries no AccessDenied code: it fell through as a botocore traceback, exit 1 (a crash that a
    driver Job retries) rather than the user's to fix."""
    import boto3

    from clipforge.cli import main

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="private/e.mat", Body=b"x")
    uri = f"s3://{s3_bucket}/private/e.mat"
    with pytest.raises(UserError, match=rf"^access denied to {uri}, read anonymously \(no_sign_request\)"):
        storage.fingerprint(uri, unsigned=True)
    code = main(["index", "nsd", "--expdesign", uri, "--no-sign-request", "--subject", "subj01", "--output", "o.csv"])
    assert code == 2 and "Traceback" not in capsys.readouterr().err


def test_s3_weights_are_fetched_to_disk_by_parts_once_per_version(s3_bucket, tmp_path, monkeypatch):
    """ViT-H-14's weights are 3.9 GB: fetched to the cache folder in parts, not read whole into memory first;
    the copy is reused while the object is unchanged, and a new version is fetched anew."""
    import os

    import boto3

    client = boto3.client("s3")
    data = os.urandom(9 << 20)  # over boto3's multipart threshold (8 MiB): ranged GETs of one version
    client.put_object(Bucket=s3_bucket, Key="w/model.pt", Body=data)
    uri = f"s3://{s3_bucket}/w/model.pt"
    monkeypatch.setattr(storage, "read_bytes", lambda *a, **k: pytest.fail("read whole into memory"))
    path = storage.fetch_to_local(uri, tmp_path / "cache")
    assert path.read_bytes() == data and path.name == "model.pt"
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600: a cache shared by users
    assert storage.fetch_to_local(uri, tmp_path / "cache") == path
    client.put_object(Bucket=s3_bucket, Key="w/model.pt", Body=b"new")
    again = storage.fetch_to_local(uri, tmp_path / "cache")
    assert again != path and again.read_bytes() == b"new"


def test_where_a_folder_cannot_be_flocked_nfs_a_lock_file_keeps_writers_apart(tmp_path, monkeypatch):
    """On NFS (an artifacts PVC shared by pods) flock on a folder fails with EBADF: every lease failed. A hidden
    lock file is locked instead, and still only one of many racing writers, threads and processes, wins, also
    when the lock file is deleted while one holds it (a prune, a failed command's empty folder removed)."""
    import errno
    import fcntl
    import multiprocessing
    import os
    import subprocess
    import sys
    import threading
    import time

    real_flock, real_read = fcntl.flock, conditional.read_versioned

    def nfs_flock(fd, op):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_flock(fd, op)

    def slow_read(uri, **kwargs):  # widens the gap between a writer's look and its write: a race shows at once
        found = real_read(uri, **kwargs)
        time.sleep(0.05)
        return found

    monkeypatch.setattr(conditional.fcntl, "flock", nfs_flock)
    monkeypatch.setattr(conditional, "read_versioned", slow_read)
    lease = str(tmp_path / "out" / "_lease.json")
    forked = multiprocessing.get_context("fork")
    wins = forked.Value("i", 0)

    def race(name: str) -> None:
        if conditional.write_if(lease, name.encode(), None) is not None:
            with wins.get_lock():
                wins.value += 1

    processes = [forked.Process(target=race, args=(f"process-{n}",)) for n in range(3)]
    threads = [threading.Thread(target=race, args=(f"thread-{n}",)) for n in range(4)]
    for worker in processes + threads:  # forked before any thread holds a lock a child would inherit
        worker.start()
    for worker in processes + threads:
        worker.join()
    assert wins.value == 1
    token = real_read(lease)[1]
    assert conditional.write_if(lease, b"renewed", "stale") is None and conditional.write_if(lease, b"renewed", token)
    assert (tmp_path / "out" / conditional.LOCK_NAME).exists()

    # A holder elsewhere (another pod): removing the folder's lock file waits for it, or the next writer would
    # lock a new file of that name beside the holder's.
    script = ("import errno, fcntl, os, sys, time\nfrom clipforge.storage import conditional\nreal = fcntl.flock\n"
              "def nfs_flock(fd, op):\n    if os.path.isdir(f'/proc/self/fd/{fd}'):\n"
              "        raise OSError(errno.EBADF, 'Bad file descriptor')\n    return real(fd, op)\n"
              "conditional.fcntl.flock = nfs_flock\nfrom pathlib import Path\n"
              "with conditional._folder_locked(Path(sys.argv[1])):\n    print('in', flush=True); time.sleep(1.5)")
    storage.delete(lease)  # a failed command's folder holding only the lock file is empty
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "in\n"
    began = time.monotonic()
    folders.remove_empty([tmp_path / "out"])
    assert time.monotonic() - began > 0.5 and holder.wait(10) == 0
    assert not (tmp_path / "out").exists()
