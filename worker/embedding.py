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
    """Embed catalogue items; `known` maps id -> (image sha256, metadata sha256) of what the index holds."""
    outcome = BatchOutcome()
    pending: list[tuple[dict[str, Any], np.ndarray]] = []
    for item in items:
        item_id, metadata = item["id"], item.get("metadata") or {}
        try:
            data = read_image_file(resolve_reference(settings, item["area"], item["path"]), settings.max_image_bytes)
        except CatalogError as error:
            outcome.errors[item_id] = item_error(ErrorCode.OUTSIDE_ROOT, str(error))
            continue
        except ImageError as error:
            outcome.errors[item_id] = error.as_dict()
            continue
        except OSError as error:
            reason = f"image {item['path']} can't be read: {error.strerror}"
            outcome.errors[item_id] = item_error(ErrorCode.MISSING_FILE, reason)
            continue
        image_sha256 = hashlib.sha256(data).hexdigest()
        metadata_sha256 = metadata_checksum(metadata)
        change = {
            "op": "upsert",
            "id": item_id,
            "model_sha256": model.sha256,  # the owner refuses vectors of any model but its index's
            "resize": settings.resize,
            "metadata": {**metadata, "image": f"{item['area']}/{item['path']}"},
            "image_sha256": image_sha256,
            "metadata_sha256": metadata_sha256,
        }
        previous = known.get(item_id)
        if previous == (image_sha256, metadata_sha256):
            outcome.unchanged.append(item_id)
        elif previous is not None and previous[0] == image_sha256:
            outcome.changes.append(change)  # same image: new metadata, the vector stays
        else:
            try:
                pixels = decode_image(data, model.contract.size, settings.resize, settings.max_pixels)
            except ImageError as error:
                outcome.errors[item_id] = error.as_dict()
                continue
            pending.append((change, pixels))
    if pending:
        vectors = model.embed(np.stack([pixels for _, pixels in pending]))
        for (change, _), vector in zip(pending, vectors, strict=True):
            outcome.changes.append({**change, "vector": encode_vector(vector)})
    return outcome


def metadata_checksum(metadata: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(metadata), sort_keys=True).encode()).hexdigest()
