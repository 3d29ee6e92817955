"""Decoded images as a person sees them, for every place clipforge encodes or shows one.

Phone photos store pixels sideways with an EXIF orientation tag, and the browser
on the captioning page shows them upright: the model must see the same image the
caption describes. 16-bit greyscale PNGs would turn almost white under Pillow's
plain `convert("RGB")`, which clips instead of scaling.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def upright(image: Image.Image) -> Image.Image:
    """`image` rotated as its EXIF tag says, with 16-bit greyscale scaled to 8 bits; other modes kept."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.getextrema()[1] > 255):
        values = np.asarray(image, dtype=np.uint32) // 257
        image = Image.fromarray(values.clip(0, 255).astype(np.uint8))
    return image


def upright_rgb(image: Image.Image) -> Image.Image:
    """`upright(image)` in 8-bit RGB, as open_clip's own transform would convert it."""
    return upright(image).convert("RGB")
