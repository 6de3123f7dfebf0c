"""One embedding batch: read each item's image, skip what the index already has, decode, embed together."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.areas import CatalogError, resolve_reference
from common.errors import ErrorCode
from common.images import ImageError, decode_image, read_image_file
from common.model import EmbeddingModel
from common.settings import Settings
from common.vectors import encode_vector
from protocol.jobs import item_error
from worker.catalog import PhotoFile, photos_of
from worker.index import photos_checksum


@dataclass
class BatchOutcome:
    changes: list[dict[str, Any]] = field(default_factory=list)  # upserts for the index owner
    unchanged: list[str] = field(default_factory=list)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)


def embed_items(
    items: list[dict[str, Any]],
    model: EmbeddingModel,
    settings: Settings,
    known: Mapping[str, tuple[str, str]],
) -> BatchOutcome:
    """Embed catalogue products, every photo of each; `known` maps id -> (photos' sha256s, metadata sha256) of what
    the index holds. A product whose photo can't be read or decoded fails whole, naming that photo: the index keeps
    the product as it was."""
    outcome = BatchOutcome()
    pending: list[tuple[dict[str, Any], list[np.ndarray]]] = []
    for item in items:
        item_id, metadata = item["id"], item.get("metadata") or {}
        try:
            photos = _read_photos(settings, photos_of(item))
        except _PhotoRefused as refused:
            outcome.errors[item_id] = refused.error
            continue
        digests = photos_checksum(digest for _, digest, _ in photos)
        metadata_sha256 = metadata_checksum(metadata)
        change = {
            "op": "upsert",
            "id": item_id,
            "model_sha256": model.sha256,  # the owner refuses vectors of any model but its index's
            "resize": settings.resize,
            "metadata": {**metadata, "image": photos[0][0].reference},
            "photos": [{"sha256": digest, "image": photo.reference} for photo, digest, _ in photos],
            "metadata_sha256": metadata_sha256,
        }
        previous = known.get(item_id)
        if previous == (digests, metadata_sha256):
            outcome.unchanged.append(item_id)
        elif previous is not None and previous[0] == digests:
            outcome.changes.append(change)  # the same photos: new metadata, the vectors stay
        else:
            try:
                pixels = [_decoded(photo, data, model, settings, len(photos)) for photo, _, data in photos]
            except _PhotoRefused as refused:
                outcome.errors[item_id] = refused.error
                continue
            pending.append((change, pixels))
    if pending:
        vectors = model.embed(np.stack([pixels for _, photo_pixels in pending for pixels in photo_pixels]))
        first = 0
        for change, photo_pixels in pending:
            rows = vectors[first : first + len(photo_pixels)]
            first += len(photo_pixels)
            outcome.changes.append({**change, "vectors": [encode_vector(vector) for vector in rows]})
    return outcome


class _PhotoRefused(Exception):
    def __init__(self, error: dict[str, str]) -> None:
        self.error = error


def _decoded(photo: PhotoFile, data: bytes, model: EmbeddingModel, settings: Settings, photos: int) -> np.ndarray:
    try:
        return decode_image(data, model.contract.size, settings.resize, settings.max_pixels)
    except ImageError as error:
        raise _PhotoRefused(_naming(photo, error.as_dict(), photos)) from error


def _naming(photo: PhotoFile, error: dict[str, str], photos: int) -> dict[str, str]:
    """An image's error, saying which of the product's photos it is when it has several."""
    return {**error, "message": f"photo {photo.path}: {error['message']}"} if photos > 1 else error


def _read_photos(settings: Settings, photos: list[PhotoFile]) -> list[tuple[PhotoFile, str, bytes]]:
    """Each photo with its sha256 and bytes (a photo identical to an earlier one of the product left out)."""
    read, seen = [], set()
    for photo in photos:
        try:
            data = read_image_file(resolve_reference(settings, photo.area, photo.path), settings.max_image_bytes)
        except CatalogError as error:
            raise _PhotoRefused(item_error(ErrorCode.OUTSIDE_ROOT, str(error))) from error
        except ImageError as error:
            raise _PhotoRefused(_naming(photo, error.as_dict(), len(photos))) from error
        except OSError as error:
            reason = f"image {photo.path} can't be read: {error.strerror}"
            raise _PhotoRefused(item_error(ErrorCode.MISSING_FILE, reason)) from error
        digest = hashlib.sha256(data).hexdigest()
        if digest not in seen:
            seen.add(digest)
            read.append((photo, digest, data))
    if not read:
        raise _PhotoRefused(item_error(ErrorCode.MISSING_FILE, "the product names no photo"))
    return read


def metadata_checksum(metadata: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(metadata), sort_keys=True).encode()).hexdigest()
