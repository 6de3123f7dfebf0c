"""Submitting work and following it: what the CLI and the web do, through the queue only."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import LookalikeError
from common.images import check_size
from common.settings import Settings
from worker.celery_app import make_celery
from worker.jobs import FINISHED, Jobs, item_error, redis_client

PROGRESS_SECONDS = 0.5  # how often a waiting client re-reads progress; a finished job wakes it at once


class Client:
    def __init__(self, settings: Settings, redis_timeout: float = 10) -> None:
        self.settings = settings
        self.app = make_celery(settings)
        self.jobs = Jobs(redis_client(settings.redis_url, redis_timeout), settings.search_ttl, settings.search_timeout)

    def submit_load(self, source: str | Path, metadata_csv: str | Path | None = None) -> str:
        params = {"source": str(source), "metadata": str(metadata_csv) if metadata_csv else None}
        job_id = self.jobs.create("load", params)
        self._enqueue(job_id, "plan_load", params["source"], params["metadata"])
        return job_id

    def submit_search(
        self, image: bytes, k: int = 5, filters: dict[str, str] | None = None, preview: bytes | None = None
    ) -> str:
        """Queue a search; `preview` (a small JPEG of the query) is kept with the job for pages to show."""
        check_size(image, self.settings.max_upload)
        job_id = self.jobs.create("search", {"k": k, "filters": filters or {}, "bytes": len(image)}, preview)
        # A search no worker took in time is failed by its job record; its message must not run later for no one.
        expires = self.settings.search_timeout
        self._enqueue(job_id, "search_image", base64.b64encode(image).decode(), k, filters or {}, expires=expires)
        return job_id

    def submit_duplicates(self, threshold: float, k: int) -> str:
        """Queue a near-duplicate report over the whole index (walked in chunks between searches)."""
        job_id = self.jobs.create("duplicates", {"threshold": threshold, "k": k})
        self._enqueue(job_id, "find_duplicates", threshold, k)
        return job_id

    def _enqueue(self, job_id: str, task: str, *args: Any, expires: float | None = None) -> None:
        try:
            # ignore_result: the job record tells
            self.app.send_task(f"lookalike.{task}", args=[job_id, *args], ignore_result=True, expires=expires)
        except Exception as error:  # a job no message will ever finish must not stay "queued"
            self.jobs.fail(job_id, item_error("enqueue_failed", f"the job could not be queued: {error}"))
            raise

    def wait(
        self, job_id: str, timeout: float | None = None, on_update: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Follow the job record until it is finished (or `timeout` seconds pass)."""
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

    def call(self, task: str, *args: Any, timeout: float = 10, expires: bool = True) -> Any:
        """Ask the index owner something and wait for the answer (item lookups, stats, deletes).

        With `expires`, a question no one answered in time is dropped instead of being answered to no one later.
        """
        result = self.app.send_task(f"lookalike.{task}", args=list(args), expires=timeout if expires else None)
        try:
            return result.get(timeout=timeout)
        finally:
            result.forget()
