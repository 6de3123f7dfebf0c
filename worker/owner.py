"""The index owner: the one process that holds the durable index, applies changes and answers searches."""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from celery import Celery

from common.errors import ErrorCode, LookalikeError
from common.images import check_size, decode_image
from common.model import EmbeddingModel, load_model
from common.settings import CORES, Settings
from common.vectors import decode_vector
from protocol import keys
from protocol.jobs import Jobs, item_error
from protocol.queues import Queue
from worker.index import IndexParams
from worker.projection import Reduction
from worker.recovery import give_back
from worker.store import DurableIndex, ModelIdentity, ModelMismatch
from worker.wal import Change

log = logging.getLogger(__name__)

FACET_VALUES = 20  # a metadata field with at most this many distinct values is offered as a search filter
FACET_SECONDS = 30  # a count of facets walks every item; most changes barely move them


class IndexOwner:
    def __init__(self, settings: Settings, model: EmbeddingModel, store: DurableIndex, client: redis.Redis) -> None:
        self.settings = settings
        self.model = model
        self.store = store
        self.redis = client
        self.jobs = Jobs(client, settings.search_ttl, settings.search_timeout)
        self._facets: tuple[int, float, int, dict[str, list[str]]] = (-1, 0.0, 0, {})  # seq, when, items, facets
        self.on_change: Callable[[], None] = lambda: None  # tells the heartbeat to publish the new item count

    @classmethod
    def open(cls, settings: Settings, client: redis.Redis) -> IndexOwner:
        # All cores: bulk embedding runs niced, so a search's embedding gets the CPU first.
        model = load_model(settings.model, settings.providers, intra_op_threads=CORES)
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
            self.jobs.record(job_id, done=[change.id for change in changes], errors=foreign)
        return {"applied": len(changes), "failed": len(foreign)}

    def delete(self, ids: Iterable[str]) -> int:
        present = [item_id for item_id in ids if item_id in self.store.index]
        if present:
            changes = [Change(op="delete", id=item_id) for item_id in present]
            self.store.apply(changes)
            self._update_checksums(changes)
            self.on_change()
        return len(present)

    def _update_checksums(self, changes: list[Change]) -> None:
        with self.redis.pipeline() as pipe:
            for change in changes:
                if change.op == "delete":
                    pipe.hdel(keys.CHECKSUMS, change.id)
                else:
                    pipe.hset(keys.CHECKSUMS, change.id, f"{change.image_sha256}:{change.metadata_sha256}")
            pipe.execute()

    def search_image(self, image: bytes, k: int, filters: dict[str, str]) -> list[dict[str, Any]]:
        """Decode and embed the query here (no queue behind bulk work), then search."""
        self.store.check_usable()
        pixels = decode_image(image, self.model.contract.size, self.store.identity.resize, self.settings.max_pixels)
        vector = self.store.to_index_space(self.model.embed(pixels[None])[0])
        return [hit.as_dict() for hit in self.store.index.search(vector, k, filters)]

    def similar(self, item_id: str, k: int, filters: dict[str, str]) -> list[dict[str, Any]] | None:
        """'More like this': the item's own vector as the query, the item itself left out."""
        self.store.check_usable()
        if item_id not in self.store.index:
            return None
        vector = self.store.index.vector(item_id)
        return [hit.as_dict() for hit in self.store.index.search(vector, k, filters, exclude=item_id)]

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

    def get(self, item_id: str) -> dict[str, Any] | None:
        item = self.store.index.items.get(item_id)
        return None if item is None else {"id": item_id, "metadata": item.metadata}

    def stats(self) -> dict[str, Any]:
        return {
            **self.store.stats(),
            "provider": self.model.provider,
            "model": self.model.path.name,
            "pid": os.getpid(),
        }

    def facets(self) -> dict[str, list[str]]:
        """Recounted when the index changed, at most every FACET_SECONDS unless it grew or shrank by a tenth."""
        seq, counted_at, counted_items, facets = self._facets
        items = len(self.store.index)
        grown = abs(items - counted_items) > counted_items / 10
        if seq != self.store.seq and (grown or time.monotonic() - counted_at > FACET_SECONDS):
            facets = self.store.index.facets(FACET_VALUES)
            self._facets = (self.store.seq, time.monotonic(), items, facets)
        return facets

    def heartbeat(self) -> dict[str, Any]:
        """What the web's health check and search form need, without a round trip through the queue."""
        stats = self.stats()
        return {
            **{key: stats[key] for key in ("items", "provider", "model", "model_sha256", "resize", "mismatch", "pca")},
            "facets": self.facets(),
        }

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


def decode_upload(text: str, max_upload: int) -> bytes:
    """An uploaded image as it travels in a search message (base64), refused when over the cap."""
    return check_size(base64.b64decode(text), max_upload)
