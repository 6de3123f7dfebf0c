"""Decoding as the worker will: any mode and orientation to RGB at the model's size, a coded error otherwise."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from common.images import MIN_CROP_SIDE, Crop, ImageError, ResizePolicy, decode_image, thumbnail_jpeg
from tests.conftest import BENCH
from tests.images import BAD_IMAGES, ODD_IMAGES, encode

SIZE = (32, 32)


def test_jpeg_is_decoded_to_rgb_at_the_model_size():
    data = encode(Image.new("RGB", (1800, 2400), (200, 30, 40)), "JPEG", quality=95)
    pixels = decode_image(data, SIZE)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - (200, 30, 40)).max() <= 3


@pytest.mark.parametrize("scale", [1, 50], ids=["small", "shrunk-before-conversion"])
@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_transparency_is_composited_on_white(mode, scale):
    rgba = Image.new("RGBA", (40 * scale, 40 * scale), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20 * scale, 40 * scale))
    image = rgba if mode == "RGBA" else rgba.quantize(2)
    if mode == "P":
        image.info["transparency"] = image.getpixel((39 * scale, 0))
    pixels = decode_image(encode(image, "PNG"), (40, 40))
    assert tuple(pixels[20, 5]) == (0, 0, 255)
    assert tuple(pixels[20, 35]) == (255, 255, 255)


@pytest.mark.parametrize(("fmt", "scale"), [("JPEG", 1), ("JPEG", 40), ("PNG", 40)])
def test_exif_orientation_is_applied(fmt, scale):
    image = Image.new("RGB", (60 * scale, 30 * scale), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 30 * scale, 30 * scale))  # white on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    pixels = decode_image(encode(image, fmt, exif=exif.tobytes()), (30, 60))
    assert pixels[:25].mean() > 200 and pixels[35:].mean() < 50  # the left half is now on top


# Pillow's turn for each EXIF orientation undone: the image stored so that the orientation shows it upright.
STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}  # fmt: skip


def stored_with_orientation(upright: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright.transpose(STORED_AS[orientation]) if orientation in STORED_AS else upright
    return encode(stored, "PNG", exif=exif.tobytes())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_crop_is_counted_in_pixels_of_the_image_as_shown_whatever_its_exif_orientation(orientation):
    upright = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (90, 140, 3), dtype=np.uint8))
    data = stored_with_orientation(upright, orientation)
    pixels = decode_image(data, (50, 40), crop=Crop(17, 9, 50, 40))
    assert np.array_equal(pixels, np.asarray(upright.crop((17, 9, 67, 49))))
    with pytest.raises(ImageError, match="reaches outside the image, which is 140x90 pixels as shown"):
        decode_image(data, (50, 40), crop=Crop(100, 0, 41, 40))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_crop_of_a_large_photo_keeps_the_detail_that_shrinking_the_whole_photo_first_would_lose(fmt):
    photo = Image.new("RGB", (4000, 3000), (255, 255, 255))
    for left in range(1000, 1400, 32):  # 16-pixel black stripes in a 400 x 400 box: grey at the whole photo's scale
        photo.paste((0, 0, 0), (left, 1000, left + 16, 1400))
    pixels = decode_image(encode(photo, fmt), (50, 50), crop=Crop(1000, 1000, 400, 400))
    assert pixels.std() > 80 and 0.3 < (pixels < 128).mean() < 0.7, "stripes, not a grey blur"


def test_a_crop_box_smaller_than_the_minimum_is_refused_naming_the_minimum():
    data = encode(Image.new("RGB", (200, 100)), "PNG")
    with pytest.raises(ImageError, match=f"at least {MIN_CROP_SIDE}x{MIN_CROP_SIDE}") as refused:
        decode_image(data, SIZE, crop=Crop(0, 0, MIN_CROP_SIDE - 1, 60))
    assert refused.value.code == "bad_parameter"
    assert decode_image(data, SIZE, crop=Crop(0, 0, MIN_CROP_SIDE, MIN_CROP_SIDE)).shape == (32, 32, 3)


def test_a_preview_shows_the_crop_box_it_searched():
    data = encode(Image.new("RGB", (400, 200), (255, 255, 255)), "PNG")
    preview = np.asarray(Image.open(io.BytesIO(thumbnail_jpeg(data, 100, outline=Crop(200, 0, 200, 200)))))
    assert preview.shape == (50, 100, 3)
    assert preview[25, 51][2] > 180 and preview[25, 51][0] < 120, "the box's left edge, in the accent blue"
    assert preview[25, 75].min() > 240 and preview[25, 25].min() > 240, "inside and outside the box: the photo"


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "LA", "1", "I;16"])
def test_every_mode_becomes_rgb(mode):
    fmt = "JPEG" if mode in ("CMYK", "L") else ("TIFF" if mode == "I;16" else "PNG")
    image = Image.new(mode, (20, 10))
    assert decode_image(encode(image, fmt), SIZE).shape == (32, 32, 3)


@pytest.mark.parametrize("side", [10, 1000])
def test_sixteen_bit_samples_are_scaled_not_clipped(side):
    gray = Image.fromarray(np.full((side, side), 32896, dtype=np.uint16))  # half of 65535
    assert decode_image(encode(gray, "PNG"), SIZE)[0, 0, 0] == 128


def test_the_first_frame_of_an_animation_is_used():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert tuple(decode_image(data, SIZE)[8, 8]) == (255, 0, 0)


def test_pad_keeps_the_aspect_ratio_on_white():
    wide = encode(Image.new("RGB", (64, 16), (0, 0, 0)), "PNG")
    padded = decode_image(wide, SIZE, ResizePolicy.PAD)
    assert tuple(padded[0, 16]) == (255, 255, 255) and tuple(padded[16, 16]) == (0, 0, 0)
    assert decode_image(wide, SIZE, "stretch")[0, 16].max() == 0


@pytest.mark.parametrize(("data", "code"), BAD_IMAGES)
def test_bad_input_gets_a_coded_error(data, code):
    with pytest.raises(ImageError) as refused:
        decode_image(data, SIZE)
    assert refused.value.code == code
    assert refused.value.as_dict() == {"code": code, "message": refused.value.message}


@pytest.mark.parametrize("data", ODD_IMAGES)
@pytest.mark.parametrize("policy", list(ResizePolicy))
def test_odd_but_genuine_images_are_decoded(data, policy):
    assert decode_image(data, SIZE, policy).shape == (32, 32, 3)


def test_a_large_image_of_any_mode_is_decoded_with_little_more_memory_than_its_pixels(tmp_path):
    """16-bit, RGBA and palette images went through several full-size converted copies (5 to 21 times their decoded
    size); now they are shrunk a band of rows at a time, and the decoded image itself is most of the peak."""
    report = tmp_path / "memory.json"
    subprocess.run([sys.executable, BENCH / "decode_memory.py", "--megapixels", "16", "--json", report],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(BENCH.parent)})  # fmt: skip
    rows = json.loads(report.read_text())
    assert len(rows) == 4 and all(row["file_bytes"] < 200_000 for row in rows)
    for row in rows:  # before: 16-bit grey 13x, RGBA 5x, palette 21x its decoded size, at 50 MP
        assert row["peak_growth"] < row["decoded"] + 64 * 2**20, row
