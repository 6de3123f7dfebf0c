"""The typed client: what the web, the commands and the tests ask of lookalike, through the queues only."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from common.areas import id_problem
from common.errors import ErrorCode, LookalikeError
from common.images import Crop, check_size
from common.products import PHOTOS_AREA, ProductError, check_metadata, check_photo_count, keep_photo
from common.settings import Settings
from common.vectors import AVERAGE_VECTOR, STRATEGIES
from protocol.celery_app import create_celery
from protocol.connection import redis_client
from protocol.jobs import FINISHED, Jobs, item_error
from protocol.queues import Task
from protocol.readers import ask_reader, latest_change

ANSWER_KEYS = ("hits", "close_match", "threshold")  # of a similar-items read; not who answered, nor its seq
MAX_SEARCH_PHOTOS = 16  # photos in one search (through the web: together within LOOKALIKE_MAX_UPLOAD)
MAX_EXAMPLES = 16  # positive and negative examples of one recommendation, ids and photos together
PROGRESS_SECONDS = 0.5  # how often a waiting client re-reads progress; a finished job wakes it at once


class ReadError(LookalikeError):
    """An index reader refused a read (the index is behind the change asked for, or holds another model's
    vectors), with the stable code of why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)


class Client:
    """Jobs (loads, searches, near-duplicate reports) are queued and followed; reads are answered at once, by a
    replica or the index owner (`protocol.readers`).

    `timeout` bounds every wait on Redis and on an answer. A read may carry `min_seq`, the sequence number a
    write answered with: it is then answered by a reader that holds that change ("read your writes").
    """

    def __init__(self, settings: Settings, celery: Celery | None = None, timeout: float = 10) -> None:
        self.settings = settings
        self.celery = celery or create_celery(settings)
        self.timeout = timeout
        self.jobs = Jobs.for_settings(redis_client(settings, timeout), settings)

    # jobs: an id at once, the outcome in the job's record -------------------------------------------------------

    def start_load(self, source: str | Path, metadata_csv: str | Path | None = None) -> str:
        """Queue a catalogue load: a CSV, a folder of images, a tar archive or a styles.csv + images/ folder."""
        params = {"source": str(source), "metadata": str(metadata_csv) if metadata_csv else None}
        job_id = self.jobs.create("load", params)
        self._enqueue(job_id, Task.PLAN_LOAD, params["source"], params["metadata"])
        self.jobs.confirm_replicated()
        return job_id

    def search(
        self,
        image: bytes | list[bytes],
        k: int = 5,
        filters: dict[str, str] | None = None,
        preview: bytes | None = None,
        min_seq: int = 0,
        crop: Crop | None = None,
    ) -> str:
        """Queue a search (of the part `crop` names, when given); `preview` (a small JPEG of the query) is kept with
        the job for pages to show. A list of photos is one search of each, in one job: its result is `results`, an
        answer for each photo in order (hits, or that photo's error)."""
        photos = image if isinstance(image, list) else [image]
        if not 0 < len(photos) <= MAX_SEARCH_PHOTOS:
            raise LookalikeError(f"a search takes 1 to {MAX_SEARCH_PHOTOS} photos, not {len(photos)}")
        params = {"k": k, "filters": filters or {}} | ({"photos": len(photos)} if isinstance(image, list) else {})
        encoded = self._search_photos(photos, min_seq)
        crop_box = list(crop) if crop else None
        return self._queue_search(
            params, preview, encoded if isinstance(image, list) else encoded[0], min_seq, crop_box
        )

    def recommend(
        self,
        positive: list[str | bytes],
        negative: list[str | bytes] | None = None,
        k: int = 5,
        filters: dict[str, str] | None = None,
        strategy: str = AVERAGE_VECTOR,
        preview: bytes | None = None,
        min_seq: int = 0,
    ) -> str:
        """Queue a recommendation: the k products most like the `positive` examples and least like the `negative`
        ones, each a product's id (str: all its photos) or a photo (bytes); none of the products named is answered.
        Its result is a search's: `hits`."""
        negative = negative or []
        if not positive:
            raise LookalikeError("a recommendation needs at least one positive example")
        if len(positive) + len(negative) > MAX_EXAMPLES:
            raise LookalikeError(
                f"a recommendation takes at most {MAX_EXAMPLES} examples, not {len(positive) + len(negative)}"
            )
        if strategy not in STRATEGIES:
            raise LookalikeError(f"strategy {strategy!r} is none of {', '.join(STRATEGIES)}")
        photos = [example for example in [*positive, *negative] if isinstance(example, bytes)]
        places = iter(range(len(photos)))

        def named(examples: list[str | bytes]) -> list[dict[str, Any]]:
            return [{"photo": next(places)} if isinstance(example, bytes) else {"id": example} for example in examples]

        examples = {"positive": named(positive), "negative": named(negative), "strategy": strategy}
        encoded = self._search_photos(photos, min_seq)
        return self._queue_search({"k": k, "filters": filters or {}, **examples}, preview, encoded, min_seq, None,
                                  examples)  # fmt: skip

    def _search_photos(self, photos: list[bytes], min_seq: int) -> list[str]:
        """A search's photos, checked and encoded as its message carries them."""
        for photo in photos:
            check_size(photo, self.settings.max_upload)
        self.check_min_seq(min_seq)
        return [base64.b64encode(photo).decode() for photo in photos]

    def _queue_search(self, params: dict[str, Any], preview: bytes | None, *arguments: Any) -> str:
        """A search job, and its message to the query processes: (images, k, filters, min_seq, crop[, examples])."""
        job_id = self.jobs.create("search", params, preview)
        images, min_seq, *rest = arguments
        # A search no worker took in time is failed by its job record; its message must not run later for no one.
        self._enqueue(job_id, Task.SEARCH_IMAGE, images, params["k"], params["filters"], min_seq, *rest,
                      expires=self.settings.search_timeout)  # fmt: skip
        return job_id

    def find_duplicates(self, threshold: float, k: int) -> str:
        """Queue a near-duplicate report over the whole index (walked in chunks between searches)."""
        job_id = self.jobs.create("duplicates", {"threshold": threshold, "k": k})
        self._enqueue(job_id, Task.FIND_DUPLICATES, threshold, k)
        return job_id

    def put_item(self, item_id: str, photos: list[bytes], metadata: dict[str, Any] | None = None) -> str:
        """Add or replace one product: its photos (the first the main one; any it had before and lacks here are no
        longer its own) and its metadata (field -> text), as a load of that one product; returns the job's id.

        The photos are kept by their content (`common.products.keep_photo`), so the same product sent twice writes
        nothing new and changes nothing in the index; the job's `seq` is then the change that holds it. Each photo's
        size and header are checked here (ImageError); decoding it whole first is the caller's (`check_photo`)."""
        if problem := id_problem(item_id):
            raise ProductError(problem)
        check_photo_count(len(photos), self.settings)
        fields = check_metadata(metadata or {})
        kept = [keep_photo(self.settings, data) for data in photos]
        message = {"id": item_id, "photos": [{"area": PHOTOS_AREA, "path": path} for path in kept], "metadata": fields}
        # A load of one product, planned here: its total is known and its one message goes straight to an embed
        # worker; remembered, so that the load watchdog queues it again should the message be lost.
        job_id = self.jobs.create("load", {"item": item_id, "photos": len(kept)})
        self.jobs.remember_items(job_id, [message])
        self.jobs.start(job_id)  # before its total: a job that stayed `queued` could never be closed by its item
        self.jobs.set_total(job_id, 1)
        self._enqueue(job_id, Task.EMBED_BATCH, [message])
        self.jobs.confirm_replicated()
        return job_id

    def follow(
        self, job_id: str, timeout: float | None = None, on_update: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Follow the job record until it is finished (or `timeout` seconds pass); returns the finished record.
        A lost connection to Redis (a restart, a failover) is waited out within the timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                job = self.jobs.get(job_id, error_limit=0)  # counters only: sorting every item error is for the end
            except redis.ConnectionError:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                time.sleep(PROGRESS_SECONDS)
                continue
            if job is None:
                raise LookalikeError(f"job {job_id} does not exist (expired?)")
            if on_update:
                on_update(job)
            if job["state"] in FINISHED:
                return self.jobs.get(job_id) or job
            if deadline is not None and time.monotonic() > deadline:
                raise LookalikeError(
                    f"job {job_id} is still {job['state']} after {timeout:.0f} s; is a worker running?"
                )
            with contextlib.suppress(redis.ConnectionError):  # the next read waits it out
                self.jobs.wait_until_finished(job_id, PROGRESS_SECONDS)

    # reads, answered by any index reader -----------------------------------------------------------------------

    def get_item(self, item_id: str, min_seq: int = 0) -> dict[str, Any] | None:
        """The item and its metadata; None when the index has no such item."""
        self.check_min_seq(min_seq)
        return self._read(Task.GET_ITEM, item_id, min_seq).get("item")

    def similar(
        self, item_id: str, k: int = 5, filters: dict[str, str] | None = None, min_seq: int = 0
    ) -> dict[str, Any] | None:
        """'More like this': the item's neighbours (`hits`), the item left out, and when the index is calibrated the
        verdict on them (`close_match`, `threshold`); None when the index has no such item."""
        self.check_min_seq(min_seq)
        answer = self._read(Task.SIMILAR_ITEMS, item_id, k, filters or {}, min_seq)
        return None if "error" in answer else {key: answer[key] for key in ANSWER_KEYS if key in answer}

    def stats(self, min_seq: int = 0, digest: bool = False) -> dict[str, Any]:
        """The reader's figures: items, dimension, model, sequence number, who answered, ...; with `digest`, a
        sha256 of every item and vector it holds (slow on a large index: for comparing readers)."""
        self.check_min_seq(min_seq)
        return self._read(Task.INDEX_STATS, min_seq, digest)["stats"]

    def check_min_seq(self, min_seq: int) -> None:
        """Refuse (ReadError `bad_parameter`) a `min_seq` past every change the owner made: no reader could ever
        answer it, and one that waited for it would hold up the reads behind it."""
        latest = latest_change(self.jobs.redis) if min_seq else None
        if latest is not None and min_seq > latest:
            raise ReadError(
                ErrorCode.BAD_PARAMETER,
                f"min_seq {min_seq} is no change the index has made (the latest is {latest}): pass the seq a write "
                "answered with",
            )

    def _read(self, task: Task, *args: Any) -> dict[str, Any]:
        """A read's answer; an error other than `not_found` is raised as ReadError."""
        settings = self.settings
        patience = min(settings.read_timeout, self.timeout)
        answer = ask_reader(self.celery, self.jobs.redis, task, list(args), self.timeout, settings.max_lag, patience)
        error = answer.get("error")
        if error and error["code"] != ErrorCode.NOT_FOUND:
            raise ReadError(error["code"], error["message"])
        return answer

    # writes, applied by the index owner -------------------------------------------------------------------------

    def delete(self, ids: list[str]) -> dict[str, int]:
        """Delete items: how many the index held (`deleted`), and the sequence number a read can wait for (`seq`).
        Unlike a read it never expires: when this raises celery's TimeoutError the delete is still queued."""
        result = self.celery.send_task(Task.DELETE_ITEMS, args=[ids])  # no expiry: a write stays queued
        try:
            return result.get(timeout=self.timeout)
        finally:
            result.forget()

    def build_index(self, model_file: str | None = None, allow_missing: int = 0) -> dict[str, Any]:
        """Start building an index of `model_file` (default: the serving model) beside the serving one, switched
        in when complete unless more than `allow_missing` serving items could not be carried over: its `index_id`,
        `model` and first round's `job`. Asked again for the build under way, every item is tried anew."""
        return self._ask_owner(Task.BUILD_INDEX, model_file, allow_missing)

    def rollback_index(self) -> dict[str, Any]:
        """Serve the index the last switch replaced again: `serving`, `model`, `seq`, `previous`."""
        return self._ask_owner(Task.ROLLBACK_INDEX)

    def delete_index(self, index_id: str) -> dict[str, Any]:
        """Delete a kept index, or the one being built: `deleted`, `folder`."""
        return self._ask_owner(Task.DELETE_INDEX, index_id)

    def calibrate_index(self, calibration: dict[str, Any]) -> dict[str, Any]:
        """Store a calibration (`lookalike evaluate --calibrate`) with the serving index: `index_id`, `calibration`
        (its thresholds); refused (ReadError `model_mismatch`) when it was fitted for other vectors than the index's."""
        return self._ask_owner(Task.CALIBRATE_INDEX, calibration)

    def _ask_owner(self, task: Task, *args: Any) -> dict[str, Any]:
        """The owner's answer; one with an `error` is raised as ReadError."""
        result = self.celery.send_task(task, args=list(args))
        try:
            answer = result.get(timeout=self.timeout)
        finally:
            result.forget()
        if "error" in answer:
            raise ReadError(answer["error"]["code"], answer["error"]["message"])
        return answer

    # messages --------------------------------------------------------------------------------------------------

    def _enqueue(self, job_id: str, task: Task, *args: Any, expires: float | None = None) -> None:
        try:
            # ignore_result: the job record tells
            self.celery.send_task(Task(task), args=[job_id, *args], ignore_result=True, expires=expires)
        except Exception as error:  # a job no message will ever finish must not stay "queued"
            message = f"the job could not be queued: {error}"
            self.jobs.fail(job_id, item_error(ErrorCode.ENQUEUE_FAILED, message))
            raise
