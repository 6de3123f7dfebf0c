"""A product sent on its own (`PUT /api/items/<id>`, `lookalike put`): the rules its photos and metadata keep, and
where its photos are kept.

Its photos are kept by content, `DATA_DIR/uploads/photos/<sha256[:2]>/<sha256><suffix>` (area "uploads"), each
written atomically: the same photo sent twice is one file, written once, so the same request twice writes nothing
new and the product's checksums (its photos' sha256s and its metadata's) do not change. `worker.leftovers` removes
only upload folders named by 32 hex digits: `photos/` stays, since indexed products point at it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from common.errors import UsageError
from common.files import atomic_write_bytes
from common.images import check_size, load_rgb, open_image
from common.settings import Settings

PHOTOS_AREA, PHOTOS_FOLDER = "uploads", "photos"
PHOTO_MODE = 0o644  # read by every worker, whichever user it runs as
FORMAT_SUFFIXES = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
                   "TIFF": ".tif"}  # fmt: skip
CHECK_SIDE = 64  # a photo is decoded whole to be checked, at a small size (the JPEG draft scale)
MAX_METADATA_BYTES = 64 * 1024  # the metadata's JSON text
MAX_FIELDS = 200
MAX_FIELD_NAME = 200  # as a filter's FIELD (common.filters)
RESERVED_FIELDS = ("id", "image")  # the product's id is its URL's; `image` is its main photo, set by the load


class ProductError(UsageError):
    """A product that can't be taken as sent (no photo, too many, metadata that is no object of fields): the web
    answers 400 with this sentence."""


def check_photo_count(count: int, settings: Settings) -> None:
    if count < 1:
        raise ProductError(f"a product needs at least one photo (at most {settings.max_photos}), the main one first")
    if count > settings.max_photos:
        raise ProductError(
            f"{count} photos: a product has at most {settings.max_photos} (LOOKALIKE_MAX_PHOTOS), the main one first"
        )


def photo_suffix(data: bytes, max_pixels: int) -> str:
    """The file suffix of the photo's format, from its header (refused as `common.images.open_image` refuses)."""
    return FORMAT_SUFFIXES[open_image(data, max_pixels).format]


def check_photo(data: bytes, max_bytes: int, max_pixels: int) -> str:
    """A photo checked as an upload is, before anything is kept or queued: its size, its pixels, and a decode of all
    of it (an ImageError with its code); its file suffix."""
    check_size(data, max_bytes)
    suffix = photo_suffix(data, max_pixels)
    load_rgb(data, CHECK_SIDE, max_pixels)
    return suffix


def keep_photo(settings: Settings, data: bytes) -> str:
    """Keep a photo by its content (unless it is kept already): its path in the "uploads" area. Its size and header
    are checked (ImageError); the full decode is the caller's (`check_photo`)."""
    check_size(data, settings.max_upload)
    suffix = photo_suffix(data, settings.max_pixels)
    digest = hashlib.sha256(data).hexdigest()
    relative = f"{PHOTOS_FOLDER}/{digest[:2]}/{digest}{suffix}"
    path = settings.uploads_dir / relative
    if not (path.is_file() and path.stat().st_size == len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data, PHOTO_MODE)
    return relative


def parse_metadata(text: str) -> dict[str, str]:
    """The metadata's JSON text (`{"field": "value", ...}`) -> its fields, as `check_metadata` takes them."""
    if len(text.encode(errors="surrogatepass")) > MAX_METADATA_BYTES:
        raise ProductError(f"the metadata is over {MAX_METADATA_BYTES:,} bytes of JSON")
    try:
        fields = json.loads(text, object_pairs_hook=_no_repeats, parse_constant=_no_constant)
    except ValueError as error:  # json's own errors, and ours above
        raise ProductError(f"the metadata is not valid JSON: {error}") from None
    if not isinstance(fields, dict):
        raise ProductError('the metadata must be a JSON object of fields, like {"gender": "Women"}')
    return check_metadata(fields)


def check_metadata(fields: Mapping[str, Any]) -> dict[str, str]:
    """A product's metadata as a load keeps it: field -> text, names and values stripped, empty values left out (as
    a CSV's empty cells are). Numbers and true/false are taken as their JSON text; lists, objects and non-finite
    numbers are refused, and so are the fields a load sets itself (`id`, `image`)."""
    if len(fields) > MAX_FIELDS:
        raise ProductError(f"the metadata has {len(fields)} fields; at most {MAX_FIELDS}")
    kept: dict[str, str] = {}
    for raw_name, value in fields.items():
        name = str(raw_name).strip()
        shown = f"{name[:60]!r}"
        if not name or len(name) > MAX_FIELD_NAME or "=" in name or not name.isprintable():
            raise ProductError(
                f"metadata field {shown}: a name is 1 to {MAX_FIELD_NAME} printable characters, without '='"
            )
        if name in RESERVED_FIELDS:
            raise ProductError(f"metadata field {shown} is set by lookalike: the id is the URL's, image the main photo")
        if name in kept:
            raise ProductError(f"metadata field {shown} is given twice")
        text = _text(name, value)
        if text:
            kept[name] = text
    return kept


def _text(name: str, value: Any) -> str:
    if value is None or isinstance(value, str):
        return (value or "").strip()
    if isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
        return json.dumps(value)
    raise ProductError(f"metadata field {name[:60]!r} must be text (or a number, true or false), not {_kind(value)}")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", tuple: "a list"}.get(type(value), f"a {type(value).__name__}")


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in pairs:
        if name in fields:
            raise ValueError(f"field {name[:60]!r} is given twice")
        fields[name] = value
    return fields


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")
