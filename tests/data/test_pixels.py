"""Images reach the model as a person sees them: EXIF rotation applied, 16-bit scaled, in every decoder."""

import numpy as np
from PIL import Image

from clipforge.data.image_folder import decode
from clipforge.data.pixels import upright_rgb
from clipforge.stages.finetune_data import load_image


def sideways_photo(path):
    """A 40 wide x 80 high scene (red top half) stored as 80x40 pixels with orientation 6, as phones do."""
    upright = np.zeros((80, 40, 3), np.uint8)
    upright[:40] = (255, 0, 0)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # orientation 6 undoes this
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, "JPEG", quality=95, exif=exif)
    return upright


def test_exif_orientation_is_applied_by_the_cache_and_the_trainer(tmp_path):
    upright = sideways_photo(tmp_path / "phone.jpg")
    cached, _ = decode(str(tmp_path), "phone.jpg")
    trained = np.asarray(load_image(str(tmp_path / "phone.jpg")))
    for pixels in (cached, trained):
        assert pixels.shape == upright.shape
        assert np.abs(pixels.astype(int) - upright).mean() < 8  # JPEG noise only


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    gradient = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    image = Image.fromarray(gradient)
    assert image.mode == "I;16"
    image.save(tmp_path / "scan.png")
    pixels, _ = decode(str(tmp_path), "scan.png")
    expected = (gradient // 257).astype(np.uint8)
    assert np.array_equal(pixels[..., 0], expected)
    assert np.array_equal(np.asarray(load_image(str(tmp_path / "scan.png")))[..., 1], expected)


def test_32_bit_greyscale_is_scaled_only_when_it_holds_16_bit_values():
    """Older Pillows open 16-bit PNGs as mode I; mode I images holding 8-bit values stay as they are."""
    wide = Image.fromarray(np.array([[0, 65535]], np.int32))
    narrow = Image.fromarray(np.array([[0, 200]], np.int32))
    assert wide.mode == narrow.mode == "I"
    assert np.asarray(upright_rgb(wide))[0, :, 0].tolist() == [0, 255]
    assert np.asarray(upright_rgb(narrow))[0, :, 0].tolist() == [0, 200]


def test_an_image_thinner_than_1_to_100_is_refused_before_it_is_resized(tmp_path, capsys):
    """A 140-byte 20000x1 PNG was resized to 224 x 4,480,000 px (3 GB) by the cache, the trainer and the search
    page's upload alike. Each now names it in one line; a 100:1 strip (a long receipt) still reads."""
    import pytest

    from clipforge.data.image_folder import image_problem
    from clipforge.errors import UserError
    from clipforge.stages.finetune_data import CaptionedImages

    Image.new("RGB", (20000, 1), "white").save(tmp_path / "strip.png")
    Image.new("RGB", (100, 1), "white").save(tmp_path / "receipt.png")
    said = "is 20000x1 px, thinner than 1:100"
    with pytest.raises(UserError, match=rf"^image {tmp_path}/strip.png {said}: .*; crop it; --skip-bad"):
        decode(str(tmp_path), "strip.png")
    assert image_problem(str(tmp_path / "strip.png")).startswith(said)  # `captions prepare`, the caption page
    assert decode(str(tmp_path), "receipt.png")[0].shape == (1, 100, 3)

    class Rows:
        uris, filepaths, source = [str(tmp_path / "strip.png")], ["strip.png"], "train.csv"

    bad = CaptionedImages(Rows(), None, None, seed=0)[(0, 0)]
    assert bad.why.startswith(said)


def test_a_200_megapixel_phone_photo_is_no_decompression_bomb(tmp_path):
    """Pillow refused 16320x12240 (a 200 MP sensor) as a bomb: the cache, prepare and the trainer all failed."""
    import io
    import struct
    import zlib

    import pytest

    import clipforge.data.pixels  # noqa: F401  (sets Pillow's limit wherever clipforge decodes)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def header(width: int, height: int) -> io.BytesIO:  # the chunks Image.open reads, not the pixels
        return io.BytesIO(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                          + chunk(b"IDAT", zlib.compress(b"")))

    with Image.open(header(16320, 12240)) as photo:
        assert photo.size == (16320, 12240)
    with pytest.raises(Image.DecompressionBombError):  # the guard stays, further out
        Image.open(header(30000, 20000))
