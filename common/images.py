"""Image bytes -> RGB uint8 array at the model's input size, with a coded error for every way it can fail."""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageDraw, ImageOps

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
QUARTER_TURNED = range(5, 9)  # those that swap width and height
BAND_PIXELS = 1_000_000  # pixels converted at once while shrinking one (a few MB whatever the mode)
MIN_CROP_SIDE = 32  # pixels on each side of a crop box: less holds too little of a product to embed
OUTLINE = (47, 111, 237)  # the crop box drawn on a query's preview: the pages' accent colour
Box = tuple[int, int, int, int]  # left, top, right, bottom: Pillow's boxes


class Crop(NamedTuple):
    """A part of an image to search, in pixels of the upright image (as it is shown: after its EXIF orientation)."""

    x: int
    y: int
    width: int
    height: int

    def as_dict(self) -> dict[str, int]:
        return self._asdict()


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
    crop: Crop | None = None,
) -> np.ndarray:
    """Decode `data` (or the part of it `crop` names) to a `(height, width, 3)` uint8 RGB array of `size` =
    (width, height)."""
    policy = ResizePolicy(policy)
    rgb = load_rgb(data, max(size), max_pixels, keep_aspect=policy is ResizePolicy.PAD, crop=crop)
    if policy is ResizePolicy.PAD:
        rgb = ImageOps.pad(rgb, size, method=Image.Resampling.BILINEAR, color=WHITE)
    else:
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def thumbnail_jpeg(data: bytes, side: int, max_pixels: int = DEFAULT_MAX_PIXELS, outline: Crop | None = None) -> bytes:
    """A JPEG of the upright image that fits in `side` x `side`, for pages (query previews, catalogue items), with
    the box `outline` drawn on it (refused as `load_rgb` refuses a crop)."""
    image = open_image(data, max_pixels)
    upright = _upright_size(image)
    if outline:
        _check_crop(outline, upright)
    rgb = _upright_rgb(image, side, keep_aspect=True)
    rgb.thumbnail((side, side), Image.Resampling.BILINEAR)
    if outline:
        scale_x, scale_y = rgb.width / upright[0], rgb.height / upright[1]
        left, top = round(outline.x * scale_x), round(outline.y * scale_y)
        right = max(left, round((outline.x + outline.width) * scale_x) - 1)
        bottom = max(top, round((outline.y + outline.height) * scale_y) - 1)
        ImageDraw.Draw(rgb).rectangle((left, top, right, bottom), outline=OUTLINE, width=max(2, side // 100))
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=85)
    return out.getvalue()


def load_rgb(
    data: bytes,
    side: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_aspect: bool = True,
    crop: Crop | None = None,
) -> Image.Image:
    """The upright RGB image, or the part of it `crop` names, with at least `side` pixels on each side where it has
    them: on its longer side only when it will be resized keeping its aspect ratio (`keep_aspect`), else on both. A
    crop box that is too small or reaches outside the image is refused (`bad_parameter`)."""
    image = open_image(data, max_pixels)
    if crop:
        _check_crop(crop, _upright_size(image))
    return _upright_rgb(image, side, keep_aspect, crop)


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is shown: turned by its EXIF orientation."""
    width, height = image.size
    return (height, width) if _orientation(image) in QUARTER_TURNED else (width, height)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, 1 (upright) when there is none; reading it reads a PNG's data, which may be damaged."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation)
    except DAMAGED_DATA as error:
        raise unreadable(error) from error
    return orientation if orientation in TURNED else 1


def _check_crop(crop: Crop, size: tuple[int, int]) -> None:
    width, height = size
    if crop.width < MIN_CROP_SIDE or crop.height < MIN_CROP_SIDE:
        raise ImageError(
            ErrorCode.BAD_PARAMETER,
            f"the crop box is {crop.width}x{crop.height} pixels: too small to search; "
            f"make it at least {MIN_CROP_SIDE}x{MIN_CROP_SIDE}",
        )
    if min(crop.x, crop.y) < 0 or crop.x + crop.width > width or crop.y + crop.height > height:
        raise ImageError(
            ErrorCode.BAD_PARAMETER,
            f"the crop box {crop.x},{crop.y},{crop.width},{crop.height} reaches outside the image, which is "
            f"{width}x{height} pixels as shown (after its EXIF orientation)",
        )


def _upright_rgb(image: Image.Image, side: int, keep_aspect: bool, crop: Crop | None = None) -> Image.Image:
    """`load_rgb` of an opened image, the crop checked already."""
    orientation = _orientation(image)
    try:
        box = _stored_box(crop, image.size, orientation) if crop else (0, 0, *image.size)
        if image.format in ("JPEG", "MPO"):
            # JPEG can decode at 1/2, 1/4 or 1/8 scale for almost nothing; ask for at least the target size on
            # both sides of the box so that EXIF rotation and padding still have enough pixels.
            stored = image.size
            image.draft("RGB", _draft_request(stored, box, side))
            box = _scaled_box(box, stored, image.size)
        rgb = _reduced_rgb(image, box, _reduction(_box_size(box), side, keep_aspect))
        if orientation == 1:
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


def _stored_box(crop: Crop, stored: tuple[int, int], orientation: int) -> Box:
    """The crop (in pixels of the upright image) as a box in the image as it is stored, before its EXIF turn."""
    width, height = stored
    left, top, right, bottom = crop.x, crop.y, crop.x + crop.width, crop.y + crop.height
    return {
        1: (left, top, right, bottom),
        2: (width - right, top, width - left, bottom),  # mirrored
        3: (width - right, height - bottom, width - left, height - top),  # turned 180
        4: (left, height - bottom, right, height - top),  # flipped
        5: (top, left, bottom, right),  # transposed
        6: (top, height - right, bottom, height - left),  # to be turned 90 clockwise
        7: (width - bottom, height - right, width - top, height - left),  # transversed
        8: (width - bottom, left, width - top, right),  # to be turned 90 counter-clockwise
    }[orientation]


def _box_size(box: Box) -> tuple[int, int]:
    left, top, right, bottom = box
    return right - left, bottom - top


def _draft_request(stored: tuple[int, int], box: Box, side: int) -> tuple[int, int]:
    """The image size to ask JPEG's draft mode for, so that `box` keeps at least `side` pixels on each side."""
    box_width, box_height = _box_size(box)
    return -(-side * stored[0] // box_width), -(-side * stored[1] // box_height)


def _scaled_box(box: Box, before: tuple[int, int], after: tuple[int, int]) -> Box:
    """`box` in an image of size `before`, in the same image decoded at size `after` (covering at least as much)."""
    left, top, right, bottom = box
    scale_x, scale_y = after[0] / before[0], after[1] / before[1]
    left, top = math.floor(left * scale_x), math.floor(top * scale_y)
    right, bottom = min(after[0], math.ceil(right * scale_x)), min(after[1], math.ceil(bottom * scale_y))
    return left, top, max(right, left + 1), max(bottom, top + 1)


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


def _reduced_rgb(image: Image.Image, box: Box, factors: tuple[int, int]) -> Image.Image:
    """The `box` of the image shrunk by `factors` (box averages) and converted to RGB a band of rows at a time: the
    decoded image in its own mode is the only full-size copy (converting 16-bit, palette or RGBA images whole makes
    several)."""
    if box == (0, 0, *image.size) and factors == (1, 1):
        return _to_rgb(image)
    left, top, right, bottom = box
    width, height = _box_size(box)
    factor_x, factor_y = factors
    rows = factor_y * max(1, BAND_PIXELS // (width * factor_y))  # whole boxes: each band reduces on its own
    reduced = Image.new("RGB", (-(-width // factor_x), -(-height // factor_y)))
    for offset in range(0, height, rows):
        band = _to_rgb(image.crop((left, top + offset, right, min(bottom, top + offset + rows))))
        reduced.paste(band.reduce(factors), (0, offset // factor_y))
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
