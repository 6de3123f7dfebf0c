"""The durable index: snapshots written atomically, a change log in between, one owner process at a time.

Folder layout (all under the configured index directory, never anywhere else):

    LOCK                      flock held by the owning process
    CURRENT                   name of the snapshot to load (replaced atomically)
    snapshot-<seq>-<random>/  vectors.hnsw, items.json, manifest.json (sha256 of each file)
    wal-<first seq>.log       changes after the snapshot

Start-up loads the snapshot CURRENT names (after checking its files' sha256), then replays the log.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lookalike.errors import LookalikeError
from lookalike.files import atomic_write_bytes, file_sha256, fsync_path
from worker.index import IndexParams, Item, VectorIndex
from worker.wal import Change, WriteAheadLog

log = logging.getLogger(__name__)

FORMAT = "lookalike-index/1"
VECTORS, ITEMS, MANIFEST = "vectors.hnsw", "items.json", "manifest.json"


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

    def __init__(self, directory: Path, identity: ModelIdentity, params: IndexParams, snapshot_every: int) -> None:
        self.directory = directory
        self.identity = identity
        self.params = params
        self.snapshot_every = snapshot_every
        self.seq = 0
        self.changes_since_snapshot = 0
        self.mismatch: str | None = None
        self.index = VectorIndex(params)
        self.snapshot_identity: ModelIdentity | None = None
        self.wal = WriteAheadLog(directory)
        self._lock_file = None

    @classmethod
    def open(
        cls, directory: Path, identity: ModelIdentity, params: IndexParams, snapshot_every: int = 20000
    ) -> DurableIndex:
        """Take the owner's lock, load the latest snapshot, replay the log."""
        directory.mkdir(parents=True, exist_ok=True)
        store = cls(directory, identity, params, snapshot_every)
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
        if store.mismatch is None and store.snapshot_identity != identity:
            store.snapshot()  # records the model identity from the very start
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
        if self.changes_since_snapshot >= self.snapshot_every:
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
        self.index.upsert(change.id, change.vector, item)

    def snapshot(self) -> None:
        """Write index + items + manifest to a new folder, switch CURRENT to it, then cut the log."""
        staging = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=self.directory))
        self.index.save_vectors(staging / VECTORS)
        items = [
            [item_id, item.label, item.metadata, item.image_sha256, item.metadata_sha256]
            for item_id, item in self.index.items.items()
        ]
        (staging / ITEMS).write_text(json.dumps(items, separators=(",", ":")))
        for name in (VECTORS, ITEMS):
            fsync_path(staging / name)
        manifest = {
            "format": FORMAT,
            "seq": self.seq,
            "next_label": self.index.next_label,
            "items": len(self.index),
            "model": asdict(self.identity),
            "params": asdict(self.params),
            "files": {name: file_sha256(staging / name) for name in (VECTORS, ITEMS)},
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
        items = (
            (item_id, Item(label, metadata, image_sha, meta_sha))
            for item_id, label, metadata, image_sha, meta_sha in json.loads((folder / ITEMS).read_text())
        )
        self.index = VectorIndex.load(params, folder / VECTORS, items, manifest["next_label"])
