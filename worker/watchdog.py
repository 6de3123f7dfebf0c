"""The load watchdog: no load stays `running` for ever.

A message can be lost without any worker noticing: Redis hands it to a worker (`BRPOP`) and the worker dies before
kombu records it as taken (killed while it waited for work, or while frozen). Its items would never be counted.
So the index owner (there is one) looks at the active loads every few seconds: a load whose counts have not moved
for LOOKALIKE_LOAD_STALL seconds while none of its messages is queued or held has lost some. Its missing items are
queued again (upserts are keyed by id: an item that was indexed after all changes nothing), at most REQUEUES
times; then they fail as `lost` and the load ends `partial`. A load whose plan was lost is planned again alike. A
product sent on its own (`PUT /api/items/<id>`) is a load with no plan: its one item is remembered and re-queued
like any other, and one whose record never got that far is failed as `lost`.
Each look also removes the uploads that no unfinished load reads any more, and what killed unpackings left
(`worker.leftovers`).
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from celery import Celery

from common.errors import ErrorCode
from common.settings import Settings
from protocol.jobs import SCAN_CHUNK, Jobs, LoadActivity, item_error
from protocol.queues import Queue, Task
from worker.catalog import batches
from worker.leftovers import remove_leftovers

log = logging.getLogger(__name__)

REQUEUES = 2  # times a stalled load's missing items are queued again before they fail as lost


class LoadWatchdog:
    def __init__(self, app: Celery, jobs: Jobs, settings: Settings) -> None:
        self.app = app
        self.jobs = jobs
        self.settings = settings
        self.stall = settings.load_stall
        self.batch = settings.batch
        self.every = max(1.0, min(settings.load_stall / 5, 30.0))
        self.waiting: dict[str, float] = {}  # load -> when a message of it was last seen waiting (monotonic)

    def start(self) -> None:
        threading.Thread(target=self.run, name="load-watchdog", daemon=True).start()

    def run(self) -> None:
        while True:
            time.sleep(self.every)
            try:
                self.check()
            except redis.RedisError as error:
                log.warning("the load watchdog could not read Redis: %s", error)
            except Exception:  # the watchdog must outlive any one load's oddities
                log.exception("the load watchdog failed")

    def check(self) -> int:
        """Rescue every stalled load, then remove what no unfinished load needs; returns how many were rescued."""
        rescued, sources = 0, []
        active = self.jobs.active_loads()
        self.waiting = {job_id: seen for job_id, seen in self.waiting.items() if job_id in active}
        for job_id in active:
            activity = self.jobs.activity(job_id)
            if activity is None:
                continue
            sources += [activity.params.get("source"), activity.params.get("metadata")]
            if activity.idle_seconds < self.stall:
                continue
            # A load queued behind others waits without progress: its messages are looked for once a stall period.
            if time.monotonic() - self.waiting.get(job_id, -self.stall) < self.stall:
                continue
            if holds_messages(self.app, job_id):
                self.waiting[job_id] = time.monotonic()
                continue
            self.rescue(job_id, activity)
            rescued += 1
        remove_leftovers(self.settings, sources)
        return rescued

    def rescue(self, job_id: str, activity: LoadActivity) -> None:
        if activity.requeued >= REQUEUES:
            self.give_up(job_id, activity)
            return
        if activity.total is None and not activity.params.get("source"):  # a product sent on its own: no plan
            message = "the product was not queued whole (Redis failed on the way?); send it again"
            self.jobs.fail(job_id, item_error(ErrorCode.LOST, message))
            return
        attempt = self.jobs.note_requeued(job_id)
        if activity.total is None:
            source, metadata = activity.params.get("source"), activity.params.get("metadata")
            self.app.send_task(Task.PLAN_LOAD, args=[job_id, source, metadata])
            log.warning("load %s: its plan was lost; planned again (%d of %d)", job_id, attempt, REQUEUES)
            return
        missing = self.jobs.missing_items(job_id)
        for batch in batches(missing, self.batch):
            self.app.send_task(Task.EMBED_BATCH, args=[job_id, batch])
        log.warning(
            "load %s: no progress for %.0f s and none of its messages queued or held; %d missing items queued "
            "again (%d of %d)",
            job_id,
            activity.idle_seconds,
            len(missing),
            attempt,
            REQUEUES,
        )

    def give_up(self, job_id: str, activity: LoadActivity) -> None:
        if activity.total is None:
            message = f"the load's plan was lost {REQUEUES + 1} times; start the load again"
            self.jobs.fail(job_id, item_error(ErrorCode.LOST, message))
            return
        missing = self.jobs.missing_items(job_id)
        message = f"the item's message was lost {REQUEUES + 1} times (workers killed?); load the catalogue again"
        self.jobs.record(job_id, errors={item["id"]: item_error(ErrorCode.LOST, message) for item in missing})
        log.warning("load %s: %d items lost %d times are failed as lost", job_id, len(missing), REQUEUES + 1)
        if self.jobs.activity(job_id) is not None:  # items it can't name (a load planned before it kept them)
            self.jobs.fail(job_id, item_error(ErrorCode.LOST, "some of the load's items were lost; load it again"))


def holds_messages(app: Celery, job_id: str) -> bool:
    """Whether a message of this job waits in a queue or is held by a worker (kombu's unacked hash).

    Celery writes a task's arguments as text in the message's `argsrepr` header, the job id (32 random hex
    digits) first: a raw message that contains it is this job's.
    """
    needle = job_id.encode()
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        client = channel.client
        if any(needle in raw for _, raw in client.hscan_iter(channel.unacked_key, count=SCAN_CHUNK)):
            return True  # the held ones first: a few per worker
        for queue in (Queue.EMBED, Queue.INDEX):  # newest first: a load waiting behind others is found soon
            for start in range(0, client.llen(queue), SCAN_CHUNK):
                if any(needle in raw for raw in client.lrange(queue, start, start + SCAN_CHUNK - 1)):
                    return True
        return False
