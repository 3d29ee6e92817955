"""Read, write and list artifacts by URI, chosen by scheme.

Writes are atomic: temp file + rename on disk, a single PUT on S3, so a reader
never sees half a file under its final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipforge.errors import UserError
from clipforge.storage import s3

SCHEMES = "a local path or s3://bucket/key"

# Read once, while the process is still single-threaded: os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def scheme(uri: str) -> str:
    """'s3' or 'file'; anything else is a UserError listing what is accepted."""
    match uri.split("://", 1):
        case [path] if path:
            return "file"
        case ["file", _]:
            return "file"
        case ["s3", rest] if rest.split("/", 1)[0]:
            return "s3"
        case _:
            raise UserError(f"unsupported URI {uri!r}: use {SCHEMES}")


def is_s3(uri: str) -> bool:
    return scheme(uri) == "s3"


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    """`base/part/...` for either scheme; an empty base stays relative (it never becomes the root)."""
    out = base.rstrip("/") or ("/" if base.startswith("/") else "")
    for part in parts:
        out = f"{out.rstrip('/')}/{part.strip('/')}" if out else part.strip("/")
    return out


def one_spelling(uri: str) -> str:
    """One spelling per place, to compare two: an absolute local path (`./x`, `file://x` and `/cwd/x` agree), or
    the URI without a trailing slash."""
    if "://" in uri and not uri.startswith("file://"):
        return uri.rstrip("/")
    return os.path.abspath(uri.removeprefix("file://"))


def holds(outer: str, inner: str) -> bool:
    """Whether `inner` is `outer` or lies under it (both spelled by `one_spelling`)."""
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def is_file(uri: str, *, unsigned: bool = False) -> bool:
    """A file (an S3 object), not a folder or nothing."""
    return exists(uri, unsigned=unsigned) if is_s3(uri) else local_path(uri).is_file()


def check_output_folder(uri: str, flag: str) -> None:
    """An output prefix that is a local file, or inside one, said before any work: not when the first write
    fails after it."""
    if is_s3(uri):
        return
    path = local_path(uri)
    blocking = next((part for part in (path, *path.parents) if part.exists()), None)
    if blocking is not None and blocking.is_file():
        raise UserError(f"{flag} {uri} is a file, not a folder" if blocking == path else
                        f"{flag} {uri}: {blocking} is a file, not a folder")


def exists(uri: str, *, unsigned: bool = False) -> bool:
    match scheme(uri):
        case "file":
            return local_path(uri).exists()
        case "s3":
            loc = s3.parse_s3(uri)
            try:
                s3.client(unsigned).head_object(Bucket=loc.bucket, Key=loc.key)
                return True
            except Exception as exc:
                if s3.is_not_found(exc):
                    return False
                raise


def read_bytes(uri: str, *, unsigned: bool = False) -> bytes:
    match scheme(uri):
        case "file":
            path = local_path(uri)
            try:  # no look first: a file deleted between the look and the read would be an OSError
                return path.read_bytes()
            except IsADirectoryError:
                raise UserError(f"{uri} is a folder, not a file") from None
            except (FileNotFoundError, NotADirectoryError):
                raise UserError(f"{uri} not found") from None
        case "s3":
            try:
                return s3.get_whole(uri, unsigned=unsigned)[0]
            except Exception as exc:
                if s3.is_not_found(exc):
                    raise UserError(f"{uri} not found") from None
                raise


def file_mode(path: Path) -> int:
    """The mode a file written at `path` gets: the one it has if it exists, else what the umask allows.

    mkstemp creates files 0600 and a rename keeps that, which would lock teammates (or a pod running
    under another uid on a shared volume) out of every dataset split, shard and model written here.
    """
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_UMASK


# What `write_bytes` names its temporary file on disk: `.NAME.` + mkstemp's 8 random characters + this suffix,
# which no other tool's temporary file ends with.
TEMPORARY_SUFFIX = ".clipforge-tmp"
INTERRUPTED_WRITE = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX))


def remove_interrupted_writes(prefix: str) -> int:
    """Delete the temporary files that writes killed before their rename left under a local `prefix` (hidden, so
    no reader takes them for data, but as large as what was being written); how many. Call only while nothing
    writes there (its lease held). S3 writes are single PUTs and leave none."""
    if scheme(prefix) != "file" or not local_path(prefix).is_dir():
        return 0
    removed = 0
    for folder, folders, files in os.walk(local_path(prefix)):
        folders[:] = [name for name in folders if not name.startswith(".")]  # checkpoints' `.tmp-*`, a `.git`
        for name in files:
            if INTERRUPTED_WRITE.fullmatch(name):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
    return removed


def write_bytes(uri: str, data: bytes | bytearray | memoryview) -> None:
    """Atomic: the object appears whole under its name or not at all."""
    match scheme(uri):
        case "file":
            path = local_path(uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
            except OSError as exc:  # said of the file the user named, not of a temporary name they never gave
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            try:
                os.fchmod(fd, file_mode(path))
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except OSError as exc:  # a full disk, a quota: said of the file being written, not of a temporary one
                Path(tmp).unlink(missing_ok=True)
                if exc.filename not in (None, tmp):
                    raise
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        case "s3":
            body = data if isinstance(data, bytes | bytearray) else bytes(data)  # botocore takes no memoryview
            s3.put_whole(uri, body)


def write_bytes_if_changed(uri: str, data: bytes) -> bool:
    """`write_bytes`, unless the object already holds exactly `data` (small files: it is read to compare).
    An unchanged file keeps its mtime, which the fingerprints of what was made from it count. True: written."""
    # Not there, a folder, or an object these credentials may write but not read (S3): the write says what is wrong.
    try:
        if read_bytes(uri) == data:
            return False
    except Exception:
        pass
    write_bytes(uri, data)
    return True


def upload_file(path: Path, uri: str) -> None:
    """A local file to an s3:// URI, streamed from disk (in parts when large): never whole in memory, and
    whole or absent under its name, as `write_bytes` writes."""
    s3.upload_whole(str(path), uri)


def same_local_file(a: str, b: str) -> bool:
    """Whether two local paths (relative ones from here) name one existing file, however spelled."""
    if is_s3(a) or is_s3(b):
        return False
    try:
        return os.path.samefile(local_path(a), local_path(b))
    except OSError:  # either is not there (or is an open_clip tag such as `openai`)
        return False


def read_json(uri: str, *, unsigned: bool = False) -> Any:
    return parse_json(read_bytes(uri, unsigned=unsigned), uri)


def parse_json(raw: bytes, uri: str) -> Any:
    """`raw` as JSON; bytes that are not are a UserError naming `uri`, where they were read."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # bytes that are not even UTF-8: the latter
        raise UserError(f"{uri} is not valid JSON: {exc}") from None


def write_json(uri: str, value: Any) -> None:
    write_bytes(uri, json.dumps(value, indent=2, sort_keys=True, default=str).encode() + b"\n")


def _one_level(prefix: str, unsigned: bool, *, folders: bool) -> list[str]:
    """Names directly under `prefix`, sorted: its files (S3: objects) or its folders (S3: common prefixes)."""
    match scheme(prefix):
        case "file":
            path = local_path(prefix)
            if not path.is_dir():
                return []
            return sorted(p.name for p in path.iterdir() if (p.is_dir() if folders else p.is_file()))
        case "s3":
            loc = s3.parse_s3(prefix.rstrip("/") + "/")
            names = []
            paginator = s3.client(unsigned).get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key, Delimiter="/"):
                if folders:
                    names.extend(p["Prefix"][len(loc.key) :].rstrip("/") for p in page.get("CommonPrefixes", []))
                else:
                    names.extend(obj["Key"][len(loc.key) :] for obj in page.get("Contents", []))
            # Not the prefix's own "folder" marker (an empty `prefix/` object, which consoles create).
            return sorted(name for name in names if name)


def list_names(prefix: str, *, unsigned: bool = False) -> list[str]:
    """Names of the objects directly under `prefix` (not recursive), sorted."""
    return _one_level(prefix, unsigned, folders=False)


def list_folders(prefix: str, *, unsigned: bool = False) -> list[str]:
    """Names of the folders (on S3: common prefixes) directly under `prefix`, sorted; none when it does not exist."""
    return _one_level(prefix, unsigned, folders=True)


def list_tree(prefix: str, *, unsigned: bool = False) -> dict[str, int]:
    """Every object under `prefix`, recursively: relative path -> size."""
    return {path: size for path, size, _ in sorted(_walk(prefix, unsigned) or [])}


def _stat_file(path: Path) -> os.stat_result | None:
    """A listed file's stat; None for a folder, or for a file renamed or deleted since the listing (another
    run's temporary file, committed meanwhile)."""
    try:
        info = path.stat()
    except OSError:  # gone since the listing, or a link that leads nowhere (a loop, a missing target)
        return None
    return info if stat.S_ISREG(info.st_mode) else None


def _walk(prefix: str, unsigned: bool, dangling: list[str] | None = None) -> list[tuple[str, int, int | str]] | None:
    """(relative path, size, mtime_ns on disk or ETag on S3) of every object under `prefix`; None when there
    is nothing there. `dangling` gets the relative paths of the links on disk that lead nowhere."""
    match scheme(prefix):
        case "file":
            root = local_path(prefix)
            if not root.is_dir():
                return None
            found = []
            for path in root.rglob("*"):
                if (info := _stat_file(path)) is not None:
                    found.append((path.relative_to(root).as_posix(), info.st_size, info.st_mtime_ns))
                elif dangling is not None and path.is_symlink() and not path.exists():
                    dangling.append(path.relative_to(root).as_posix())
            return found
        case "s3":
            loc = s3.parse_s3(prefix.rstrip("/") + "/")
            paginator = s3.client(unsigned).get_paginator("list_objects_v2")
            found = [(obj["Key"][len(loc.key):], obj["Size"], obj["ETag"].strip('"'))
                     for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key)
                     for obj in page.get("Contents", [])]
            return found or None


def tree_fingerprint(prefix: str, keep: Callable[[str], bool] | None = None, *,
                     unsigned: bool = False) -> dict[str, Any] | None:
    """What identifies a folder's content cheaply: every file's path, size and mtime (ETag on S3), hashed;
    only the files whose relative path `keep` accepts, when given. Hidden files and folders (`.thumbnails/`,
    editors' temp files) do not count. None: no such folder."""
    found = listed_tree(prefix, keep, unsigned=unsigned)
    return found[1] if found is not None else None


def is_hidden(relative: str) -> bool:
    """A path under a folder that is hidden, or inside a hidden folder: other tools' files (`.DS_Store`, macOS
    `._photo.jpg` resource forks, `.thumbnails/`, an interrupted write's temporary file), nobody's data."""
    return any(part.startswith(".") for part in relative.split("/"))


def listed_tree(prefix: str, keep: Callable[[str], bool] | None = None, *, unsigned: bool = False,
                also: Callable[[str], bool] | None = None,
                dangling: list[str] | None = None) -> tuple[list[str], dict[str, Any], list[str]] | None:
    """The relative paths `tree_fingerprint` counts, sorted, that fingerprint, and the other files `also`
    accepts (files left out that the caller would name), from one listing (one walk of a folder, one paged
    LIST on S3). `dangling` gets the visible links that lead nowhere, which count as no file. None: no such
    folder."""
    links: list[str] = []
    entries = _walk(prefix, unsigned, links)
    if dangling is not None:
        dangling.extend(sorted(link for link in links if not is_hidden(link)))
    if entries is None:
        return None
    visible = sorted(e for e in entries if not is_hidden(e[0]))
    kept = [e for e in visible if keep is None or keep(e[0])]
    others = [e[0] for e in visible if also is not None and also(e[0]) and not (keep is None or keep(e[0]))]
    listing = json.dumps(kept).encode()
    fingerprint = {"files": len(kept), "listing_sha256": hashlib.sha256(listing).hexdigest()[:16]}
    return [e[0] for e in kept], fingerprint, others


def delete(uri: str) -> None:
    match scheme(uri):
        case "file":
            local_path(uri).unlink(missing_ok=True)
        case "s3":
            loc = s3.parse_s3(uri)
            s3.client().delete_object(Bucket=loc.bucket, Key=loc.key)


def delete_tree(prefix: str) -> None:
    """Every object under `prefix` (a folder and what it holds)."""
    match scheme(prefix):
        case "file":
            shutil.rmtree(local_path(prefix), ignore_errors=True)
        case "s3":
            delete_objects(prefix, list(list_tree(prefix)))


def delete_objects(prefix: str, names: list[str]) -> None:
    """The objects `names` (relative paths) under `prefix`; on S3 in DeleteObjects requests of up to 1,000 keys
    (a generate output's images: one request, not one each). One that cannot be deleted is a UserError."""
    match scheme(prefix):
        case "file":
            for name in names:
                try:
                    local_path(join(prefix, name)).unlink(missing_ok=True)
                except OSError as exc:
                    raise UserError(f"could not delete {join(prefix, name)}: {exc.strerror}") from None
        case "s3":
            keys = [s3.parse_s3(join(prefix, name)).key for name in names]
            bucket = s3.parse_s3(prefix).bucket
            for start in range(0, len(keys), 1000):
                batch = keys[start : start + 1000]
                answer = s3.client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch],
                                                                          "Quiet": True})
                if answer.get("Errors"):
                    first, more = answer["Errors"][0], len(answer["Errors"]) - 1
                    raise UserError(f"could not delete s3://{bucket}/{first.get('Key')} "
                                    f"({first.get('Code')}: {first.get('Message')})"
                                    + (f" and {more} more under {prefix}" if more else ""))


def fingerprint(uri: str, *, unsigned: bool = False) -> dict[str, Any]:
    """What identifies an input's content cheaply: ETag and size on S3, size and mtime on disk."""
    match scheme(uri):
        case "file":
            path = local_path(uri)
            if not path.exists():
                raise UserError(f"{uri} not found")
            stat = path.stat()
            return {"uri": uri, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        case "s3":
            loc = s3.parse_s3(uri)
            try:
                head = s3.client(unsigned).head_object(Bucket=loc.bucket, Key=loc.key)
            except Exception as exc:
                if s3.is_not_found(exc):
                    raise UserError(f"{uri} not found") from None
                if s3.is_denied(exc):
                    how = "read anonymously (no_sign_request)" if unsigned else "with these credentials"
                    raise UserError(f"access denied to {uri}, {how}: check the credentials and the bucket's "
                                    "policy") from None
                raise
            return {"uri": uri, "size": head["ContentLength"], "etag": head["ETag"].strip('"')}


def content_fingerprint(uri: str, *, unsigned: bool = False) -> dict[str, Any]:
    """`fingerprint` of a small file (a CSV) by its content: a hash of its bytes in place of the mtime on disk,
    so that a touch, a checkout or a copy of the same bytes leaves it the same. S3's ETag already is one."""
    found = fingerprint(uri, unsigned=unsigned)
    if "mtime_ns" not in found:
        return found
    return {"uri": uri, "size": found["size"], "sha256": hashlib.sha256(local_path(uri).read_bytes()).hexdigest()}


def fetch_to_local(uri: str, cache_dir: str | Path | None = None, *, unsigned: bool = False) -> Path:
    """A local file with the object's bytes: the path itself on disk; on S3 a copy keyed by ETag, streamed to
    disk (in parallel parts when large: ViT-H-14's weights are 3.9 GB) and never whole in memory."""
    if scheme(uri) == "file":
        path = local_path(uri)
        if not path.exists():
            raise UserError(f"{uri} not found")
        return path
    fp = fingerprint(uri, unsigned=unsigned)
    root = Path(cache_dir or Path(tempfile.gettempdir()) / "clipforge-downloads")
    loc = s3.parse_s3(uri)
    target = root / loc.bucket / fp["etag"] / Path(loc.key).name
    if target.is_file() and target.stat().st_size == fp["size"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX, dir=target.parent)
    os.close(fd)
    try:
        s3.client(unsigned).download_file(loc.bucket, loc.key, tmp)
        os.chmod(tmp, file_mode(target))  # not mkstemp's 0600: a cache folder shared by pods of other users
        if os.path.getsize(tmp) != fp["size"]:  # replaced while it was fetched: not kept under the old ETag
            raise UserError(f"{uri} changed while it was fetched: run again")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
