"""Smaller copies of images for the pages, made with Pillow and cached on disk.

A copy's key is the source's URI, its fingerprint (size and mtime on disk,
ETag on S3) and the box it fits, so an edited image gets a new copy and an
unchanged one is made once, also across restarts. Copies are JPEG files
written atomically: a crash never leaves half a thumbnail to be served later.
The folder is this user's alone (0700, as the freedesktop thumbnail spec
has it): the copies show private photos to anyone who may read it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

from PIL import Image

from clipforge.data.pixels import upright
from clipforge.errors import UserError
from clipforge.storage import uri as storage

THUMBNAIL_BOX = 256
DISPLAY_BOX = 2048


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipforge" / "thumbnails"


class Thumbnails:
    """`get(uri, box)`: JPEG bytes of the image fitted into box x box pixels (never enlarged)."""

    def __init__(self, cache_dir: str | Path | None = None):
        self.dir = Path(cache_dir) if cache_dir else default_cache_dir()
        try:  # also an older clipforge's folder, whose copies may all be there already
            make_private(self.dir)
        except OSError:  # a read-only home still gets its thumbnails, just not cached
            pass

    def get(self, uri: str, box: int = THUMBNAIL_BOX) -> bytes:
        """Raises UserError when the image is missing or cannot be decoded."""
        key = hashlib.sha256(json.dumps([uri, storage.fingerprint(uri), box], sort_keys=True).encode()).hexdigest()
        path = self.dir / key[:2] / f"{key[2:]}.jpg"
        if path.is_file():
            return path.read_bytes()
        data = shrink(storage.read_bytes(uri), box, uri)
        try:
            storage.write_bytes(str(path), data)
        except OSError:  # a read-only home still gets its thumbnails, just not cached
            pass
        return data


def make_private(folder: Path) -> None:
    """`folder` made, or (made by an older clipforge) narrowed, to 0700."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o077:
        folder.chmod(0o700)


def shrink(data: bytes, box: int, name: str) -> bytes:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (box, box))  # JPEG decodes straight at a smaller scale
            small = upright(image)
            small.thumbnail((box, box), Image.Resampling.LANCZOS)
            if small.mode not in ("RGB", "L"):
                background = Image.new("RGB", small.size, (255, 255, 255))
                rgba = small.convert("RGBA")
                background.paste(rgba, mask=rgba.getchannel("A"))
                small = background
            out = io.BytesIO()
            small.save(out, "JPEG", quality=85)
            return out.getvalue()
    except Exception as exc:  # PIL raises many types for corrupt files
        raise UserError(f"image {name} cannot be decoded ({type(exc).__name__})") from None
