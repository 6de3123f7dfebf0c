"""The index at a sequence number, as the owner and every replica hold it: vectors and items, the model they
belong to, and the projection every vector goes through on its way in.

The owner changes it through its log (`worker.store`), a replica through the owner's change feed
(`worker.replica`); both apply the same changes the same way, in sequence order.
"""

from __future__ import annotations

import numpy as np

from worker.index import IndexParams, Item, Photo, VectorIndex
from worker.projection import Projection
from worker.snapshots import ModelIdentity, Snapshot
from worker.wal import Change


class IndexState:
    def __init__(self, identity: ModelIdentity, params: IndexParams) -> None:
        self.identity = identity
        self.params = params
        self.index = VectorIndex(params)
        self.projection: Projection | None = None
        self.seq = 0
        self.index_id = ""

    def adopt(self, snapshot: Snapshot) -> None:
        """Become the index a snapshot holds."""
        self.identity, self.params, self.projection = snapshot.identity, snapshot.params, snapshot.projection
        self.index, self.seq, self.index_id = snapshot.index, snapshot.seq, snapshot.index_id

    def apply_change(self, change: Change) -> None:
        """Apply one change (the caller keeps `seq` in order)."""
        if change.op == "delete":
            self.index.delete(change.id)
            return
        if change.vectors is None and change.id not in self.index:
            return  # a metadata-only change to an item deleted since: nothing to update
        # The index gives these photos their labels; the change's own stay untouched, as the index being built
        # beside this one applies the same change objects.
        photos = [Photo(photo.sha256, photo.image) for photo in change.photos]
        item = Item(change.metadata or {}, photos, change.metadata_sha256)
        self.index.upsert(change.id, self.to_index_space(change.vectors), item)

    def to_index_space(self, vectors: np.ndarray | None) -> np.ndarray | None:
        """Model vectors (a row each) as the index compares them: reduced when a PCA has been fitted."""
        if vectors is None:
            return None
        rows = np.atleast_2d(vectors)
        return rows if self.projection is None else self.projection.apply(rows)
