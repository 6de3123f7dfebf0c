"""The index owner: the one process that writes the durable index, publishes its changes to the replicas, and
answers reads itself when no replica keeps up.

It serves the index the alias names (`worker.aliases`) and builds a new one beside it when asked (a new model, a
new export, INT8, a tuned head, PCA on or off: `worker.builds`); when the build is complete it switches to it, in
one step between two tasks, so every read is answered wholly by one index. The replaced one is kept for a rollback.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import redis
from celery import Celery, current_app

from common.errors import ErrorCode, LookalikeError
from common.model import EmbeddingModel, ModelError
from common.settings import Settings
from common.vectors import decode_vector
from protocol import keys
from protocol.heartbeats import Role
from protocol.jobs import Jobs, item_error
from protocol.queues import Queue, Task
from worker import calibrations
from worker.aliases import (
    Alias,
    alias_for_owner,
    find_folder,
    manifest,
    remove_index,
    write_alias,
)
from worker.builds import IndexBuild, reference_of
from worker.feed import ChangeFeed
from worker.index import Item, Photo
from worker.reader import IndexReader
from worker.recovery import give_back
from worker.snapshots import ModelIdentity, ModelMismatch
from worker.store import DurableIndex, open_index, take_lock
from worker.wal import Change

log = logging.getLogger(__name__)

SERVING_FIELDS = ("index_id", "model", "model_sha256", "resize")  # keys.SERVING: what the embedders and searches use


class IndexOwner:
    def __init__(
        self,
        settings: Settings,
        model: EmbeddingModel,
        store: DurableIndex,
        client: redis.Redis,
        alias: Alias | None = None,
    ) -> None:
        self.settings = settings
        self.redis = client
        self.jobs = Jobs.for_settings(client, settings)
        self.feed = ChangeFeed(client)
        self.alias = alias or Alias(".")
        self.build: IndexBuild | None = None  # the index being built beside the serving one
        self.replaced: ModelIdentity | None = None  # the model of the index the last switch replaced
        self.advance_asked = 0.0  # when an `advance_build` was queued and not handled yet (0: none is)
        self.lock_file: TextIO | None = None  # the index folder's lock, when the indexes are below it
        self.on_change: Callable[[], None] = lambda: None  # tells the heartbeat to publish the new item count
        self.switching = threading.Lock()  # a heartbeat shows the index before a switch or after it, never neither
        self._serve(model, store)

    def _serve(self, model: EmbeddingModel, store: DurableIndex) -> None:
        """Answer reads from `store` and publish its changes: the serving index from now on."""
        self.model, self.store = model, store
        self.reader = IndexReader(store, usable=lambda: store.mismatch)
        self.reader.calibration = calibrations.stored_with(store)  # each index has its own, or none
        store.on_logged = lambda changes: self.feed.publish(changes, store.wal, store.snapshot_seq)
        store.on_snapshot = lambda name: self.feed.mark_snapshot(name, store.seq, _reduced_to(store), store.index_id)

    @classmethod
    def open(cls, settings: Settings, client: redis.Redis) -> IndexOwner:
        """Take the index folder's lock, open the index the alias names (and the one being built, if any)."""
        settings.index_dir.mkdir(parents=True, exist_ok=True)
        lock_file = take_lock(settings.index_dir)
        try:
            alias = alias_for_owner(settings.index_dir)
            model, store = open_index(settings, alias.serving)
            owner = cls(settings, model, store, client, alias)
            if model.path.resolve() != settings.model.resolve():
                log.warning(
                    "the serving index belongs to model %s, not LOOKALIKE_MODEL %s; `lookalike index build --model` "
                    "builds an index of another model and switches to it",
                    model.path,
                    settings.model,
                )
        except BaseException:
            lock_file.close()
            raise
        owner.lock_file = lock_file
        owner.publish_checksums()
        restarted = owner.feed.catch_up(store.wal, store.seq, store.snapshot_seq)
        if restarted and store.mismatch is None:
            # Replicas hold changes this index never had (it came back from a backup): a new id makes them reload.
            store.index_id = uuid.uuid4().hex
            store.snapshot()  # announced in the feed, as every snapshot from now on
        elif store.snapshot_seq == store.seq:  # maybe written at start (a new model identity, a PCA fitted)
            owner.feed.mark_snapshot(store.snapshot_name(), store.seq, _reduced_to(store), store.index_id)
        owner.publish_serving()
        if alias.building is not None:
            owner._resume_build()
        return owner

    def publish_serving(self) -> None:
        """Tell the embed workers and query processes which model the serving index belongs to."""
        serving = {
            "index_id": self.store.index_id,
            "model": str(self.model.path),
            "model_sha256": self.model.sha256,
            "resize": self.store.identity.resize,
        }
        self.redis.set(keys.SERVING, json.dumps(serving))
        calibrations.publish(self.redis, self.store.index_id, self.reader.calibration)

    def calibrate(self, calibration: dict[str, Any]) -> dict[str, Any]:
        """Store a calibration with the serving index (refused when fitted for other vectors), used by every reader."""
        try:
            fitted = calibrations.store_with(self.store, calibration)
        except calibrations.CalibrationRefused as error:
            return {"error": item_error(error.code, str(error))}
        self.reader.calibration = fitted
        self.publish_serving()
        self.on_change()
        return {"index_id": self.store.index_id, "calibration": fitted.summary()}

    def publish_checksums(self) -> None:
        """Tell embed workers what the index holds, so a re-run load skips unchanged items."""
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.CHECKSUMS)
            pending = {}
            for item_id, item in self.store.index.items.items():
                pending[item_id] = item.checksum
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
        """Log, apply and report a batch of upserts and deletes from the embed workers: to the serving index, or
        to the one being built when the batch is one of its rounds'."""
        if self.build is not None and self.build.owns(job_id):
            return self._apply_to(self.build.store, job_id, messages)
        outdated = self._embedded_for_the_replaced_index(job_id, messages)
        if outdated:
            messages = [message for message in messages if message["id"] not in outdated]
        outcome = self._apply_to(self.store, job_id, messages, serving=True)
        return {**outcome, **({"embedding_again": len(outdated)} if outdated else {})}

    def _apply_to(
        self, store: DurableIndex, job_id: str | None, messages: list[dict[str, Any]], serving: bool = False
    ) -> dict[str, int]:
        identity = store.identity
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
            if message["op"] == "upsert" and not _vectors_of(message) and message["id"] not in store.index
        }
        foreign = {**vanished, **foreign}
        try:
            changes = [_change(message) for message in messages if message["id"] not in foreign]
            store.apply(changes)
        except Exception as error:
            # Nothing is acknowledged as indexed: every item of the batch is reported failed, with the reason,
            # so that the load still finishes instead of waiting for items no one will index.
            log.exception("refused %d changes: %s", len(messages), error)
            failed = {message["id"]: item_error(_refusal_code(error), str(error)) for message in messages}
            if job_id:
                self.jobs.record(job_id, errors=failed)
            return {"applied": 0, "failed": len(failed)}
        if serving:
            self._update_checksums(changes)
            self._also_to_the_build(changes)
            self.on_change()
        if job_id:
            if changes and serving:  # before the items are counted: a finished load says which change to wait for
                self.jobs.note_seq(job_id, store.seq)
            self.jobs.record(job_id, done=[change.id for change in changes], errors=foreign)
        return {"applied": len(changes), "failed": len(foreign)}

    def _also_to_the_build(self, changes: list[Change]) -> None:
        if self.build is not None and changes:
            self.build.take(changes, self.store)

    def _embedded_for_the_replaced_index(self, job_id: str | None, messages: list[dict[str, Any]]) -> set[str]:
        """Upserts a load embedded with the model of the index just replaced (it read them before the switch):
        sent to be embedded again with the serving model, for the same job, instead of failing."""
        replaced = self.replaced
        if replaced is None or not job_id:
            return set()
        again = [
            reference
            for message in messages
            if message["op"] == "upsert"
            and (message.get("model_sha256"), message.get("resize")) == (replaced.sha256, replaced.resize)
            and (reference := reference_of(message["id"], _item(message)))
        ]
        if again:
            current_app.send_task(Task.EMBED_BATCH, args=[job_id, again, str(self.model.path)])
            log.info("load %s: %d items embedded for the replaced index go to be embedded again", job_id, len(again))
        return {reference["id"] for reference in again}

    def delete(self, ids: Iterable[str]) -> dict[str, int]:
        """Delete the items the index holds; `seq` is the change a read can wait for to see them gone."""
        present = [item_id for item_id in ids if item_id in self.store.index]
        if present:
            changes = [Change(op="delete", id=item_id) for item_id in present]
            self.store.apply(changes)
            self._update_checksums(changes)
            self._also_to_the_build(changes)
            self.on_change()
        return {"deleted": len(present), "seq": self.store.seq}

    # building beside, switching, rolling back -------------------------------------------------------------------

    def build_index(self, model_file: str | None, allow_missing: int = 0) -> dict[str, Any]:
        """Start building an index of `model_file` (default: the serving model, with today's settings) beside the
        serving one; it is switched in when complete, unless more than `allow_missing` of the serving items could
        not be carried over. Asked again for the build under way, it tries every item anew with that allowance."""
        build = self.build
        if build is not None:
            again = model_file is None or Path(model_file).resolve() == Path(build.record.model).resolve()
            if not again:
                message = f"index {build.index_id} of {build.record.model} is being built; wait for it or delete it"
                return {"error": item_error(ErrorCode.BAD_PARAMETER, message)}
            build.try_again(allow_missing)
            if build.round_over():
                build.next_round(self.store)
            self.on_change()
            return {"index_id": build.index_id, "model": build.record.model, "job": build.record.jobs[-1]}
        try:
            build = IndexBuild.begin(self.settings, self.jobs, Path(model_file) if model_file else self.model.path,
                                     self.store, self._save_alias, allow_missing)  # fmt: skip
        except (ModelError, LookalikeError, OSError) as error:
            return {"error": item_error(ErrorCode.BAD_PARAMETER, str(error))}
        self.build, self.alias.building = build, build.record
        build.next_round(self.store)
        self.on_change()  # the heartbeat shows the build at once
        log.info("building index %s of %s beside %s", build.index_id, build.model.path, self.store.index_id)
        return {"index_id": build.index_id, "model": str(build.model.path), "job": build.record.jobs[-1]}

    def _resume_build(self) -> None:
        """After a restart: open the index being built again and go on with what it lacks, in a new round."""
        record = self.alias.building
        try:
            self.build = IndexBuild.resume(self.settings, self.jobs, record, self.store, self._save_alias)
        except (ModelError, LookalikeError, OSError) as error:
            log.error("the index being built in %s can't be opened (%s): the build is given up", record.folder, error)
            self.alias.building = None
            self._save_alias()
            return
        self.build.next_round(self.store)
        log.info("index %s: the build goes on, round %d", self.build.index_id, len(record.jobs))

    def advance_build(self) -> dict[str, Any]:
        """When the build's round is over: another round with what the index still lacks, or the switch."""
        self.advance_asked = 0.0
        build = self.build
        if build is None:
            return {"building": None}
        if not build.round_over():
            return {"building": build.index_id, "round": len(build.record.jobs)}
        build.count_failures()
        if build.next_round(self.store):
            return {"building": build.index_id, "round": len(build.record.jobs)}
        stopped = bool(build.missing)
        missing = build.carry_over(self.store)
        if build.missing:
            if not stopped:
                self.on_change()
                log.error("index %s is not switched in: %d serving items could not be carried over (%s); put their "
                          "photos back and build again, or build again with --allow-missing %d", build.index_id,
                          len(missing), ", ".join(sorted(missing)[:5]), len(missing))  # fmt: skip
            return {"building": build.index_id, "round": len(build.record.jobs), "missing": len(missing)}
        build.complete(self.store)
        if missing:
            log.warning("index %s is switched in without %d items (allowed: %d): %s", build.index_id, len(missing),
                        build.record.allow_missing, ", ".join(sorted(missing)))  # fmt: skip
        switched = self._switch_to(build.model, build.store, previous=self.alias.serving)
        return {**switched, "dropped": sorted(missing)}

    def reproject(self, job_id: str, ids: list[str]) -> dict[str, int]:
        """A re-projection batch of the build's round (one of a build deleted since changes nothing)."""
        if self.build is None or not self.build.owns(job_id):
            return {"reprojected": 0, "left": len(ids)}
        return self.build.reproject(job_id, ids, self.store)

    def _save_alias(self) -> None:
        write_alias(self.settings.index_dir, self.alias)

    def _switch_to(self, model: EmbeddingModel, store: DurableIndex, previous: str) -> dict[str, Any]:
        """Serve `store` from now on, in one step for readers; the index it replaces is kept for a rollback."""
        with self.switching:
            replaced = self._switch_serving(model, store, previous)
        self.on_change()
        log.info("switched to index %s (%s, %d items, change %d); %s is kept for a rollback", store.index_id,
                 model.path.name, len(store.index), store.seq, replaced.index_id)  # fmt: skip
        return {"serving": store.index_id, "model": str(model.path), "seq": store.seq, "previous": replaced.index_id}

    def _switch_serving(self, model: EmbeddingModel, store: DurableIndex, previous: str) -> DurableIndex:
        replaced = self.store
        store.continue_after(replaced.seq)
        self.alias = Alias(serving=self._folder_of(store), previous=previous)
        write_alias(self.settings.index_dir, self.alias)  # the switch: a restart from here on serves `store`
        self.build = None
        self.replaced = replaced.identity
        self._serve(model, store)
        self.feed.published = max(self.feed.published, store.seq)  # the snapshot holds every change before it
        self.feed.mark_snapshot(store.snapshot_name(), store.seq, _reduced_to(store), store.index_id)
        self.publish_checksums()
        self.publish_serving()
        replaced.on_logged, replaced.on_snapshot = (lambda changes: None), (lambda name: None)  # off the feed now
        replaced.close()
        return replaced

    def rollback(self) -> dict[str, Any]:
        """Serve the index the last switch replaced again (writes made since are not in it: load again)."""
        if self.alias.building is not None:
            message = "an index is being built: delete it (`lookalike index delete`) before rolling back"
            return {"error": item_error(ErrorCode.BAD_PARAMETER, message)}
        previous = self.alias.previous
        if previous is None or manifest(self.settings.index_dir / previous) is None:
            return {"error": item_error(ErrorCode.NOT_FOUND, "there is no previous index to roll back to")}
        model, store = open_index(self.settings, previous)
        return self._switch_to(model, store, previous=self.alias.serving)

    def delete_index(self, index_id: str) -> dict[str, Any]:
        """Delete a kept index, or the one being built (which ends its build); never the serving one."""
        folder = find_folder(self.settings.index_dir, index_id)
        if folder is None:
            return {"error": item_error(ErrorCode.NOT_FOUND, f"no index {index_id!r} (see `lookalike index list`)")}
        if folder == self.alias.serving:
            return {"error": item_error(ErrorCode.BAD_PARAMETER, f"index {index_id} is serving: switch first")}
        if self.build is not None and self.build.record.folder == folder:
            self.build.end("the index being built was deleted")
            self.build = self.alias.building = None
        if self.alias.previous == folder:
            self.alias.previous = None
        self._save_alias()
        remove_index(self.settings.index_dir, folder)
        return {"deleted": index_id, "folder": folder}

    def build_progress(self) -> dict[str, Any] | None:
        """The index being built, as /healthz shows it, or None."""
        return self.build.progress(self.store) if self.build is not None else None

    def _folder_of(self, store: DurableIndex) -> str:
        return store.directory.relative_to(self.settings.index_dir).as_posix()

    def snapshot(self) -> None:
        """A snapshot now (a replica that found changes missing from the feed asked for one)."""
        if self.store.mismatch is None and self.store.seq != self.store.snapshot_seq:
            self.store.snapshot()

    def _update_checksums(self, changes: list[Change]) -> None:
        with self.redis.pipeline() as pipe:
            for change in changes:
                item = self.store.index.items.get(change.id)
                if item is None:
                    pipe.hdel(keys.CHECKSUMS, change.id)
                else:
                    pipe.hset(keys.CHECKSUMS, change.id, item.checksum)
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
            for hit in index.search(index.vectors(item_id), k, exclude=(item_id,)):
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
        with self.switching:
            return self._heartbeat()

    def _heartbeat(self) -> dict[str, Any]:
        status = self.status()
        fields = ("items", "photos", "model", "model_sha256", "resize", "mismatch", "pca", "seq", "index_id",
                  "snapshot")  # fmt: skip
        calibration = self.reader.calibration.summary() if self.reader.calibration else None
        return {**{key: status[key] for key in fields}, "building": self.build_progress(), "calibration": calibration,
                **self.reader.filterable()}  # fmt: skip

    def close(self) -> None:
        try:
            self.store.close()
            if self.build is not None:
                self.build.store.close()
        finally:
            if self.lock_file is not None:
                self.lock_file.close()


def _change(message: dict[str, Any]) -> Change:
    """An embed worker's upsert (or delete) as the log keeps it."""
    vectors = _vectors_of(message)
    return Change(
        op=message["op"],
        id=message["id"],
        metadata=message.get("metadata"),
        photos=_item(message).photos if message["op"] == "upsert" else [],
        metadata_sha256=message.get("metadata_sha256"),
        vectors=np.stack([decode_vector(vector) for vector in vectors]) if vectors else None,
    )


def _vectors_of(message: dict[str, Any]) -> list[str]:
    """An upsert's vectors (base64), a photo each; none for new metadata alone. One sent before products had
    several photos has its one vector by itself."""
    return message.get("vectors") or ([message["vector"]] if message.get("vector") else [])


def _item(message: dict[str, Any]) -> Item:
    """The product an embed worker's upsert describes (one sent before products had several photos has one)."""
    metadata = message.get("metadata") or {}
    listed = message.get("photos") or [{"sha256": message.get("image_sha256"), "image": metadata.get("image")}]
    photos = [Photo(photo["sha256"], photo["image"]) for photo in listed]
    return Item(metadata, photos, message.get("metadata_sha256"))


def _refusal_code(error: Exception) -> ErrorCode:
    if isinstance(error, ModelMismatch):
        return ErrorCode.MODEL_MISMATCH
    if isinstance(error, OSError):
        return ErrorCode.INDEX_UNWRITABLE  # disk full, read-only folder: nothing was logged, nothing acknowledged
    return ErrorCode.INDEX_ERROR


def _reduced_to(store: DurableIndex) -> int:
    return store.projection.dimension if store.projection else 0
