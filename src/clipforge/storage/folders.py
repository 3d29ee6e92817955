"""The local folders a failed or stopped command made and left empty: found before it writes, removed after.
S3 has no folders, so nothing here acts on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clipforge.storage.conditional import LOCK_NAME, unlink_lock_file
from clipforge.storage.uri import local_path, scheme


def remove_empty_folders(prefix: str) -> None:
    """The folders under a local `prefix`, and it, while they are empty (deepest first); S3 has none. A folder
    someone writes into meanwhile is not empty, and stays."""
    if scheme(prefix) != "file" or not local_path(prefix).is_dir():
        return
    root = local_path(prefix)
    for folder in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()),
                         key=lambda p: len(p.parts), reverse=True) + [root]:
        try:
            folder.rmdir()
        except OSError:
            continue


@contextmanager
def removed_if_left_empty(prefix: str, made: list[Path] | None = None) -> Iterator[None]:
    """Run the block; when it fails, remove the folders it made for `prefix` that are still empty, so a failed
    command leaves no empty output behind. `made`: those folders, when some were made before the block."""
    made = missing_folders(prefix) if made is None else made
    try:
        yield
    except BaseException:
        remove_empty(made)
        raise


def missing_folders(prefix: str) -> list[Path]:
    """The local folders that writing under `prefix` would make (it and the parents it lacks), deepest first.
    S3 has no folders: none there."""
    if scheme(prefix) != "file":
        return []
    path = local_path(prefix).absolute()
    return [folder for folder in (path, *path.parents) if not folder.exists()]


# Hidden, in an output a stage has begun to write (`manifest.claim`): a folder holding only it is empty.
CLAIM_NAME = ".clipforge-output"


def remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first, from `missing_folders`) while they are empty, or hold only a stage's
    claim and a lock file: a folder that holds anything else stays, and so do those above it."""
    for folder in folders:
        try:
            left = {entry.name for entry in folder.iterdir()}
            if left and left <= {CLAIM_NAME, LOCK_NAME}:
                (folder / CLAIM_NAME).unlink(missing_ok=True)
                if LOCK_NAME in left:
                    unlink_lock_file(folder / LOCK_NAME)
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            break
