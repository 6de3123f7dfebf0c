"""Images made by the tests: any Pillow image encoded, and a set of uploads each refused with its own code."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def side_by_side(*photos: Path) -> bytes:
    """One PNG of the photos in a row (a shopper's photo that shows several products), pixels unchanged."""
    images = [Image.open(photo).convert("RGB") for photo in photos]
    row = Image.new("RGB", (sum(image.width for image in images), max(image.height for image in images)), "white")
    for index, image in enumerate(images):
        row.paste(image, (sum(other.width for other in images[:index]), 0))
    return encode(row, "PNG")


def sixteen_bit_gray() -> Image.Image:
    return Image.fromarray(np.linspace(0, 65535, 64 * 64, dtype=np.uint16).reshape(64, 64))


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated: display needs a 90 degree counter-clockwise turn
    return encode(Image.new("RGB", (60, 30), (10, 120, 200)), "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def png_bomb() -> bytes:
    """A 180-byte PNG whose header promises 100,000 x 100,000 pixels (10 billion, 30 GB decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    body = zlib.compress(bytes(100_000))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def gif_bomb() -> bytes:
    """A tiny GIF whose screen and frame claim 65,535 x 65,535 pixels."""
    data = bytearray(encode(Image.new("P", (16, 16)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)
    frame = data.index(b"\x2c", 13)  # the image descriptor after the header and colour table
    data[frame + 5 : frame + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def tiff_with_a_broken_second_frame() -> bytes:
    """Found by the decoder fuzz: the first frame is fine, the next-frame pointer lands on pixel data."""
    data = bytearray(encode(Image.new("RGB", (24, 16)), "TIFF"))
    entries = struct.unpack_from("<H", data, 8)[0]
    tags = {struct.unpack_from("<H", data, 10 + 12 * n)[0]: struct.unpack_from("<I", data, 18 + 12 * n)[0]
            for n in range(entries)}  # fmt: skip
    struct.pack_into("<I", data, 10 + 12 * entries, tags[273])  # 273: where the pixels start
    return bytes(data)


_NOISE = Image.effect_noise((64, 64), 64).convert("RGB")
_PNG, _JPEG = encode(_NOISE, "PNG"), encode(_NOISE, "JPEG")
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><script>alert(1)</script></svg>'

# Files no image search may accept: each is refused with its own code, never a crash.
BAD_IMAGES = [
    pytest.param(b"", "empty", id="empty"),
    pytest.param(b"just some text, not pixels", "not_an_image", id="text"),
    pytest.param(_JPEG[: len(_JPEG) // 2], "truncated", id="truncated-jpeg"),
    pytest.param(_PNG[: len(_PNG) // 2], "truncated", id="truncated-png"),
    pytest.param(encode(Image.new("RGB", (64, 64)), "PPM"), "unsupported_format", id="ppm"),
    pytest.param(encode(Image.new("1", (20000, 20000)), "PNG"), "too_large", id="20000x20000-png"),
    pytest.param(png_bomb(), "too_large", id="png-bomb"),
    pytest.param(gif_bomb(), "too_large", id="gif-bomb"),
    pytest.param(SVG, "not_an_image", id="svg"),
    pytest.param(tiff_with_a_broken_second_frame(), "corrupt", id="tiff-broken-frame"),
    pytest.param(b"GIF89a/*" + bytes(20) + b"*/=1;alert(document.cookie)", "not_an_image", id="gif-js-polyglot"),
]

# Odd but genuine images: each is decoded and searched like any photo.
ODD_IMAGES = [
    pytest.param(encode(Image.new("RGB", (1, 1), (200, 0, 0)), "PNG"), id="1x1"),
    pytest.param(encode(Image.new("RGB", (30000, 10), (0, 200, 0)), "PNG"), id="30000x10"),
    pytest.param(encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG"), id="cmyk-jpeg"),
    pytest.param(encode(sixteen_bit_gray(), "PNG"), id="16-bit-png"),
    pytest.param(animated_gif(), id="animated-gif"),
    pytest.param(exif_rotated(), id="exif-rotated-jpeg"),
    pytest.param(_PNG + b"<html><script>alert(1)</script></html>", id="png-html-polyglot"),
]
