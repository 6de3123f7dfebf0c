"""Re-projection: an index of a model becomes one of that model followed by a head (`lookalike tune`) by running the
head on the vectors the index holds, instead of embedding the whole catalogue again.

A tuned model's card names its source model (sha256) and its head alone (a small ONNX file beside the model). A
build of the tuned model finds the vectors to re-project in the serving index or in a kept one (the raw index a
first tuning replaced, kept for a rollback), where that index belongs to the source model, fed images resized the
same way, and keeps its vectors whole (no PCA). An item whose photo changed since that index saw it is embedded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from common.files import file_sha256
from common.model import EmbeddingModel
from worker.aliases import describe, manifest
from worker.index import Item, VectorIndex
from worker.snapshots import IndexStoreError, current_name, read_snapshot
from worker.store import DurableIndex

log = logging.getLogger(__name__)


class Head:
    """A tuned model's head alone: unit vectors of the tuned model from vectors of its source model."""

    def __init__(self, path: Path) -> None:
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def project(self, vectors: np.ndarray) -> np.ndarray:
        (projected,) = self.session.run(None, {self.input: vectors.astype(np.float32)})
        return projected


@dataclass
class Source:
    """Where a build finds the vectors it re-projects, and the head that re-projects them."""

    head: Head
    index: VectorIndex
    index_id: str

    def holds(self, item_id: str, item: Item) -> bool:
        """Whether the source holds the product's vectors, for the same photos."""
        found = self.index.items.get(item_id)
        return found is not None and found.photo_digests == item.photo_digests

    def project(self, ids: list[str]) -> list[np.ndarray]:
        """Each product's photos' vectors, re-projected (a row per photo)."""
        stored = [self.index.vectors(item_id) for item_id in ids]
        projected = self.head.project(np.concatenate(stored))
        return np.split(projected, np.cumsum([len(vectors) for vectors in stored])[:-1])


def head_of(model: EmbeddingModel) -> tuple[str, Path] | None:
    """A tuned model's source model (sha256) and its head's file, as its card names them, or None."""
    card = model.card or {}
    source, head = card.get("source_model") or {}, card.get("head_model") or {}
    if not source.get("sha256") or not head.get("file"):
        return None
    path = model.path.parent / head["file"]
    if not path.is_file() or file_sha256(path) != head.get("sha256"):
        log.warning("the head %s of %s is missing or changed: the build embeds every item", path, model.path.name)
        return None
    return source["sha256"], path


def find_source(model: EmbeddingModel, serving: DurableIndex, index_dir: Path, ef: int) -> Source | None:
    """The vectors a build of `model` can re-project: the serving index's, else a kept index's; or None."""
    found = head_of(model)
    if found is None:
        return None
    source_sha256, head_file = found
    wanted = (source_sha256, serving.identity.resize)
    if (serving.identity.sha256, serving.identity.resize) == wanted and serving.projection is None:
        return Source(Head(head_file), serving.index, serving.index_id)
    for row in describe(index_dir):
        folder = index_dir / row["folder"]
        kept = (manifest(folder) or {}).get("model") or {}
        if folder.resolve() == serving.directory.resolve() or (kept.get("sha256"), kept.get("resize")) != wanted:
            continue
        try:
            snapshot = read_snapshot(folder / current_name(folder), ef)
        except IndexStoreError as error:
            log.warning("kept index %s can't be read for re-projection: %s", row["index_id"], error)
            continue
        if snapshot.projection is None:
            return Source(Head(head_file), snapshot.index, snapshot.index_id)
    return None
