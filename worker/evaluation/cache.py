"""Vectors a model gave each image, kept by image sha256 so that a second run over a catalogue embeds nothing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from common.files import atomic_write_bytes
from worker.index import photos_checksum


class EmbeddingCache:
    """One file per model (by its sha256) and resize policy under `folder`: image sha256 -> the model's vector."""

    def __init__(self, folder: Path, model_sha256: str, resize: str) -> None:
        self.path = folder / "cache" / "embeddings" / f"{model_sha256}-{resize}.npz"
        self._vectors: dict[str, np.ndarray] = {}
        self._images_by_id: dict[str, str] = {}
        self._added = 0
        if self.path.is_file():
            with np.load(self.path) as stored:
                self._vectors = dict(zip(stored["image_sha256"].tolist(), stored["vectors"], strict=True))
                self._images_by_id = dict(zip(stored["ids"].tolist(), stored["id_images"].tolist(), strict=True))

    def __len__(self) -> int:
        return len(self._vectors)

    def known_photos(self) -> dict[str, str]:
        """Product id -> its photos' sha256s when it was cached, if each is still cached (a changed product is
        embedded)."""
        return {
            item_id: photos
            for item_id, photos in self._images_by_id.items()
            if all(digest in self._vectors for digest in photos.split(","))
        }

    def vector(self, image_sha256: str) -> np.ndarray:
        return self._vectors[image_sha256]

    def add(self, item_id: str, digests: list[str], vectors: list[np.ndarray]) -> None:
        for digest, vector in zip(digests, vectors, strict=True):
            self._vectors[digest] = np.asarray(vector, dtype=np.float32)
        self._images_by_id[item_id] = photos_checksum(digests)
        self._added += 1

    def save(self) -> None:
        """Write the cache atomically, if anything was added since it was read."""
        if not self._added:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        images = list(self._vectors)
        np.savez(
            buffer,
            image_sha256=np.array(images),
            vectors=np.stack([self._vectors[image] for image in images]),
            ids=np.array(list(self._images_by_id)),
            id_images=np.array(list(self._images_by_id.values())),
        )
        atomic_write_bytes(self.path, buffer.getvalue())
        self._added = 0
