"""The index owner: the one process that writes the durable index, publishes its changes to the replicas, and
answers reads itself when no replica keeps up."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import redis
from celery import Celery

from common.errors import ErrorCode, LookalikeError
from common.model import EmbeddingModel, load_model
from common.settings import Settings
from common.vectors import decode_vector
from protocol import keys
from protocol.heartbeats import Role
from protocol.jobs import Jobs, item_error
from protocol.queues import Queue
from worker.feed import ChangeFeed
from worker.index import IndexParams
from worker.projection import Reduction
from worker.reader import IndexReader
from worker.recovery import give_back
from worker.snapshots import ModelIdentity, ModelMismatch
from worker.store import DurableIndex
from worker.wal import Change

log = logging.getLogger(__name__)


class IndexOwner:
    def __init__(self, settings: Settings, model: EmbeddingModel, store: DurableIndex, client: redis.Redis) -> None:
        self.settings = settings
        self.model = model
        self.store = store
        self.redis = client
        self.jobs = Jobs.for_settings(client, settings)
        self.reader = IndexReader(store, usable=lambda: store.mismatch)
        self.feed = ChangeFeed(client)
        store.on_logged = lambda changes: self.feed.publish(changes, store.wal, store.snapshot_seq)
        store.on_snapshot = lambda name: self.feed.mark_snapshot(name, store.seq, _reduced_to(store))
        self.on_change: Callable[[], None] = lambda: None  # tells the heartbeat to publish the new item count

    @classmethod
    def open(cls, settings: Settings, client: redis.Redis) -> IndexOwner:
        # The model only for its identity (sha256, dimension) and its contract: the owner embeds nothing.
        model = load_model(settings.model, ["cpu"], intra_op_threads=1)
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
        store = DurableIndex.open(settings.index_dir, identity, params, settings.snapshot_every, reduction)
        owner = cls(settings, model, store, client)
        owner.publish_checksums()
        restarted = owner.feed.catch_up(store.wal, store.seq, store.snapshot_seq)
        if restarted and store.mismatch is None:
            # Replicas hold changes this index never had (it came back from a backup): a new id makes them reload.
            store.index_id = uuid.uuid4().hex
            store.snapshot()  # announced in the feed, as every snapshot from now on
        elif store.snapshot_seq == store.seq:  # maybe written at start (a new model identity, a PCA fitted)
            owner.feed.mark_snapshot(store.snapshot_name(), store.seq, _reduced_to(store))
        return owner

    def publish_checksums(self) -> None:
        """Tell embed workers what the index holds, so a re-run load skips unchanged items."""
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.CHECKSUMS)
            pending = {}
            for item_id, item in self.store.index.items.items():
                pending[item_id] = f"{item.image_sha256}:{item.metadata_sha256}"
                if len(pending) == 5000:
                    pipe.hset(keys.CHECKSUMS, mapping=pending)
                    pending = {}
            if pending:
                pipe.hset(keys.CHECKSUMS, mapping=pending)
            pipe.execute()

    def restore_orphaned_messages(self, app: Celery) -> int:
        """Give back the messages a killed predecessor had taken but not acknowledged.

        Redis would re-deliver them only after the visibility timeout; holding the index lock proves that no
        other owner is alive, so everything unacknowledged on the owner's queues is orphaned.
        """
        restored = len(give_back(app, lambda _tag, routing_key, *_: routing_key in (Queue.INDEX, Queue.SEARCH)))
        if restored:
            log.warning("gave back %d messages a previous index owner had not acknowledged", restored)
        return restored

    def apply(self, job_id: str | None, messages: list[dict[str, Any]]) -> dict[str, int]:
        """Log, apply and report a batch of upserts and deletes from the embed workers."""
        identity = self.store.identity
        foreign = {
            message["id"]: item_error(
                ErrorCode.MODEL_MISMATCH,
                f"embedded with model {str(message.get('model_sha256'))[:12]} / resize {message.get('resize')}; "
                f"the index holds model {identity.sha256[:12]} / resize {identity.resize}",
            )
            for message in messages
            if message["op"] == "upsert"
            and (message.get("model_sha256"), message.get("resize")) != (identity.sha256, identity.resize)
        }
        # A metadata-only change to an item deleted since its load looked at it changes nothing: it must not be
        # counted as indexed, nor its checksums published (a later load would then skip it as unchanged).
        vanished = {
            message["id"]: item_error(
                ErrorCode.NOT_FOUND,
                f"item {message['id']} was deleted while this load read it; load the catalogue again to index it",
            )
            for message in messages
            if message["op"] == "upsert" and not message.get("vector") and message["id"] not in self.store.index
        }
        foreign = {**vanished, **foreign}
        try:
            changes = [_change(message) for message in messages if message["id"] not in foreign]
            self.store.apply(changes)
        except Exception as error:
            # Nothing is acknowledged as indexed: every item of the batch is reported failed, with the reason,
            # so that the load still finishes instead of waiting for items no one will index.
            log.exception("refused %d changes: %s", len(messages), error)
            failed = {message["id"]: item_error(_refusal_code(error), str(error)) for message in messages}
            if job_id:
                self.jobs.record(job_id, errors=failed)
            return {"applied": 0, "failed": len(failed)}
        self._update_checksums(changes)
        self.on_change()
        if job_id:
            if changes:  # before the items are counted: a finished load always says which change to wait for
                self.jobs.note_seq(job_id, self.store.seq)
            self.jobs.record(job_id, done=[change.id for change in changes], errors=foreign)
        return {"applied": len(changes), "failed": len(foreign)}

    def delete(self, ids: Iterable[str]) -> dict[str, int]:
        """Delete the items the index holds; `seq` is the change a read can wait for to see them gone."""
        present = [item_id for item_id in ids if item_id in self.store.index]
        if present:
            changes = [Change(op="delete", id=item_id) for item_id in present]
            self.store.apply(changes)
            self._update_checksums(changes)
            self.on_change()
        return {"deleted": len(present), "seq": self.store.seq}

    def snapshot(self) -> None:
        """A snapshot now (a replica that found changes missing from the feed asked for one)."""
        if self.store.mismatch is None and self.store.seq != self.store.snapshot_seq:
            self.store.snapshot()

    def _update_checksums(self, changes: list[Change]) -> None:
        with self.redis.pipeline() as pipe:
            for change in changes:
                if change.op == "delete":
                    pipe.hdel(keys.CHECKSUMS, change.id)
                else:
                    pipe.hset(keys.CHECKSUMS, change.id, f"{change.image_sha256}:{change.metadata_sha256}")
            pipe.execute()

    def duplicate_pairs(
        self, after: str | None, count: int, threshold: float, k: int
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Near-duplicates of the `count` items that follow `after` in id order: those of each item's `k` nearest
        neighbours that score at least `threshold`, as pairs (a < b; a pair can come from both of its items).
        Returns the pairs and the items looked at."""
        self.store.check_usable()
        index = self.store.index
        ids = sorted(item_id for item_id in index.items if after is None or item_id > after)[:count]
        pairs = []
        for item_id in ids:
            for hit in index.search(index.vector(item_id), k, exclude=item_id):
                if hit.score >= threshold:
                    pairs.append({"a": min(item_id, hit.id), "b": max(item_id, hit.id), "score": round(hit.score, 6)})
        return pairs, ids

    def status(self) -> dict[str, Any]:
        """The index's figures, as `index_stats` and the heartbeat give them."""
        return {
            **self.store.stats(),
            "role": Role.INDEX,
            "model": self.model.path.name,
            "pid": os.getpid(),
        }

    def heartbeat(self) -> dict[str, Any]:
        """What the web's health check and search form need, without a round trip through the queue."""
        status = self.status()
        fields = ("items", "model", "model_sha256", "resize", "mismatch", "pca", "seq", "index_id", "snapshot")
        return {**{key: status[key] for key in fields}, **self.reader.filterable()}

    def close(self) -> None:
        self.store.close()


def _change(message: dict[str, Any]) -> Change:
    return Change(
        op=message["op"],
        id=message["id"],
        metadata=message.get("metadata"),
        image_sha256=message.get("image_sha256"),
        metadata_sha256=message.get("metadata_sha256"),
        vector=decode_vector(message["vector"]) if message.get("vector") else None,
    )


def _refusal_code(error: Exception) -> ErrorCode:
    if isinstance(error, ModelMismatch):
        return ErrorCode.MODEL_MISMATCH
    if isinstance(error, OSError):
        return ErrorCode.INDEX_UNWRITABLE  # disk full, read-only folder: nothing was logged, nothing acknowledged
    return ErrorCode.INDEX_ERROR


def _reduced_to(store: DurableIndex) -> int:
    return store.projection.dimension if store.projection else 0
