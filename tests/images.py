"""Images made by the tests: any Pillow image encoded, and a set of uploads each refused with its own code."""

from __future__ import annotations

import io

import pytest
from PIL import Image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


BAD_IMAGES = [
    pytest.param(b"", "empty", id="empty"),
    pytest.param(b"just some text, not pixels", "not_an_image", id="text"),
    pytest.param(encode(Image.new("RGB", (64, 64)), "JPEG")[:300], "truncated", id="truncated-jpeg"),
    pytest.param(encode(Image.new("RGB", (64, 64)), "PPM"), "unsupported_format", id="ppm"),
    pytest.param(encode(Image.new("1", (20000, 20000)), "PNG"), "too_large", id="20000x20000-png"),
]
