"""Compare-and-swap writes, for the small records several processes share (a stage's lease, a run record,
an output's claim): S3 checks the condition itself; on disk the folder is locked around the read and the write.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clipforge.storage import s3
from clipforge.storage.uri import local_path, scheme, write_bytes


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """The object's bytes and a token naming this version of it (S3: its ETag; disk: a hash); None if absent."""
    match scheme(uri):
        case "file":
            try:  # no is_file() first: the holder may delete it between that look and the read
                data = local_path(uri).read_bytes()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
            return data, hashlib.sha256(data).hexdigest()
        case "s3":
            try:
                data, reply = s3.get_whole(uri)
            except Exception as exc:
                if s3.is_not_found(exc):
                    return None
                raise
            return data, reply["ETag"]


def write_if(uri: str, data: bytes, expected: str | None) -> str | None:
    """Compare-and-swap: write only while the object is still the version `expected` names (None: absent).

    Returns the new version's token, or None when another writer changed it first. S3 checks this itself
    (conditional PUT: If-None-Match / If-Match); on disk the folder is locked around read and write
    (`_folder_locked`).
    """
    match scheme(uri):
        case "file":
            path = local_path(uri)
            for attempt in range(3):
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    return _write_if_locked(path, data, expected)
                except FileNotFoundError:  # the folder was removed meanwhile (a prune taking an empty output)
                    if attempt == 2:
                        raise
        case "s3":
            condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
            try:
                return s3.put_whole(uri, data, **condition)["ETag"]
            except Exception as exc:
                code = getattr(exc, "response", {}).get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or (expected and s3.is_not_found(exc)):
                    return None
                raise


def _write_if_locked(path: Path, data: bytes, expected: str | None) -> str | None:
    """`write_if` on disk, with the folder locked around the read and the write."""
    with _folder_locked(path.parent):
        current = read_versioned(str(path))
        if (current[1] if current else None) != expected:
            return None
        write_bytes(str(path), data)
        return hashlib.sha256(data).hexdigest()


# Hidden, beside a lease where the folder itself cannot be locked (NFS): a folder holding only it is empty.
LOCK_NAME = ".clipforge-lock"
# NFS clients lock by POSIX byte-range locks, and an exclusive one needs a file open for writing, which a folder
# never is: flock on a folder there fails with EBADF (flock(2), "NFS details"), or ENOLCK without a lock daemon.
NO_FOLDER_LOCK = {errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP}
_threads_of_this_process = threading.Lock()  # POSIX locks (lockf) do not keep out a process's own threads


@contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` among processes and threads: flock on the folder itself, or where the file
    system cannot (a shared volume over NFS: the artifacts PVC), lockf on a hidden file in it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException as exc:  # a stop while it waits, too: the folder's descriptor is closed either way
        os.close(fd)
        if not isinstance(exc, OSError) or exc.errno not in NO_FOLDER_LOCK:
            raise
    else:
        try:
            yield
        finally:
            os.close(fd)  # releases the lock
        return
    with _threads_of_this_process:
        lock = _locked_file(folder / LOCK_NAME)
        try:
            yield
        finally:
            os.close(lock)  # releases the lock


def unlink_lock_file(path: Path) -> None:
    """Delete a lock file only while holding its lock: deleted under a holder, the next writer would lock a new
    file of that name and write beside it."""
    with _threads_of_this_process:
        lock = _locked_file(path)
        try:
            path.unlink()
        finally:
            os.close(lock)


def _locked_file(path: Path) -> int:
    """A descriptor of `path` holding its lockf lock. A writer waiting on a file that the holder then deleted
    (`unlink_lock_file`) would hold a lock no one else asks for: it locks again until the file it locked is
    the one the name names."""
    while True:
        lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX)
            if os.fstat(lock).st_ino == os.stat(path).st_ino:
                return lock
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(lock)
            raise
        os.close(lock)
