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
# Pillow refuses images over 179 M pixels as decompression bombs: a 200 MP phone's photo (16320x12240) too. Up
# to 512 M pixels read (1.5 GB decoded); Pillow warns above half of that, and refuses beyond.
Image.MAX_IMAGE_PIXELS = 256_000_000
# CLIP resizes an image until its short side is the model's size (224 px), then takes the middle: a 140-byte
# 20000x1 PNG became 224 x 4,480,000 px (3 GB) first. No photo is that thin (a panorama is 10:1 at most).
MAX_ASPECT = 100


class TooThin(ValueError):
    """An image far longer than it is wide (or the reverse), refused before it is resized."""


def check_aspect(image: Image.Image) -> None:
    width, height = image.size
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise TooThin(f"is {width}x{height} px, thinner than 1:{MAX_ASPECT}: resized for CLIP (short side 224 px) "
                      "it would take GBs of memory; crop it")


def unreadable(exc: Exception) -> str:
    """Why an image cannot be used, in the words an error gives after its name."""
    return str(exc) if isinstance(exc, TooThin) else f"cannot be decoded ({type(exc).__name__})"


def upright(image: Image.Image) -> Image.Image:
    """`image` rotated as its EXIF tag says, with 16-bit greyscale scaled to 8 bits; other modes kept."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.getextrema()[1] > 255):
        values = np.asarray(image, dtype=np.uint32) // 257
        image = Image.fromarray(values.clip(0, 255).astype(np.uint8))
    return image


def upright_rgb(image: Image.Image) -> Image.Image:
    """`upright(image)` in 8-bit RGB, as open_clip's own transform would convert it; `TooThin` if it is."""
    check_aspect(image)
    return upright(image).convert("RGB")
