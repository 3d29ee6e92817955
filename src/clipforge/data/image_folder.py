"""Images in a folder (local or s3://) or listed in a CSV, as a cache source.

A row's id is the image's path relative to the dataset folder (for a CSV, the
`filepath` column made relative to the CSV's folder: `./a.png`, `x/../a.png` and
an absolute path to it are all `a.png`), so an index of the folder maps straight
back to files, and one image is one row however the CSV spells it. Images of
any size are decoded to RGB uint8 arrays, each resized and cropped to the
encoder's input on the CPU as soon as it is decoded (`read_images(shrink=...)`),
so a shard holds 224 px images rather than full-size photos; normalising
happens on the encoder's device.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from clipforge.data.index import RowIndex
from clipforge.data.pixels import check_aspect, unreadable, upright_rgb
from clipforge.data.text_csv import read_text_csv, shown
from clipforge.errors import UserError
from clipforge.storage import uri as storage
from clipforge.storage.manifest import SKIPPED_SHOWN, first_few
from clipforge.storage.s3 import parse_s3

log = logging.getLogger("clipforge.cache")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def is_listed_image(relative: str) -> bool:
    """An image file a folder listing includes: by suffix, and not hidden. Hidden files and folders are
    other tools' (macOS `._photo.jpg` resource forks, `.thumbnails/`, `.ipynb_checkpoints/`), not images."""
    return relative.lower().endswith(IMAGE_SUFFIXES) and not storage.is_hidden(relative)


# Image files Pillow reads that a folder's listing leaves out (the caption page's and the caches' formats are the
# ones above): said when a folder holds some, since its plan would count fewer images than are there.
OTHER_IMAGE_SUFFIXES = (".tif", ".tiff", ".bmp", ".gif", ".heic", ".heif", ".avif", ".jfif")


def is_image_file(relative: str) -> bool:
    """An image of a captioned folder, in any format Pillow reads that `captions prepare` takes (a .bmp named in
    index.csv too), not only those a folder's listing offers the caption page and a cache."""
    return is_listed_image(relative) or is_left_out_image(relative)


def outside_root(root: str, paths: list[str]) -> list[str]:
    """The images, of those a CSV in `root` names, that lie outside it (`../images/a.png`, an absolute path,
    another bucket), sorted: a listing of `root` does not see them replaced."""
    uris = {image_uri(root, path) for path in paths if path}
    if storage.is_s3(root):
        prefix = root.rstrip("/") + "/"
        return sorted(uri for uri in uris if not uri.startswith(prefix))
    base = os.path.realpath(storage.local_path(root)) + os.sep
    return sorted(uri for uri in uris if storage.is_s3(uri) or not os.path.realpath(uri).startswith(base))


def left_out_hint(others: list[str]) -> str:
    """What to do with images of formats a listing leaves out: a CSV source lists those Pillow reads here; the
    others (HEIC without a plugin) only converted."""
    Image.init()
    unread = sorted({PurePosixPath(path).suffix.lower() for path in others} - set(Image.registered_extensions()))
    if not unread:
        return "convert them, or list them in a CSV source"
    return f"convert them (Pillow here reads no {', '.join(unread)}: a plugin such as pillow-heif adds HEIC)"


def is_left_out_image(relative: str) -> bool:
    """Among a listing's visible files (`storage.listed_tree` leaves hidden ones out): one of those formats."""
    return relative.lower().endswith(OTHER_IMAGE_SUFFIXES)


def name_shown(relative: str) -> str:
    """A file name as text: one whose bytes are not UTF-8 (a Latin-1 name from an old zip, which the file system
    gives Python as surrogate escapes) with those bytes escaped, `caf\\xe9.png`."""
    return os.fsencode(relative).decode("utf-8", "backslashreplace")


def is_utf8_name(relative: str) -> bool:
    """Whether a name can be an id: ids are UTF-8 text in the cache's parquet, index.csv and the pages."""
    return name_shown(relative) == relative


def is_image_collection(source: str) -> bool:
    """A CSV or a folder; HDF5 files are the other kind of source."""
    return not source.lower().endswith((".hdf5", ".h5"))


def collection_root(source: str) -> str:
    """Relative paths resolve against the folder, or against the CSV's folder."""
    if not source.lower().endswith(".csv"):
        return source
    return source.rsplit("/", 1)[0] if "/" in source else "."


def list_collection(source: str, *, unsigned: bool = False) -> tuple[RowIndex, dict]:
    """The ids (relative paths, sorted) and splits of a folder or CSV, and a fingerprint of the listing;
    `unsigned`: read a public bucket anonymously (`no_sign_request`)."""
    if source.lower().endswith(".csv"):
        frame = read_text_csv(source, ["filepath"], unsigned=unsigned)
        root = collection_root(source)
        frame["filepath"] = collection_ids(root, list(frame["filepath"]))
        # The first row of an image spelled twice wins, as for a row repeated exactly.
        frame = frame.drop_duplicates("filepath").sort_values("filepath")
        splits = list(frame["split"].replace("", None)) if "split" in frame.columns else [None] * len(frame)
        ids = frame["filepath"].to_numpy(dtype=object)
        # The CSV counts by the images it names and their splits, not its bytes: a caption edited on the caption
        # page (which rewrites the file) or a touch is no other cache. Their folder's listing says whether one
        # was replaced since.
        rows = hashlib.sha256(json.dumps([[str(i), s] for i, s in zip(ids, splits, strict=True)]).encode())
        fingerprint = {"uri": source, "rows": len(ids), "rows_sha256": rows.hexdigest(),
                       "images": storage.tree_fingerprint(collection_root(source), is_listed_image, unsigned=unsigned)}
    else:
        # Path, size and mtime (ETag on S3) of each image: one replaced by one of the same size is seen too.
        dangling: list[str] = []
        found = storage.listed_tree(source, is_listed_image, unsigned=unsigned, also=is_left_out_image,
                                    dangling=dangling)
        # A photo, a parquet file: not listed as a folder of none.
        if found is None and storage.is_file(source, unsigned=unsigned):
            raise UserError(f"source {source} is not an HDF5 file (.hdf5, .h5), an image folder or a CSV of images "
                            "(.csv)")
        if found is None and not storage.exists(source, unsigned=unsigned):
            raise UserError(f"source {source} not found")
        paths, listing, others = found or ([], {}, [])
        undecodable = [path for path in paths if not is_utf8_name(path)]
        if undecodable:
            more = f", nor are {len(undecodable) - 1} more" if len(undecodable) > 1 else ""
            raise UserError(f"source {source}: the file name {name_shown(undecodable[0])} is not UTF-8 (another "
                            f"system's encoding){more}; rename, e.g. `convmv -f latin1 -t utf8 -r --notest "
                            f"{source}`")
        gone = [link for link in dangling if is_listed_image(link) or is_left_out_image(link)]
        if gone:
            log.warning("source %s: %d image link%s left out, leading nowhere (%s)", source, len(gone),
                        "" if len(gone) == 1 else "s", first_few([name_shown(link) for link in gone], SKIPPED_SHOWN))
        if others:
            log.warning("source %s: %d image files left out, of formats a folder's listing does not take (%s; "
                        "e.g. %s); %s", source, len(others), ", ".join(IMAGE_SUFFIXES), others[0],
                        left_out_hint(others))
        ids = np.array(paths, dtype=object)
        splits = [None] * len(ids)
        fingerprint = {"uri": source, **listing}
    if len(ids) == 0:
        raise UserError(f"source {source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return RowIndex(ids=ids, splits=splits), fingerprint


def collection_ids(root: str, paths: list[str]) -> list[str]:
    """The ids of the images CSV rows name under `root`: relative to it, `/`-separated, `.` and `..` collapsed
    (an absolute path or s3:// URI inside it too), so two spellings of one image are one id. A path outside the
    root is kept as written: it is read from there."""
    if storage.is_s3(root):
        prefix = parse_s3(root.rstrip("/") + "/")

        def s3_id(path: str) -> str:
            if not path or path.startswith("/"):
                return path
            location = parse_s3(path) if path.startswith("s3://") else None
            if location is not None and location.bucket != prefix.bucket:
                return path
            key = posixpath.normpath(location.key if location else prefix.key + path.replace("\\", "/"))
            return (_inside(key[len(prefix.key):]) if key.startswith(prefix.key) else "") or path

        return [s3_id(path) for path in paths]
    base = os.path.abspath(storage.local_path(root))
    real_base, real_folders = os.path.realpath(base), {}

    def local_id(path: str) -> str:
        if not path or path.startswith("s3://"):
            return path
        # As the file is spelled on disk: `café.png` typed in NFC and copied in NFD are one image, not two ids.
        full = on_disk(os.path.normpath(os.path.join(base, separated(base, path))))
        inside = _inside(os.path.relpath(full, base))
        if not inside:  # the root, or the folder holding the image, may be named through a symbolic link
            folder, name = os.path.split(full)
            if folder not in real_folders:
                real_folders[folder] = os.path.realpath(folder)
            inside = _inside(os.path.relpath(os.path.join(real_folders[folder], name), real_base))
        return inside or path

    return [local_id(path) for path in paths]


def _inside(relative: str) -> str:
    """`relative` when it names something under the root; '' for the root itself or a path leaving it."""
    return "" if relative in ("", ".", "..") or relative.startswith("../") else relative


def image_uri(root: str, path: str) -> str:
    """The image a CSV row names: relative to `root`, absolute, or s3://."""
    return on_disk(_joined(root, separated(root, path)))


def separated(root: str, path: str) -> str:
    """`path` as a local CSV row means it: one written on Windows (`sub\\a.png`) names sub/a.png, unless a file
    of that very name is there (a Linux file name may hold a backslash). The one rule of the ids, the split and
    the caption page."""
    if "\\" not in path or storage.is_s3(_joined(root, path)) or os.path.exists(on_disk(_joined(root, path))):
        return path
    return path.replace("\\", "/")


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _joined(root: str, path: str) -> str:
    if URL.match(path) and not path.startswith("s3://"):  # a LAION-style CSV: read as a path under the root
        raise UserError(f"image {path} is a URL: images are read from local paths or s3:// (download them first, "
                        "e.g. with img2dataset)")
    return path if path.startswith(("s3://", "/")) else storage.join(root, path)


def on_disk(uri: str) -> str:
    """The local file `uri` names, also when the name on disk differs only in its Unicode form: a folder
    copied from a Mac keeps "é" as e + combining accent (NFD), while a caption CSV typed by hand has "é" (NFC)."""
    if storage.is_s3(uri) or os.path.exists(uri):
        return uri
    for form in ("NFC", "NFD"):
        other = unicodedata.normalize(form, uri)
        if other != uri and os.path.exists(other):
            return other
    return uri


def image_identity(uri: str) -> str:
    """One name per image, however a CSV spells it (`a.png`, `./a.png`, absolute, NFC or NFD): for a local file
    the real path of the file `on_disk` finds, in NFC; for s3:// the normalised key. The split, the train/val
    leak check and the contrastive loss's negatives compare these, never the spellings."""
    if storage.is_s3(uri):
        location = parse_s3(uri)
        return f"s3://{location.bucket}/{posixpath.normpath(location.key)}"
    return unicodedata.normalize("NFC", os.path.realpath(on_disk(str(storage.local_path(uri)))))


SKIP_BAD_HINT = "; --skip-bad (skip_bad: true in a spec) leaves out the images that do not read"


def decode(root: str, path: str, *, unsigned: bool = False) -> tuple[np.ndarray, int]:
    """(RGB uint8 array, encoded size in bytes) of one image."""
    uri = image_uri(root, path)
    try:
        data = storage.read_bytes(uri, unsigned=unsigned)
    except UserError:
        raise UserError(f"image {shown(uri)} not found{SKIP_BAD_HINT}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(upright_rgb(image)), len(data)
    except Exception as exc:  # PIL raises many types for corrupt files
        raise UserError(f"image {shown(uri)} {unreadable(exc)}{SKIP_BAD_HINT}") from None


def image_problem(uri: str, *, unsigned: bool = False) -> str | None:
    """Why this image cannot be used, or None."""
    try:
        data = storage.read_bytes(uri, unsigned=unsigned)
    except UserError:
        return "not found"
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_aspect(image)
            image.load()
    except Exception as exc:  # PIL raises many types for corrupt files
        return unreadable(exc)
    return None


def read_images(root: str, paths: list[str], threads: int = 8,
                shrink: Callable[[np.ndarray], np.ndarray] | None = None,
                pool: ThreadPoolExecutor | None = None, unsigned: bool = False) -> tuple[list[np.ndarray], int]:
    """RGB uint8 arrays of these images, and the encoded bytes read for them.

    `shrink`, applied to each image as soon as it is decoded, keeps one full-size photo per thread in
    memory rather than a shard's; a shared `pool` bounds those threads across shards read at once."""
    def read(path: str) -> tuple[np.ndarray, int]:
        image, size = decode(root, path, unsigned=unsigned)
        return (shrink(image) if shrink else image), size

    if pool is not None:
        decoded = list(pool.map(read, paths))
    else:
        with ThreadPoolExecutor(threads) as own:
            decoded = list(own.map(read, paths))
    return [image for image, _ in decoded], sum(size for _, size in decoded)
