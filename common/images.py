"""Image bytes -> RGB uint8 array at the model's input size, with a coded error for every way it can fail."""

from __future__ import annotations

import io
import os
import struct
import warnings
from enum import StrEnum
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from common.errors import ErrorCode

ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
# File names taken for images when a folder is scanned (the formats above, by their usual suffixes).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 50_000_000
# What Pillow's plugins raise on damaged data besides OSError (a TIFF whose next frame has no size: TypeError, ...).
# Named, not `Exception`: a task's soft time limit or a bug of ours must not pass for a corrupt image.
DAMAGED_DATA = (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError, struct.error,
                ZeroDivisionError, OverflowError)  # fmt: skip
WHITE = (255, 255, 255)
REDUCING_GAP = 2  # a large image is shrunk in whole steps to at least twice the size it is finally resized to
TURNED = range(2, 9)  # EXIF orientations that need a flip or a turn (1: upright already)
BAND_PIXELS = 1_000_000  # pixels converted at once while shrinking one (a few MB whatever the mode)


class ResizePolicy(StrEnum):
    """How an image of any aspect ratio becomes the model's square input."""

    STRETCH = "stretch"  # the tutorial's way: ignore the aspect ratio
    PAD = "pad"  # keep the aspect ratio, pad to square on white


class ImageError(ValueError):
    """An image that can't be used, with a stable machine-readable code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def check_size(data: bytes, max_bytes: int) -> bytes:
    """Refuse an upload over the byte cap before anything decodes it."""
    if len(data) > max_bytes:
        raise ImageError(ErrorCode.TOO_LARGE, f"the upload is {len(data):,} bytes, over the cap of {max_bytes:,}")
    return data


def read_image_file(path: Path, max_bytes: int) -> bytes:
    """A catalogue image's bytes, refused by its size before any is read (a sparse 4 GiB file costs nothing to make)."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        data = file.read(max_bytes + 1) if size <= max_bytes else b""  # one byte more: it may have grown since
    if max(size, len(data)) > max_bytes:
        raise ImageError(
            ErrorCode.TOO_LARGE,
            f"the file is {max(size, len(data)):,} bytes, over LOOKALIKE_MAX_IMAGE_BYTES ({max_bytes:,}); "
            "raise it to read larger files",
        )
    return data


def decode_image(
    data: bytes,
    size: tuple[int, int],
    policy: ResizePolicy | str = ResizePolicy.STRETCH,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode `data` to a `(height, width, 3)` uint8 RGB array of `size` = (width, height)."""
    policy = ResizePolicy(policy)
    rgb = load_rgb(data, max(size), max_pixels, keep_aspect=policy is ResizePolicy.PAD)
    if policy is ResizePolicy.PAD:
        rgb = ImageOps.pad(rgb, size, method=Image.Resampling.BILINEAR, color=WHITE)
    else:
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def thumbnail_jpeg(data: bytes, side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """A JPEG of the upright image that fits in `side` x `side`, for pages (query previews, catalogue items)."""
    rgb = load_rgb(data, side, max_pixels)
    rgb.thumbnail((side, side), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=85)
    return out.getvalue()


def load_rgb(data: bytes, side: int, max_pixels: int = DEFAULT_MAX_PIXELS, keep_aspect: bool = True) -> Image.Image:
    """The upright RGB image, with at least `side` pixels on each side where the image has them: on its longer side
    only when it will be resized keeping its aspect ratio (`keep_aspect`), else on both."""
    image = open_image(data, max_pixels)
    try:
        if image.format in ("JPEG", "MPO"):
            # JPEG can decode at 1/2, 1/4 or 1/8 scale for almost nothing; ask for at least the target size
            # on both sides so that EXIF rotation and padding still have enough pixels.
            image.draft("RGB", (side, side))
        orientation = image.getexif().get(ExifTags.Base.Orientation)
        rgb = _reduced_rgb(image, _reduction(image.size, side, keep_aspect))
        if orientation not in TURNED:
            return rgb
        # Turned upright once reduced (turning the decoded image would copy it whole), by Pillow's own table
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        rgb.info["exif"] = exif.tobytes()
        return ImageOps.exif_transpose(rgb)
    except MemoryError as error:
        raise ImageError(ErrorCode.TOO_LARGE, "the image needs more memory to decode than there is") from error
    except DAMAGED_DATA as error:
        raise unreadable(error) from error


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Identify an image from its header (no pixels decoded yet), refusing what decoding would refuse up front."""
    if not data:
        raise ImageError(ErrorCode.EMPTY, "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(ErrorCode.TOO_LARGE, f"the image is too large: {error}") from error
    except Image.UnidentifiedImageError as error:
        raise ImageError(ErrorCode.NOT_AN_IMAGE, "the file is not an image in a known format") from error
    except DAMAGED_DATA as error:
        raise unreadable(error) from error
    if image.format not in ALLOWED_FORMATS:
        allowed = ", ".join(sorted(ALLOWED_FORMATS - {"MPO"}))
        raise ImageError(ErrorCode.UNSUPPORTED_FORMAT, f"{image.format} images are not accepted (allowed: {allowed})")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(ErrorCode.CORRUPT, f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            ErrorCode.TOO_LARGE, f"the image is {width}x{height} pixels, over the cap of {max_pixels:,} pixels"
        )
    try:
        if getattr(image, "n_frames", 1) > 1:  # counting frames reads every frame's header
            image.seek(0)
    except DAMAGED_DATA as error:
        raise unreadable(error) from error
    return image


def unreadable(error: Exception) -> ImageError:
    """Pillow says "truncated" in several ways (header or pixel data); everything else is corrupt data."""
    if "truncat" in str(error).lower():
        return ImageError(ErrorCode.TRUNCATED, "the image data ends early (truncated file)")
    return ImageError(ErrorCode.CORRUPT, f"the image data can't be decoded: {error}")


def _reduction(size: tuple[int, int], side: int, keep_aspect: bool) -> tuple[int, int]:
    """Whole factors to shrink (width, height) by that leave REDUCING_GAP x `side` pixels for the final resize, so
    that it stays as fair as resizing the whole image (Pillow's `reducing_gap` reasoning)."""
    if keep_aspect:
        factor = max(size) // (REDUCING_GAP * side)
        return max(1, factor), max(1, factor)
    width, height = (max(1, length // (REDUCING_GAP * side)) for length in size)
    return width, height


def _reduced_rgb(image: Image.Image, factors: tuple[int, int]) -> Image.Image:
    """The image shrunk by `factors` (box averages) and converted to RGB a band of rows at a time: the decoded image
    in its own mode is the only full-size copy (converting 16-bit, palette or RGBA images whole makes several)."""
    if factors == (1, 1):
        return _to_rgb(image)
    width, height = image.size
    factor_x, factor_y = factors
    rows = factor_y * max(1, BAND_PIXELS // (width * factor_y))  # whole boxes: each band reduces on its own
    reduced = Image.new("RGB", (-(-width // factor_x), -(-height // factor_y)))
    for top in range(0, height, rows):
        band = _to_rgb(image.crop((0, top, width, min(height, top + rows))))
        reduced.paste(band.reduce(factors), (0, top // factor_y))
    return reduced


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white, high bit depths scaled to 8 bits."""
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_depth_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    # Modes "I;16*" and "I" hold 16-bit samples (Pillow opens 16-bit PNG and TIFF this way); "F" is taken as 0..255.
    scale = 1.0 if image.mode == "F" else 255.0 / 65535.0
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
