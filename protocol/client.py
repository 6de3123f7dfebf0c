"""The typed client: what the web, the commands and the tests ask of lookalike, through the queues only."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery

from common.errors import ErrorCode, LookalikeError
from common.images import check_size
from common.settings import Settings
from protocol.celery_app import create_celery
from protocol.connection import redis_client
from protocol.jobs import FINISHED, Jobs, item_error
from protocol.queues import Task

PROGRESS_SECONDS = 0.5  # how often a waiting client re-reads progress; a finished job wakes it at once


class Client:
    """Jobs (loads, searches, near-duplicate reports) are queued and followed; reads are answered at once.

    `timeout` bounds every wait on Redis and on an answer from the index owner.
    """

    def __init__(self, settings: Settings, celery: Celery | None = None, timeout: float = 10) -> None:
        self.settings = settings
        self.celery = celery or create_celery(settings)
        self.timeout = timeout
        self.jobs = Jobs(redis_client(settings.redis_url, timeout), settings.search_ttl, settings.search_timeout)

    # jobs: an id at once, the outcome in the job's record -------------------------------------------------------

    def start_load(self, source: str | Path, metadata_csv: str | Path | None = None) -> str:
        """Queue a catalogue load: a CSV, a folder of images, a tar archive or a styles.csv + images/ folder."""
        params = {"source": str(source), "metadata": str(metadata_csv) if metadata_csv else None}
        job_id = self.jobs.create("load", params)
        self._enqueue(job_id, Task.PLAN_LOAD, params["source"], params["metadata"])
        return job_id

    def search(
        self, image: bytes, k: int = 5, filters: dict[str, str] | None = None, preview: bytes | None = None
    ) -> str:
        """Queue a search; `preview` (a small JPEG of the query) is kept with the job for pages to show."""
        check_size(image, self.settings.max_upload)
        job_id = self.jobs.create("search", {"k": k, "filters": filters or {}, "bytes": len(image)}, preview)
        # A search no worker took in time is failed by its job record; its message must not run later for no one.
        encoded = base64.b64encode(image).decode()
        self._enqueue(job_id, Task.SEARCH_IMAGE, encoded, k, filters or {}, expires=self.settings.search_timeout)
        return job_id

    def find_duplicates(self, threshold: float, k: int) -> str:
        """Queue a near-duplicate report over the whole index (walked in chunks between searches)."""
        job_id = self.jobs.create("duplicates", {"threshold": threshold, "k": k})
        self._enqueue(job_id, Task.FIND_DUPLICATES, threshold, k)
        return job_id

    def follow(
        self, job_id: str, timeout: float | None = None, on_update: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Follow the job record until it is finished (or `timeout` seconds pass); returns the finished record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.jobs.get(job_id, error_limit=0)  # counters only: sorting every item error is for the end
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
            self.jobs.wait_until_finished(job_id, PROGRESS_SECONDS)

    # reads and deletes, answered by the index owner --------------------------------------------------------------

    def get_item(self, item_id: str) -> dict[str, Any] | None:
        """The item and its metadata; None when the index has no such item."""
        return self._ask(Task.GET_ITEM, item_id)

    def similar(self, item_id: str, k: int = 5, filters: dict[str, str] | None = None) -> list[dict[str, Any]] | None:
        """'More like this': the item's neighbours, the item left out; None when the index has no such item."""
        answer = self._ask(Task.SIMILAR_ITEMS, item_id, k, filters or {})
        return None if "error" in answer else answer["hits"]

    def stats(self) -> dict[str, Any]:
        """The index owner's figures: items, dimension, model, snapshot, sequence number, provider, ..."""
        return self._ask(Task.INDEX_STATS)

    def delete(self, ids: list[str]) -> int:
        """Delete items; returns how many the index held. Unlike a read it never expires: when this raises
        celery's TimeoutError the delete is still queued and will be applied."""
        return self._ask(Task.DELETE_ITEMS, ids, expires=False)["deleted"]

    # messages --------------------------------------------------------------------------------------------------

    def _enqueue(self, job_id: str, task: Task, *args: Any, expires: float | None = None) -> None:
        try:
            # ignore_result: the job record tells
            self.celery.send_task(Task(task), args=[job_id, *args], ignore_result=True, expires=expires)
        except Exception as error:  # a job no message will ever finish must not stay "queued"
            message = f"the job could not be queued: {error}"
            self.jobs.fail(job_id, item_error(ErrorCode.ENQUEUE_FAILED, message))
            raise

    def _ask(self, task: Task, *args: Any, expires: bool = True) -> Any:
        """Send `task` and wait up to `timeout` for its answer; with `expires`, a question no one answered in time
        is dropped instead of being answered to no one later."""
        result = self.celery.send_task(Task(task), args=list(args), expires=self.timeout if expires else None)
        try:
            return result.get(timeout=self.timeout)
        finally:
            result.forget()
