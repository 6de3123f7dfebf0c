"""The durable index: snapshots written atomically, a change log in between, one owner process at a time.

Folder layout (all under the configured index directory, never anywhere else):

    LOCK                      flock held by the owning process
    CURRENT                   name of the snapshot to load (replaced atomically; see `worker.snapshots`)
    snapshot-<seq>-<random>/  vectors.hnsw, items.json, [projection.npz,] manifest.json (sha256 of each file)
    wal-<first seq>.log       changes after the snapshot

Start-up loads the snapshot CURRENT names (after checking its files' sha256), then replays the log.
The log always holds the model's own vectors; with a PCA fitted (see `worker.projection`) they are reduced as they
are applied, so a log written before the fit replays the same way as one written after.
"""

from __future__ import annotations

import fcntl
import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from common.errors import LookalikeError
from common.model import EmbeddingModel, load_model
from common.settings import Settings
from worker.aliases import ADOPTED, manifest
from worker.index import IndexParams, VectorIndex
from worker.projection import Projection, Reduction
from worker.snapshots import (
    IndexStoreError,
    ModelIdentity,
    ModelMismatch,
    current_name,
    read_snapshot,
    remove_snapshots,
    write_snapshot,
)
from worker.state import IndexState
from worker.wal import Change, WriteAheadLog

log = logging.getLogger(__name__)

LOCK = "LOCK"


class DurableIndex(IndexState):
    """The owner's index: every change is logged before it is applied, with periodic snapshots."""

    def __init__(
        self,
        directory: Path,
        identity: ModelIdentity,
        params: IndexParams,
        snapshot_every: int,
        reduction: Reduction | None = None,
        model_file: str = "",
    ) -> None:
        super().__init__(identity, params)
        self.directory = directory
        self.model_file = model_file  # recorded in every snapshot's manifest
        self.snapshot_every = snapshot_every
        self.reduction = reduction
        self.changes_since_snapshot = 0
        self.mismatch: str | None = None
        self.snapshot_identity: ModelIdentity | None = None
        self.snapshot_seq = 0  # the sequence number of the snapshot CURRENT names
        self.wal = WriteAheadLog(directory)
        # Told of every batch once it is durable, and of every snapshot once CURRENT names it (the change feed).
        self.on_logged: Callable[[list[Change]], None] = lambda changes: None
        self.on_snapshot: Callable[[str], None] = lambda name: None
        self._lock_file: TextIO | None = None

    @classmethod
    def open(
        cls,
        directory: Path,
        identity: ModelIdentity,
        params: IndexParams,
        snapshot_every: int = 20000,
        reduction: Reduction | None = None,
        *,
        lock: bool = True,
        model_file: str = "",
        index_id: str = "",
    ) -> DurableIndex:
        """Take the owner's lock (unless the caller holds the lock of a folder above: `lock=False`), load the
        latest snapshot, replay the log (and fit a PCA when one is due); a new index gets `index_id` (default: a
        new one)."""
        directory.mkdir(parents=True, exist_ok=True)
        store = cls(directory, identity, params, snapshot_every, reduction, model_file)
        store.index_id = index_id
        if lock:
            store._lock_file = take_lock(directory)
        try:
            store._load()
        except BaseException:  # refused (damage, a model mismatch found late): the next try must find no lock
            store._release()
            raise
        return store

    def _load(self) -> None:
        remove_snapshots(self.directory, keep={current_name(self.directory)})
        self._load_snapshot()
        replayed = 0
        for change in self.wal.replay(after_seq=self.seq):
            self.apply_change(change)
            self.seq = change.seq
            replayed += 1
        self.changes_since_snapshot = replayed
        self.wal.start_file(self.seq + 1)
        self._warn_about_reduction()
        reduced = self._reduce_when_due()
        made = not self.index_id
        if made:
            self.index_id = uuid.uuid4().hex  # a new index (or one from before index ids)
        if self.mismatch is None and (reduced or made or self.snapshot_identity != self.identity):
            self.snapshot()  # records the model identity and index id from the very start, a new projection at once
        log.info(
            "index %s: %d items, %d changes replayed from the log%s",
            self.directory,
            len(self.index),
            replayed,
            f"; REFUSING WORK: {self.mismatch}" if self.mismatch else "",
        )

    def check_usable(self) -> None:
        if self.mismatch:
            raise ModelMismatch(self.mismatch)

    def apply(self, changes: list[Change]) -> None:
        """Log `changes` durably, then apply them; the caller acknowledges only after this returns."""
        self.check_usable()
        if not changes:
            return
        for number, change in enumerate(changes, start=self.seq + 1):
            expected = (len(change.photos), self.identity.dimension)
            if change.vectors is not None and (not change.photos or change.vectors.shape != expected):
                raise IndexStoreError(
                    f"vectors of {change.id!r} have shape {change.vectors.shape}, expected {expected}"
                )
            change.seq = number
        self.wal.append(changes)  # a batch the log did not take leaves no hole in the sequence numbers
        self.seq = changes[-1].seq
        self.on_logged(changes)
        for change in changes:
            self.apply_change(change)
        self.changes_since_snapshot += len(changes)
        if self._reduce_when_due() or self.changes_since_snapshot >= self.snapshot_every:
            try:
                self.snapshot()
            except (OSError, IndexStoreError) as error:  # the changes are safe in the log; the next batch tries again
                log.error("index snapshot failed, the log keeps growing: %s", error)
                remove_snapshots(self.directory, keep={self.snapshot_name(), None})

    def _reduce_when_due(self) -> bool:
        """Fit the configured PCA on every vector the index holds once there are enough, and rebuild the index
        in the reduced space; True when it did (the caller snapshots, which stores the projection)."""
        wish = self.reduction
        if wish is None or self.projection is not None or self.mismatch or len(self.index) < wish.fit_items:
            return False
        _, vectors = self.index.stored_vectors()
        projection = Projection.fit(vectors, wish.dimension)
        entries = list(self.index.items.items())  # in the order of the vectors' products
        self.params = replace(self.params, dim=projection.dimension)
        self.index = VectorIndex.build(self.params, entries, projection.apply(vectors))
        self.projection = projection
        log.info(
            "index %s reduced by PCA from %d to %d dimensions, fitted on %d photos (%.1f%% of the variance kept)",
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
                "since the model's own vectors are gone: `lookalike index build` makes an index beside it with "
                "the configured PCA and switches to it",
                self.directory,
                stored,
                wanted or "off",
            )

    def snapshot(self) -> None:
        """Write a snapshot of the index at `seq`, verify it, switch CURRENT to it, then cut the log."""
        name = write_snapshot(
            self.directory, self.index_id, self.seq, self.identity, self.index, self.projection, self.model_file
        )
        self.changes_since_snapshot = 0
        self.snapshot_identity, self.snapshot_seq = self.identity, self.seq
        log.info("index snapshot %s: %d items", name, len(self.index))
        self.on_snapshot(name)
        try:
            self.wal.start_file(self.seq + 1)
            self.wal.drop_through(self.seq)
        except OSError as error:
            # The snapshot is in place; the log it covers only costs replay time (records up to its seq are
            # skipped), and the file written to stays open, so changes go on. The next snapshot cuts the log.
            log.error("index snapshot %s is in place, but the log was not cut (it keeps growing): %s", name, error)

    def continue_after(self, seq: int) -> None:
        """Number this index's next changes after `seq` (the index it replaces has made changes up to there), and
        snapshot it: sequence numbers never go back when another index is switched in, so a `min_seq` a client
        holds keeps its meaning and the change feed's IDs keep growing."""
        self.seq = max(self.seq, seq + 1)
        self.snapshot()

    def snapshot_name(self) -> str | None:
        return current_name(self.directory)

    def close(self) -> None:
        """A clean stop: snapshot what the log holds so the next start needs no replay."""
        try:
            if self.changes_since_snapshot and self.mismatch is None:
                self.snapshot()
        finally:
            self._release()

    def _release(self) -> None:
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
            "index_id": self.index_id,
            "snapshot": self.snapshot_name(),
            "changes_since_snapshot": self.changes_since_snapshot,
            "mismatch": self.mismatch,
            "pca": self.projection.describe() if self.projection else None,
        }

    def _load_snapshot(self) -> None:
        name = self.snapshot_name()
        if name is None:
            return
        snapshot = read_snapshot(self.directory / name, self.params.ef)
        self.snapshot_identity = snapshot.identity
        self.seq = self.snapshot_seq = snapshot.seq
        if snapshot.identity != self.identity:
            if snapshot.items == 0 and next(self.wal.replay(after_seq=self.seq), None) is None:
                return  # an empty index (nothing in the log either) simply adopts the configured model
            stored, configured = snapshot.identity, self.identity
            self.mismatch = (
                f"the index in {self.directory} holds {snapshot.items} vectors of model {stored.sha256[:12]} "
                f"(resize {stored.resize}), not of the configured model {configured.sha256[:12]} "
                f"(resize {configured.resize}); set LOOKALIKE_MODEL back to the model it was built with, then "
                "`lookalike index build --model NEW.onnx` builds an index of the new model beside it and switches"
            )
        self.adopt(snapshot)


def take_lock(directory: Path) -> TextIO:
    """The owner's lock on `directory`, held while the returned file stays open."""
    lock_file = open(directory / LOCK, "a")  # noqa: SIM115 - held until the owner closes it
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise IndexStoreError(f"another index worker owns {directory} (one writer per index: stop it first)") from None
    return lock_file


def owner_holds_lock(directory: Path) -> bool:
    """Whether a live process owns the index in `directory`: the proof of life that a heartbeat can't give, since
    a heartbeat outlives a killed owner (in Redis's append-only file, through a power cut). Probing takes the lock
    for an instant: only for a caller about to start an owner of its own."""
    try:
        probe = open(directory / LOCK, "rb")  # noqa: SIM115 - closed just below
    except FileNotFoundError:
        return False
    with probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False


def open_index(settings: Settings, folder: str, model_file: Path | None = None) -> tuple[EmbeddingModel, DurableIndex]:
    """Open the index in `folder` (below the index folder, whose lock the caller holds) with its model: the one
    its manifest names, else `model_file`, else LOOKALIKE_MODEL (a new index, or one from before manifests named
    their model)."""
    directory = settings.index_dir / folder
    recorded = (manifest(directory) or {}).get("model_file")
    if recorded and Path(recorded).is_file():
        model_file = Path(recorded)
    model_file = model_file or settings.model
    # The model only for its identity (sha256, dimension) and its contract: the owner embeds nothing.
    model = load_model(model_file, ["cpu"], intra_op_threads=1)
    identity = ModelIdentity(model.sha256, model.contract.dimension, settings.resize)
    params = IndexParams(
        dim=model.contract.dimension,
        m=settings.hnsw_m,
        ef_construction=settings.hnsw_ef_construction,
        ef=settings.hnsw_ef,
    )
    reduction = None
    if settings.pca_dim:
        if settings.pca_dim >= model.contract.dimension:
            raise LookalikeError(
                f"LOOKALIKE_PCA_DIM is {settings.pca_dim}, but the model's vectors have only "
                f"{model.contract.dimension} dimensions"
            )
        reduction = Reduction(settings.pca_dim, settings.pca_fit_items)
    store = DurableIndex.open(
        directory,
        identity,
        params,
        settings.snapshot_every,
        reduction,
        lock=False,
        model_file=str(model.path),
        index_id=Path(folder).name if folder != ADOPTED else "",
    )
    return model, store
