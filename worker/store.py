"""The durable index: snapshots written atomically, a change log in between, one owner process at a time.

Folder layout (all under the configured index directory, never anywhere else):

    LOCK                      flock held by the owning process
    CURRENT                   name of the snapshot to load (replaced atomically)
    snapshot-<seq>-<random>/  vectors.hnsw, items.json, [projection.npz,] manifest.json (sha256 of each file)
    wal-<first seq>.log       changes after the snapshot

Start-up loads the snapshot CURRENT names (after checking its files' sha256), then replays the log.
The log always holds the model's own vectors; with a PCA fitted (see `worker.projection`) they are reduced as they
are applied, so a log written before the fit replays the same way as one written after.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import LookalikeError
from common.files import atomic_write_bytes, file_sha256, fsync_path
from worker.index import IndexParams, Item, VectorIndex
from worker.projection import Projection, Reduction
from worker.wal import Change, WriteAheadLog

log = logging.getLogger(__name__)

FORMAT = "lookalike-index/1"
VECTORS, ITEMS, PROJECTION, MANIFEST = "vectors.hnsw", "items.json", "projection.npz", "manifest.json"


class IndexStoreError(LookalikeError):
    """The index can't be opened or changed; the message says why."""


class ModelMismatch(IndexStoreError):
    """The index holds vectors of another model: they must never be mixed with this model's."""


@dataclass(frozen=True)
class ModelIdentity:
    """What makes two vectors comparable: the same model file, fed images resized the same way."""

    sha256: str
    dimension: int
    resize: str


class DurableIndex:
    """A VectorIndex whose every change is logged before it is applied, with periodic snapshots."""

    def __init__(
        self,
        directory: Path,
        identity: ModelIdentity,
        params: IndexParams,
        snapshot_every: int,
        reduction: Reduction | None = None,
    ) -> None:
        self.directory = directory
        self.identity = identity
        self.params = params
        self.snapshot_every = snapshot_every
        self.reduction = reduction
        self.projection: Projection | None = None
        self.seq = 0
        self.changes_since_snapshot = 0
        self.mismatch: str | None = None
        self.index = VectorIndex(params)
        self.snapshot_identity: ModelIdentity | None = None
        self.wal = WriteAheadLog(directory)
        self._lock_file = None

    @classmethod
    def open(
        cls,
        directory: Path,
        identity: ModelIdentity,
        params: IndexParams,
        snapshot_every: int = 20000,
        reduction: Reduction | None = None,
    ) -> DurableIndex:
        """Take the owner's lock, load the latest snapshot, replay the log (and fit a PCA when one is due)."""
        directory.mkdir(parents=True, exist_ok=True)
        store = cls(directory, identity, params, snapshot_every, reduction)
        store._lock()
        store._remove_unfinished_snapshots()
        store._load_snapshot()
        replayed = 0
        for change in store.wal.replay(after_seq=store.seq):
            store._apply(change)
            store.seq = change.seq
            replayed += 1
        store.changes_since_snapshot = replayed
        store.wal.start_file(store.seq + 1)
        store._warn_about_reduction()
        reduced = store._reduce_when_due()
        if store.mismatch is None and (reduced or store.snapshot_identity != identity):
            store.snapshot()  # records the model identity from the very start, and a new projection at once
        log.info(
            "index %s: %d items, %d changes replayed from the log%s",
            directory,
            len(store.index),
            replayed,
            f"; REFUSING WORK: {store.mismatch}" if store.mismatch else "",
        )
        return store

    def check_usable(self) -> None:
        if self.mismatch:
            raise ModelMismatch(self.mismatch)

    def apply(self, changes: list[Change]) -> None:
        """Log `changes` durably, then apply them; the caller acknowledges only after this returns."""
        self.check_usable()
        for change in changes:
            if change.vector is not None and change.vector.shape != (self.identity.dimension,):
                expected = (self.identity.dimension,)
                raise IndexStoreError(f"vector of {change.id!r} has shape {change.vector.shape}, expected {expected}")
            self.seq += 1
            change.seq = self.seq
        self.wal.append(changes)
        for change in changes:
            self._apply(change)
        self.changes_since_snapshot += len(changes)
        if self._reduce_when_due() or self.changes_since_snapshot >= self.snapshot_every:
            try:
                self.snapshot()
            except OSError as error:  # the changes are safe in the log; the next batch tries again
                log.error("index snapshot failed, the log keeps growing: %s", error)
                self._remove_unfinished_snapshots()

    def _apply(self, change: Change) -> None:
        if change.op == "delete":
            self.index.delete(change.id)
            return
        item = Item(-1, change.metadata or {}, change.image_sha256, change.metadata_sha256)
        if change.vector is None and change.id not in self.index:
            return  # a metadata-only change to an item deleted since: nothing to update
        self.index.upsert(change.id, self.to_index_space(change.vector), item)

    def to_index_space(self, vector: np.ndarray | None) -> np.ndarray | None:
        """A model vector as the index compares it: reduced when a PCA has been fitted."""
        if vector is None or self.projection is None:
            return vector
        return self.projection.apply(vector[None])[0]

    def _reduce_when_due(self) -> bool:
        """Fit the configured PCA on every vector the index holds once there are enough, and rebuild the index
        in the reduced space; True when it did (the caller snapshots, which stores the projection)."""
        wish = self.reduction
        if wish is None or self.projection is not None or self.mismatch or len(self.index) < wish.fit_items:
            return False
        ids, vectors = self.index.stored_vectors()
        projection = Projection.fit(vectors, wish.dimension)
        entries = [(item_id, self.index.items[item_id]) for item_id in ids]
        self.params = replace(self.params, dim=projection.dimension)
        self.index = VectorIndex.build(self.params, entries, projection.apply(vectors))
        self.projection = projection
        log.info(
            "index %s reduced by PCA from %d to %d dimensions, fitted on %d items (%.1f%% of the variance kept)",
            self.directory,
            projection.input_dimension,
            projection.dimension,
            projection.fitted_on,
            100 * projection.retained_variance,
        )
        return True

    def _warn_about_reduction(self) -> None:
        stored = self.projection.dimension if self.projection else None
        wanted = self.reduction.dimension if self.reduction else None
        if stored is not None and stored != wanted:
            log.warning(
                "the index in %s holds vectors reduced by PCA to %d dimensions (configured: %s); it stays so, "
                "since the model's own vectors are gone: load the catalogue into an empty LOOKALIKE_INDEX_DIR "
                "to change it",
                self.directory,
                stored,
                wanted or "off",
            )

    def snapshot(self) -> None:
        """Write index + items + manifest to a new folder, switch CURRENT to it, then cut the log."""
        staging = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=self.directory))
        self.index.save_vectors(staging / VECTORS)
        files = [VECTORS, ITEMS]
        if self.projection is not None:
            self.projection.save(staging / PROJECTION)
            files.append(PROJECTION)
        items = [
            [item_id, item.label, item.metadata, item.image_sha256, item.metadata_sha256]
            for item_id, item in self.index.items.items()
        ]
        (staging / ITEMS).write_text(json.dumps(items, separators=(",", ":")))
        for name in files:
            fsync_path(staging / name)
        manifest = {
            "format": FORMAT,
            "seq": self.seq,
            "next_label": self.index.next_label,
            "items": len(self.index),
            "model": asdict(self.identity),
            "params": asdict(self.params),
            "projection": self.projection.describe() if self.projection else None,
            "files": {name: file_sha256(staging / name) for name in files},
        }
        atomic_write_bytes(staging / MANIFEST, json.dumps(manifest, indent=2).encode())
        # A fresh name every time: the snapshot CURRENT names is never touched until CURRENT names another.
        final = self.directory / f"snapshot-{self.seq:020d}-{uuid.uuid4().hex[:8]}"
        staging.rename(final)
        fsync_path(self.directory)
        previous = self.snapshot_name()
        atomic_write_bytes(self.directory / "CURRENT", final.name.encode())
        self.wal.start_file(self.seq + 1)
        self.wal.drop_through(self.seq)
        if previous and previous != final.name:
            shutil.rmtree(self.directory / previous, ignore_errors=True)
        self.changes_since_snapshot = 0
        self.snapshot_identity = self.identity
        log.info("index snapshot %s: %d items", final.name, len(self.index))

    def snapshot_name(self) -> str | None:
        current = self.directory / "CURRENT"
        return current.read_text().strip() if current.exists() else None

    def close(self) -> None:
        """A clean stop: snapshot what the log holds so the next start needs no replay."""
        if self.changes_since_snapshot and self.mismatch is None:
            self.snapshot()
        self.wal.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def stats(self) -> dict[str, Any]:
        return {
            **self.index.stats(),
            "model_sha256": self.identity.sha256,
            "resize": self.identity.resize,
            "seq": self.seq,
            "snapshot": self.snapshot_name(),
            "changes_since_snapshot": self.changes_since_snapshot,
            "mismatch": self.mismatch,
            "pca": self.projection.describe() if self.projection else None,
        }

    def _lock(self) -> None:
        self._lock_file = open(self.directory / "LOCK", "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise IndexStoreError(
                f"another index worker owns {self.directory} (one writer per index: stop it first)"
            ) from None

    def _remove_unfinished_snapshots(self) -> None:
        current = self.snapshot_name()
        for path in self.directory.iterdir():
            unfinished = path.name.startswith(".snapshot-")
            superseded = path.name.startswith("snapshot-") and path.name != current
            if path.is_dir() and (unfinished or superseded):
                shutil.rmtree(path, ignore_errors=True)

    def _load_snapshot(self) -> None:
        name = self.snapshot_name()
        if name is None:
            return
        folder = self.directory / name
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            for file_name, expected in manifest["files"].items():
                if file_sha256(folder / file_name) != expected:
                    raise IndexStoreError(
                        f"index file {folder / file_name} is damaged (sha256 differs from its manifest)"
                    )
        except (OSError, ValueError, KeyError) as error:
            raise IndexStoreError(f"index snapshot {folder} can't be read: {error}") from error
        stored = ModelIdentity(**manifest["model"])
        self.snapshot_identity = stored
        self.seq = manifest["seq"]
        if stored != self.identity:
            if manifest["items"] == 0 and next(self.wal.replay(after_seq=self.seq), None) is None:
                return  # an empty index (nothing in the log either) simply adopts the configured model
            self.mismatch = (
                f"the index in {self.directory} holds {manifest['items']} vectors of model {stored.sha256[:12]} "
                f"(resize {stored.resize}), not of the configured model {self.identity.sha256[:12]} "
                f"(resize {self.identity.resize}); load the catalogue again into an empty LOOKALIKE_INDEX_DIR"
            )
            self.identity = stored
        params = IndexParams(**{**manifest["params"], "ef": self.params.ef})
        self.params = params
        if manifest.get("projection"):
            self.projection = Projection.load(folder / PROJECTION)
        items = (
            (item_id, Item(label, metadata, image_sha, meta_sha))
            for item_id, label, metadata, image_sha, meta_sha in json.loads((folder / ITEMS).read_text())
        )
        self.index = VectorIndex.load(params, folder / VECTORS, items, manifest["next_label"])
