"""An index built beside the serving one, round by round, until it holds what the serving one holds.

A new model (a new export, INT8, a tuned head, PCA on or off) gets a new index in a folder of its own. Each round
gives it what it still lacks or holds differently (writes made meanwhile, a round cut short by a restart or by lost
messages), as a job of its own: embed batches with the new model through the embed workers, or, where the new
model is the serving (or a kept) index's model followed by a head, re-projection batches that the owner runs
itself on the vectors that index holds (`worker.reprojection`), between its other tasks. When a round leaves
nothing to embed, the rest (deletes, new metadata) is applied and the owner switches to it (`worker.owner`).

A build never makes the catalogue smaller by accident: an item no round could embed (its photo moved, unreadable,
a batch lost BUILD_TRIES times) keeps its vector where the new index can take it (the same model, or a head that
re-projects it); any other stops the build short of the switch, named with why, until the operator puts the photo
back and builds again, or accepts the loss (`allow_missing`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from celery import current_app

from common.errors import ErrorCode
from common.model import EmbeddingModel
from common.settings import Settings
from protocol import keys
from protocol.jobs import FINISHED, Jobs, item_error
from protocol.queues import Task
from worker.aliases import Build, new_folder
from worker.catalog import batches
from worker.index import Item, Photo
from worker.reprojection import Source, find_source
from worker.store import DurableIndex, open_index
from worker.wal import Change
from worker.watchdog import holds_messages

log = logging.getLogger(__name__)

REPROJECT_BATCH = 2000  # items a re-projection task takes: a few hundred milliseconds between two searches
BUILD_TRIES = 2  # rounds an item may fail in (a transient error, a lost batch) before no round tries it again
MISSING_SHOWN = 20  # items the heartbeat names of those a stopped build lacks


class IndexBuild:
    """The index being built: its record in ALIAS (folder, model, the job of each round), its store and model, and
    where it finds vectors to re-project instead of embedding (or None). `save` writes ALIAS again."""

    def __init__(
        self,
        settings: Settings,
        jobs: Jobs,
        record: Build,
        model: EmbeddingModel,
        store: DurableIndex,
        serving: DurableIndex,
        save: Callable[[], None],
    ) -> None:
        self.settings, self.jobs, self.record, self.save = settings, jobs, record, save
        self.model, self.store = model, store
        self.messages_seen = -float("inf")  # when a message of the latest round was last found queued or held
        self.failed_rounds: Counter[str] = Counter()  # item id -> rounds it failed in
        self.failures: dict[str, dict[str, str]] = {}  # item id -> the error of its latest failure
        self.counted: str | None = None  # the round whose failures are counted
        self.missing: dict[str, dict[str, str]] = {}  # what stops the switch: item id -> why no round carried it
        self.source: Source | None = find_source(model, serving, settings.index_dir, settings.hnsw_ef)
        if self.source is not None:
            log.info("index %s re-projects the vectors of index %s", store.index_id, self.source.index_id)

    @classmethod
    def begin(
        cls,
        settings: Settings,
        jobs: Jobs,
        model_file: Path,
        serving: DurableIndex,
        save: Callable[[], None],
        allow_missing: int = 0,
    ) -> IndexBuild:
        """A new index of `model_file` in a new folder (its first round is queued by `next_round`)."""
        folder = new_folder()
        model, store = open_index(settings, folder, model_file)
        record = Build(folder, str(model.path), allow_missing=allow_missing)
        return cls(settings, jobs, record, model, store, serving, save)

    @classmethod
    def resume(
        cls, settings: Settings, jobs: Jobs, record: Build, serving: DurableIndex, save: Callable[[], None]
    ) -> IndexBuild:
        """The build ALIAS names, after a restart: its round was cut short and ends here."""
        model, store = open_index(settings, record.folder, Path(record.model))
        if record.jobs:
            reason = "the index owner restarted; the build goes on in a new round with what the index lacks"
            jobs.fail(record.jobs[-1], item_error(ErrorCode.WORKER_LOST, reason))
        record.missing = 0  # every item is tried anew
        return cls(settings, jobs, record, model, store, serving, save)

    @property
    def index_id(self) -> str:
        return self.store.index_id

    def owns(self, job_id: str | None) -> bool:
        """Whether `job_id` is one of this build's rounds."""
        return job_id in self.record.jobs

    def round_over(self) -> bool:
        """Whether the latest round has finished; one that stalled with none of its messages queued or held (lost
        while a worker died) is ended here, and the next round embeds what it did not."""
        if not self.record.jobs:
            return True
        job_id = self.record.jobs[-1]
        job = self.jobs.get(job_id, error_limit=0)
        if job is None or job["state"] in FINISHED:
            return True
        activity = self.jobs.activity(job_id)
        stall = self.settings.load_stall
        # A round queued behind a long load waits without progress: its messages are looked for once a stall period
        if activity is None or activity.idle_seconds < stall or time.monotonic() - self.messages_seen < stall:
            return False
        if holds_messages(current_app, job_id):
            self.messages_seen = time.monotonic()
            return False
        reason = f"no progress for {activity.idle_seconds:.0f} s and none of its messages queued or held"
        self.jobs.fail(job_id, item_error(ErrorCode.LOST, f"{reason}; the next round embeds what the index lacks"))
        log.warning("index %s: round %d lost its messages (%s); a new round", self.index_id, len(self.record.jobs),
                    reason)  # fmt: skip
        return True

    def count_failures(self) -> None:
        """Once a round is over: count the items it failed to embed, with why (a photo gone or unreadable)."""
        job_id = self.record.jobs[-1] if self.record.jobs else None
        if job_id is None or job_id == self.counted:
            return
        self.counted = job_id
        codes = self.jobs.redis.hgetall(keys.job_key(job_id, keys.FAILED))
        failed = [key.decode() for key in codes if key.startswith(b"i:")]
        messages = self.jobs.redis.hmget(keys.job_key(job_id, keys.ERRORS), failed) if failed else []
        for key, message in zip(failed, messages, strict=True):
            code = codes[key.encode()].decode()
            self.failed_rounds[key[2:]] += 1
            self.failures[key[2:]] = json.loads(message) if message else item_error(code, f"failed with {code}")

    def given_up(self) -> set[str]:
        """The items no round tries again: those that failed in BUILD_TRIES rounds."""
        return {item_id for item_id, rounds in self.failed_rounds.items() if rounds >= BUILD_TRIES}

    def try_again(self, allow_missing: int) -> None:
        """The operator built again (a photo put back, or a loss accepted): every item is tried anew."""
        self.record.allow_missing, self.record.missing = allow_missing, 0
        self.failed_rounds.clear()
        self.missing = {}
        self.save()

    def next_round(self, serving: DurableIndex) -> bool:
        """Queue, as a new round, the items the index lacks or holds another photo of (but those given up); False
        (nothing queued) when there are none."""
        lacking = self.lacking(serving)
        if not lacking and self.record.jobs:
            return False
        job_id = self.jobs.create("build", {"index_id": self.index_id, "model": self.record.model,
                                            "round": len(self.record.jobs) + 1})  # fmt: skip
        self.jobs.redis.persist(keys.job_key(job_id))  # a round runs as long as it must; finished, it expires
        self.record.jobs.append(job_id)
        self.messages_seen = -float("inf")
        self.save()
        self.jobs.start(job_id)
        if not lacking:
            self.jobs.finish(job_id, {"embedded": 0})
            return True
        self.jobs.set_total(job_id, len(lacking))
        source = self.source
        again = [item_id for item_id, item in lacking.items() if source is not None and source.holds(item_id, item)]
        for first in range(0, len(again), REPROJECT_BATCH):
            current_app.send_task(Task.REPROJECT_BATCH, args=[job_id, again[first : first + REPROJECT_BATCH]])
        projected = set(again)
        embed = [reference_of(item_id, item) for item_id, item in lacking.items() if item_id not in projected]
        for batch in batches(embed, self.settings.batch):
            current_app.send_task(Task.EMBED_BATCH, args=[job_id, batch, self.record.model])
        log.info("index %s, round %d: %d items to re-project, %d to embed", self.index_id, len(self.record.jobs),
                 len(again), len(embed))  # fmt: skip
        return True

    def lacking(self, serving: DurableIndex) -> dict[str, Item]:
        """The serving items the index lacks or holds another photo of (those without a photo to embed, and those
        given up, left out)."""
        built = self.store.index.items
        given_up = self.given_up()
        return {
            item_id: item
            for item_id, item in serving.index.items.items()
            if item_id not in given_up
            and ((found := built.get(item_id)) is None or found.photo_digests != item.photo_digests)
            and reference_of(item_id, item)
        }

    def complete(self, serving: DurableIndex) -> None:
        """What is left once nothing needs a vector: new metadata for the same photos, and deletes."""
        built = self.store.index.items
        changes = [
            metadata_change(item_id, item)
            for item_id, item in serving.index.items.items()
            if (found := built.get(item_id)) is not None and found.metadata_sha256 != item.metadata_sha256
        ]
        changes += [Change(op="delete", id=item_id) for item_id in built if item_id not in serving.index]
        self.store.apply(changes)

    def carry_over(self, serving: DurableIndex) -> dict[str, dict[str, str]]:
        """Once no round can embed them: the serving items the index still lacks get a vector it can take (the
        source's re-projected, or the serving index's own where it is of the same model and not reduced by a PCA).
        Returns those still missing, with why; they stop the switch beyond `allow_missing` (`missing` then)."""
        items, built = serving.index.items, self.store.index.items
        absent = [item_id for item_id in items if item_id not in built]
        source = self.source
        carried = [item_id for item_id in absent if source is not None and source.holds(item_id, items[item_id])]
        vectors = list(source.project(carried)) if source is not None and carried else []
        if self.store.identity == serving.identity and serving.projection is None:
            reprojected = set(carried)
            copied = [item_id for item_id in absent if item_id not in reprojected]
            carried, vectors = carried + copied, vectors + [serving.index.vectors(item_id) for item_id in copied]
        if carried:
            self.store.apply(
                [
                    replace(metadata_change(item_id, items[item_id]), vectors=vector)
                    for item_id, vector in zip(carried, vectors, strict=True)
                ]
            )
            log.warning("index %s: %d items no round could embed keep the vector they had", self.index_id, len(carried))
        kept = set(carried)
        missing = {item_id: self._why_missing(item_id, items[item_id]) for item_id in absent if item_id not in kept}
        self.missing = missing if len(missing) > self.record.allow_missing else {}
        self._note_missing()
        return missing

    def _note_missing(self) -> None:
        """Keep in ALIAS how many items stop the switch, for `lookalike index list`."""
        if self.record.missing != len(self.missing):
            self.record.missing = len(self.missing)
            self.save()

    def _why_missing(self, item_id: str, item: Item) -> dict[str, str]:
        if item_id in self.failures:
            return self.failures[item_id]
        if reference_of(item_id, item) is None:
            return item_error(ErrorCode.MISSING_FILE, "the item names no photo to embed with the new model")
        return item_error(ErrorCode.EMBED_FAILED, "no round of the build embedded it")

    def reproject(self, job_id: str, ids: list[str], serving: DurableIndex) -> dict[str, int]:
        """A re-projection batch of a round: the head run on the source's vectors, into the index being built.
        Items changed since the round began are counted and left to the next round."""
        items = serving.index.items
        source = self.source  # None after a restart that no longer finds it: the next round embeds the items
        ready = [item_id for item_id in ids if source and item_id in items and source.holds(item_id, items[item_id])]
        changes = []
        if ready:
            vectors = source.project(ready)
            changes = [
                replace(metadata_change(item_id, items[item_id]), vectors=vector)
                for item_id, vector in zip(ready, vectors, strict=True)
            ]
            self.store.apply(changes)
        self.jobs.record(job_id, done=ids)
        return {"reprojected": len(changes), "left": len(ids) - len(changes)}

    def take(self, changes: list[Change], serving: DurableIndex) -> None:
        """Changes to the serving index that the build can make at once: deletes, and vectors when it belongs to the
        same model (a PCA turned on or off); whatever else it lacks, the next round gives it."""
        same_model = self.store.identity == serving.identity
        copies = [replace(change) for change in changes if change.op == "delete" or same_model]
        try:
            self.store.apply(copies)
        except Exception as error:  # the serving index has the change; the build's next round finds it missing
            log.warning("the index being built did not take %d changes (its next round makes up for them): %s",
                        len(copies), error)  # fmt: skip

    def progress(self, serving: DurableIndex) -> dict[str, Any]:
        """The build as /healthz shows it: its model, its items so far, its round's counts, what it re-projects."""
        job = self.jobs.get(self.record.jobs[-1], error_limit=0) if self.record.jobs else None
        return {
            "index_id": self.index_id,
            "model": Path(self.record.model).name,
            "model_sha256": self.store.identity.sha256,
            "items": len(self.store.index),
            "of": len(serving.index),
            "round": len(self.record.jobs),
            "round_progress": job["progress"] if job else None,
            "reprojects_from": self.source.index_id if self.source else None,
            "allow_missing": self.record.allow_missing,
            "missing": len(self.missing),  # > 0: stopped short of the switch, for the items below
            "missing_items": [
                {"id": item_id, **error} for item_id, error in sorted(self.missing.items())[:MISSING_SHOWN]
            ],
        }

    def end(self, reason: str) -> None:
        """Stop building (the index is deleted): its round fails with `reason`."""
        self.store.close()
        if self.record.jobs:
            self.jobs.fail(self.record.jobs[-1], item_error(ErrorCode.NOT_FOUND, reason))


def reference_of(item_id: str, item: Item) -> dict[str, Any] | None:
    """An indexed product as an embed batch takes it (its photos' areas and paths), or None without a photo."""
    places = [str(photo.image or "").partition("/") for photo in item.photos]  # "area/path"
    photos = [{"area": area, "path": path} for area, _, path in places if path]
    if not photos:
        return None
    return {"id": item_id, "photos": photos, "metadata": {k: v for k, v in item.metadata.items() if k != "image"}}


def metadata_change(item_id: str, item: Item) -> Change:
    """An upsert of a product's metadata for the same photos (no vectors: the index keeps the ones it has)."""
    return Change(
        op="upsert",
        id=item_id,
        metadata=item.metadata,
        photos=[Photo(photo.sha256, photo.image) for photo in item.photos],
        metadata_sha256=item.metadata_sha256,
    )
