"""The captions of one image folder while a person writes them: the images, `index.csv`, and saves.

The images (jpg, jpeg, png, webp, at any depth, sorted by relative path as the
cache stage lists them) are found once at the start; linked folders are not
entered and linked files that lead out of the folder are not served. Images
Pillow cannot open are listed apart, with the reason, and skipped; image files
of other formats (bmp, gif, tiff...) are said, as the cache says them. The
start checks headers only (a 10,000-photo folder opens in seconds); every pixel
of an image is decoded, as `clipforge captions prepare` does, the first time it
is served or captioned, and one that fails (a truncated JPEG) joins the
unreadable ones then, so no caption is saved for an image prepare would refuse.

`index.csv` (filepath,caption; paths relative to the folder) is taken as it
is: rows keep their order, spelling and extra columns, the header its spelling,
and the file its UTF-8 BOM and line endings; an `index.csv` that is a link is
written through (the file it names is updated, the link stays; out of the folder,
only to a caption file that is there already). A row captions the image `captions prepare` takes
it for (`./a.png`, `x/../a.png`, an absolute path, NFC or NFD: one image), so
a save replaces that row's caption, however it is spelled. Rows whose file is
gone are kept and reported, never dropped; a row with an empty caption counts
as not captioned (so does one of spaces only). A new caption appends a row.
Every save re-reads the file and rewrites it atomically (temp file + rename)
under an flock on the folder, so two `clipforge caption` processes on one
folder lose none of each other's captions, and a crash, kill -9 included,
loses at most the caption being typed. A save names the caption it replaces:
when that is no longer the caption on disk (a second tab, an editor), the save
is refused with the caption that is there, so nobody's words are overwritten
unseen. An image with several rows (one per caption, COCO style) edits its
first; the others are shown, read-only, and stay as they are.
"""

from __future__ import annotations

import codecs
import csv
import fcntl
import io
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from clipforge.data.captions import COLUMNS, INDEX
from clipforge.data.image_folder import (
    IMAGE_SUFFIXES,
    image_identity,
    image_problem,
    image_uri,
    is_left_out_image,
    is_listed_image,
    is_utf8_name,
    name_shown,
)
from clipforge.data.text_csv import read_text_csv
from clipforge.errors import UserError
from clipforge.storage import uri as storage

log = logging.getLogger("clipforge.caption")

MAX_CAPTION = 5000  # characters: a long description fits; a pasted document, sent back on every load, does not


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
        if self.index.is_symlink():  # a file kept elsewhere (a repository, a shared drive): saves go there
            self.index = linked_index(self.root, self.index)
            log.info("%s links to %s: captions are saved there", self.root / INDEX, self.index)
        self.images, self.unreadable = scan_images(self.root)
        self.left_out = left_out_images(self.root)
        if not self.images:
            why = f"; {len(self.unreadable)} cannot be read, e.g. {self.unreadable[0].path} " \
                  f"({self.unreadable[0].reason})" if self.unreadable else ""
            raise UserError(f"dataset {dataset} holds no readable images ({', '.join(IMAGE_SUFFIXES)}){why}")
        if not os.access(self.root, os.W_OK) or (self.index.exists() and not os.access(self.index, os.W_OK)):
            raise UserError(f"cannot write {self.index}: the folder is read-only for this user; fix its "
                            "permissions, or caption a writable copy")
        self._image_set = set(self.images)  # what may be served: also those found unreadable later
        self._files = self._image_set | {u.path for u in self.unreadable} | set(self.left_out)  # a row may name
        self._identities: dict[str, str] = {}  # image_identity -> file, made when a row first needs it
        self._spellings: dict[str, str | None] = {}  # a row's filepath spelled otherwise -> the file it names
        self._decoded: dict[str, str | None] = {}  # image -> why its pixels do not decode, or None
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        """Read index.csv (again): its rows, which images they caption, and which name files that are gone."""
        raw = self.index.read_bytes() if self.index.is_file() else b""
        self.frame = read_caption_index(self.index, raw)
        self._bom, self._newline = csv_form(raw)
        self._header = header_row(raw)
        self._stamp = _stamp(self.index)
        found = self._image_set | {u.path for u in self.unreadable}
        self._rows: dict[str, list[int]] = {}
        self.missing: list[str] = []
        for row, filepath in enumerate(self.frame["filepath"]):
            key = self.named(filepath)
            if key is None:
                self.missing.append(filepath)
            elif key in found:  # else a file left out (a .bmp): it is there, and no image of the page
                self._rows.setdefault(key, []).append(row)
        # Spaces only count as no caption, here and on the page.
        captions = {key: [str(self.frame.at[row, "caption"]).strip() for row in rows]
                    for key, rows in self._rows.items()}
        self._captions = {key: texts[0] for key, texts in captions.items()}
        self._others = {key: [text for text in texts[1:] if text] for key, texts in captions.items()}

    def refresh(self) -> None:
        """Read index.csv again when it changed on disk (another tab's process, an editor)."""
        with self._lock:
            if _stamp(self.index) != self._stamp:
                self._load()

    def problem(self, path: str) -> str | None:
        """Why an image of the book cannot be captioned (its pixels do not all decode, it is gone), or None.

        Decoded once per image; a failing one moves from `images` to `unreadable`."""
        if path not in self._decoded:
            why = image_problem(str(self.root / path))
            with self._lock:
                self._decoded[path] = why
                if why and path in self.images:
                    log.warning("%s %s: skipped, as the unreadable images are", path, why)
                    self.images = [image for image in self.images if image != path]
                    self.unreadable = [*self.unreadable, Unreadable(path, why)]
        return self._decoded[path]

    def named(self, filepath: str) -> str | None:
        """The file of the folder a row names (a path relative to it), or None: by the rule of `captions prepare`
        (`image_identity`), so the page and the training data agree on which rows caption an image."""
        if filepath in self._files:
            return filepath  # the usual spelling: no look at the disk
        if filepath not in self._spellings:  # each save reads every row again: the disk is asked once per spelling
            if not self._identities:
                for path in sorted(self._files):  # a link inside the folder is its target's image: the first wins
                    self._identities.setdefault(image_identity(str(self.root / path)), path)
            file = image_uri(str(self.root), filepath)  # the name on disk, NFC or NFD
            # As prepare, which reads the file: `gone/../a.png` is not found when there is no folder `gone`.
            self._spellings[filepath] = self._identities.get(image_identity(file)) if os.path.isfile(file) else None
        return self._spellings[filepath]

    def has_image(self, path: str) -> bool:
        return path in self._image_set

    def caption(self, path: str) -> str:
        return self._captions.get(path, "")

    def other_captions(self, path: str) -> list[str]:
        """The captions of an image's rows after its first (COCO style): shown, never edited by the page."""
        return self._others.get(path, [])

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
        if len(text) > MAX_CAPTION:
            raise UserError(f"a caption of {len(text):,} characters is not saved: at most {MAX_CAPTION:,} (CLIP "
                            "reads the first 77 tokens, about 300 characters)")
        if not text.isascii() and not is_utf8_text(text):
            raise UserError("a caption holding half of a character (a lone UTF-16 surrogate, as JSON may send) "
                            "is not saved: index.csv is UTF-8")
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
                # The header as written (`Filepath`, a column named twice), not as pandas names the columns.
                header = self._header if len(self._header) == len(self.frame.columns) else True
                data = self._bom + self.frame.to_csv(index=False, header=header,
                                                     lineterminator=self._newline).encode()
                storage.write_bytes(str(self.index), data)
            except OSError as exc:
                self._load()  # what is on disk, not the caption that could not be written
                raise UserError(f"cannot write {self.index}: {exc.strerror}") from None
            self._stamp = _stamp(self.index)
            self._captions[path] = text
        return text


def is_utf8_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def linked_index(root: Path, link: Path) -> Path:
    """The file an `index.csv` link names, where saves go. Out of the folder, only a caption file that is
    there already (`filepath,caption` on its first line) is written through: a folder someone sent could
    otherwise link its index.csv to any path (`~/.ssh/authorized_keys`, a `.pth` file) and have saves make it,
    with lines spelled by its own file names."""
    target = link.resolve()
    if target.is_relative_to(root):
        return target
    header = header_row(target.read_bytes()[:65536]) if target.is_file() else []
    if not set(COLUMNS) <= {column.strip().lower() for column in header}:
        raise UserError(f"{link} links to {target}, out of the folder and not a caption file (first line "
                        "`filepath,caption`): only such a file is written through a link; remove the link, or copy "
                        "the caption file into the folder")
    return target


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


def read_caption_index(path: Path, raw: bytes) -> pd.DataFrame:
    """index.csv (its bytes, `raw`) as strings, every column kept; empty when there is none yet."""
    if not raw:
        return pd.DataFrame({column: pd.Series(dtype=object) for column in COLUMNS})
    return read_text_csv(str(path), COLUMNS, data=raw).astype(object)


def csv_form(raw: bytes) -> tuple[bytes, str]:
    """The UTF-8 BOM (b"" when none) and line ending of a CSV file as found, for a rewrite to keep: Excel on
    Windows writes both, and a file whose every line changes is a diff of every line."""
    bom = codecs.BOM_UTF8 if raw.startswith(codecs.BOM_UTF8) else b""
    return bom, "\r\n" if raw.split(b"\n", 1)[0].endswith(b"\r") else "\n"


def header_row(raw: bytes) -> list[str]:
    """The header row of a CSV file as written ([] for none)."""
    text = raw.decode("utf-8-sig", errors="replace")
    return next(csv.reader(io.StringIO(text)), []) if text.strip() else []


def scan_images(root: Path) -> tuple[list[str], list[Unreadable]]:
    """(readable images, unreadable ones with the reason), as sorted paths relative to `root`."""
    relative = folder_files(root, is_listed_image)
    if len(relative) > 2000:
        log.info("checking %d images in %s", len(relative), root)
    with ThreadPoolExecutor(8) as pool:
        problems = list(pool.map(lambda path: display_problem(root, path), relative))
    readable = [path for path, why in zip(relative, problems, strict=True) if why is None]
    # A link to another image of the folder is that image to `captions prepare`: offered once, under its own name.
    images = set(readable)
    problems = [why or linked_image(root, path, images) for path, why in zip(relative, problems, strict=True)]
    readable = [path for path, why in zip(relative, problems, strict=True) if why is None]
    unreadable = [Unreadable(name_shown(path), why) for path, why in zip(relative, problems, strict=True) if why]
    if unreadable:
        log.warning("%d of %d images in %s cannot be read and %s skipped, e.g. %s (%s)", len(unreadable),
                    len(relative), root, "is" if len(unreadable) == 1 else "are", unreadable[0].path,
                    unreadable[0].reason)
    return readable, unreadable


def linked_image(root: Path, relative: str, images: set[str]) -> str | None:
    """`a link to b.png, which is captioned as itself` for a link to another image of the folder, else None."""
    if not (root / relative).is_symlink():
        return None
    target = (root / relative).resolve().relative_to(root).as_posix()  # inside: `display_problem` checked
    return f"a link to {target}, which is captioned as itself" if target != relative and target in images else None


def left_out_images(root: Path) -> list[str]:
    """Image files of formats the page, like a cache of the folder, does not take (bmp, gif, tiff...): said, so
    a folder does not look captioned when some of its images were never offered."""
    others = [name_shown(path) for path in
              folder_files(root, lambda name: is_left_out_image(name) and not name.startswith("."))]
    if others:
        log.warning("%s: %d image file%s left out, of formats a folder's listing does not take (%s; e.g. %s); "
                    "convert them to caption them here", root, len(others), "" if len(others) == 1 else "s",
                    ", ".join(IMAGE_SUFFIXES), others[0])
    return others


def folder_files(root: Path, keep: Callable[[str], bool]) -> list[str]:
    """The files whose names `keep` takes, as sorted paths relative to `root`; hidden and linked folders are
    not entered."""
    found = []
    for folder, dirs, files in os.walk(root):  # followlinks=False: linked folders are not entered
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        found.extend(Path(folder, name) for name in files if keep(name))
    return sorted(p.relative_to(root).as_posix() for p in found)


def display_problem(root: Path, relative: str) -> str | None:
    """Why the page cannot show this image, or None. Checks headers and structure, not every pixel."""
    if not is_utf8_name(relative):  # index.csv, the page and a cache of the folder hold names as UTF-8 text
        return "its name is not UTF-8 (another system's encoding), which index.csv cannot hold; rename it"
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
