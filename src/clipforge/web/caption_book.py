"""The captions of one image folder while a person writes them: the images, `index.csv`, and saves.

The images (jpg, jpeg, png, webp, at any depth, sorted by relative path as the
cache stage lists them) are found once at the start; linked folders are not
entered and linked files that lead out of the folder are not served. Images
Pillow cannot open are listed apart, with the reason, and skipped. The start
checks headers only (a 10,000-photo folder opens in seconds); every pixel of
an image is decoded, as `clipforge captions prepare` does, the first time it is
served or captioned, and one that fails (a truncated JPEG) joins the unreadable
ones then, so no caption is saved for an image prepare would refuse.

`index.csv` (filepath,caption; paths relative to the folder) is taken as it
is: rows keep their order and any extra columns; rows whose file is gone are
kept and reported, never dropped; a row with an empty caption counts as not
captioned (so does one of spaces only). A new caption appends a row. Every
save re-reads the file and rewrites it atomically (temp file + rename) under an
flock on the folder, so two `clipforge caption` processes on one folder lose
none of each other's captions, and a crash, kill -9 included, loses at most
the caption being typed. A save names the caption it replaces: when that is no
longer the caption on disk (a second tab, an editor), the save is refused with
the caption that is there, so nobody's words are overwritten unseen. An image
with several rows (one per caption) shows and edits its first; the others stay
as they are.
"""

from __future__ import annotations

import fcntl
import logging
import os
import posixpath
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from clipforge.data.captions import COLUMNS, INDEX
from clipforge.data.image_folder import IMAGE_SUFFIXES, is_listed_image
from clipforge.data.image_folder import image_problem as decode_problem
from clipforge.data.text_csv import read_text_csv
from clipforge.errors import UserError
from clipforge.storage import uri as storage

log = logging.getLogger("clipforge.caption")


class CaptionConflict(UserError):
    """The caption a save meant to replace has been changed by someone else meanwhile."""

    def __init__(self, path: str, current: str):
        shown = f'"{current}"' if current else "empty"
        super().__init__(f"{path} was captioned elsewhere meanwhile (another tab or an editor): it is now {shown}; "
                         "save again to replace it with yours")
        self.current = current


@dataclass(frozen=True)
class Unreadable:
    path: str
    reason: str


class CaptionBook:
    """`images` to caption, their `caption(path)`, and `save(path, caption)`; safe to call from threads."""

    def __init__(self, dataset: str | Path):
        if not Path(dataset).is_dir():
            raise UserError(f"dataset {dataset} is not a folder")
        self.root = Path(dataset).resolve()
        self.index = self.root / INDEX
        self.images, self.unreadable = scan_images(self.root)
        if not self.images:
            why = f"; {len(self.unreadable)} cannot be read, e.g. {self.unreadable[0].path} " \
                  f"({self.unreadable[0].reason})" if self.unreadable else ""
            raise UserError(f"dataset {dataset} holds no readable images ({', '.join(IMAGE_SUFFIXES)}){why}")
        if not os.access(self.root, os.W_OK) or (self.index.exists() and not os.access(self.index, os.W_OK)):
            raise UserError(f"cannot write {self.index}: the folder is read-only for this user; fix its "
                            "permissions, or caption a writable copy")
        self._image_set = set(self.images)  # what may be served: also those found unreadable later
        self._decoded: dict[str, str | None] = {}  # image -> why its pixels do not decode, or None
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        """Read index.csv (again): its rows, which images they caption, and which name files that are gone."""
        self.frame = read_caption_index(self.index)
        self._stamp = _stamp(self.index)
        found = self._image_set | {u.path for u in self.unreadable}
        self._rows: dict[str, list[int]] = {}
        self.missing: list[str] = []
        for row, filepath in enumerate(self.frame["filepath"]):
            key = self.relative(filepath)
            if key in found:
                self._rows.setdefault(key, []).append(row)
            else:
                self.missing.append(filepath)
        # Spaces only count as no caption, here and on the page.
        self._captions = {key: str(self.frame.at[rows[0], "caption"]).strip() for key, rows in self._rows.items()}

    def refresh(self) -> None:
        """Read index.csv again when it changed on disk (another tab's process, an editor)."""
        with self._lock:
            if _stamp(self.index) != self._stamp:
                self._load()

    def problem(self, path: str) -> str | None:
        """Why an image of the book cannot be captioned (its pixels do not all decode, it is gone), or None.

        Decoded once per image; a failing one moves from `images` to `unreadable`."""
        if path not in self._decoded:
            why = decode_problem(str(self.root / path))
            with self._lock:
                self._decoded[path] = why
                if why and path in self.images:
                    log.warning("%s %s: skipped, as the unreadable images are", path, why)
                    self.images = [image for image in self.images if image != path]
                    self.unreadable = [*self.unreadable, Unreadable(path, why)]
        return self._decoded[path]

    def relative(self, filepath: str) -> str | None:
        """The image a row names, as a path relative to the folder (None when outside it)."""
        if filepath.startswith("s3://"):
            return None
        if os.path.isabs(filepath):
            try:
                return Path(os.path.normpath(filepath)).relative_to(self.root).as_posix()
            except ValueError:
                return None
        return posixpath.normpath(filepath.replace("\\", "/"))

    def has_image(self, path: str) -> bool:
        return path in self._image_set

    def caption(self, path: str) -> str:
        return self._captions.get(path, "")

    def captioned(self) -> int:
        return sum(1 for path in self.images if self.caption(path).strip())

    def first_uncaptioned(self) -> int | None:
        return next((i for i, path in enumerate(self.images) if not self.caption(path).strip()), None)

    def save(self, path: str, caption: str, replaces: str | None = None) -> str:
        """Set the caption of one image and rewrite index.csv; returns the caption as saved.

        `replaces`: the caption the writer saw. If another writer changed it since, CaptionConflict; None
        skips the check (a caller that holds no earlier view)."""
        text = " ".join(caption.split())
        if not text:
            raise UserError("an empty caption is not saved: type what the image shows")
        if path not in self._image_set:
            raise UserError(f"{path} is not an image of {self.root}")
        why = self.problem(path)
        if why:
            raise UserError(f"image {path} {why}: it is skipped, as the unreadable images are")
        with self._lock, folder_lock(self.root):
            # Read again under the lock, whatever the stamp says: another `clipforge caption` may have
            # written a file of the same size within the file system's clock tick. Their rows are kept.
            self._load()
            current = self.caption(path)
            if replaces is not None and " ".join(current.split()) not in (" ".join(replaces.split()), text):
                raise CaptionConflict(path, current)
            rows = self._rows.get(path)
            if rows:  # the row the page shows; an image's other rows are its other captions (COCO style)
                self.frame.loc[rows[0], "caption"] = text
            else:
                self._rows[path] = [len(self.frame)]
                self.frame.loc[len(self.frame)] = {**dict.fromkeys(self.frame.columns, ""),
                                                   "filepath": path, "caption": text}
            # write_captions would keep only filepath,caption; a user's extra columns are theirs.
            try:
                storage.write_bytes(str(self.index), self.frame.to_csv(index=False).encode())
            except OSError as exc:
                self._load()  # what is on disk, not the caption that could not be written
                raise UserError(f"cannot write {self.index}: {exc.strerror}") from None
            self._stamp = _stamp(self.index)
            self._captions[path] = text
        return text


@contextmanager
def folder_lock(root: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself, between processes: no lock file is left in the dataset."""
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells that a file changed: its inode (each save is a new file), modification time and size
    (None while it does not exist)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def read_caption_index(path: Path) -> pd.DataFrame:
    """index.csv as strings, every column kept; empty when there is none yet."""
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame({column: pd.Series(dtype=object) for column in COLUMNS})
    return read_text_csv(str(path), COLUMNS).astype(object)


def scan_images(root: Path) -> tuple[list[str], list[Unreadable]]:
    """(readable images, unreadable ones with the reason), as sorted paths relative to `root`."""
    found = []
    for folder, dirs, files in os.walk(root):  # followlinks=False: linked folders are not entered
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        found.extend(Path(folder, name) for name in files if is_listed_image(name))
    relative = sorted(p.relative_to(root).as_posix() for p in found)
    if len(relative) > 2000:
        log.info("checking %d images in %s", len(relative), root)
    with ThreadPoolExecutor(8) as pool:
        problems = list(pool.map(lambda path: image_problem(root, path), relative))
    readable = [path for path, why in zip(relative, problems, strict=True) if why is None]
    unreadable = [Unreadable(path, why) for path, why in zip(relative, problems, strict=True) if why]
    if unreadable:
        log.warning("%d of %d images in %s cannot be read and are skipped, e.g. %s (%s)",
                    len(unreadable), len(relative), root, unreadable[0].path, unreadable[0].reason)
    return readable, unreadable


def image_problem(root: Path, relative: str) -> str | None:
    """Why the page cannot show this image, or None. Checks headers and structure, not every pixel."""
    if "\\" in relative:  # index.csv's readers take it for a folder separator (a Windows path)
        return "its name holds a backslash, which index.csv would read as a folder separator"
    if any(ord(char) < 32 for char in relative):
        return "its name holds a line break or another control character, which the page cannot load"
    real = (root / relative).resolve()
    if not real.is_relative_to(root):
        return "a link to a file outside the folder"
    try:
        with Image.open(real) as image:
            image.verify()
    except Exception as exc:  # PIL raises many types for corrupt files
        return f"cannot be decoded ({type(exc).__name__})"
    return None
