"""Messages that no live worker holds any more go back to their queue, long before Redis's visibility timeout.

A message a worker has taken stays in kombu's `unacked` hash until the worker acknowledges it. When the worker
dies (kill -9 of a whole worker, a lost machine) or loses its connection while Redis restarts, no one ever will,
and Redis gives such a message back only after the visibility timeout (three task time limits). So each
worker's main process lists the tasks it holds in a heartbeat, and sweeps: a message delivered before every
live worker's latest list, whose task none of them lists in two sweeps in a row, is an orphan and goes back to
its queue. A task that runs twice changes nothing (upserts by id, job counters by item), so a rare early
give-back costs only time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, signals
from celery.worker import state as worker_state

from common.settings import Settings
from protocol.connection import redis_client
from protocol.heartbeats import Role, alive, forget_heartbeat, start_heartbeat

log = logging.getLogger(__name__)

# Each worker's main process lists what it holds this often, and counts as gone after missing four lists: a
# killed worker's messages are back in their queue about LISTED_WITHIN + 2 x LIST_SECONDS after it died.
LIST_SECONDS = 2
LISTED_WITHIN = 4 * LIST_SECONDS
# After Redis was out of reach, every live worker needs this long to list what it holds again.
SETTLE_SECONDS = LISTED_WITHIN + LIST_SECONDS

# Is the message an orphan? (delivery tag, routing key, task id, when it was delivered)
Verdict = Callable[[bytes, str, str | None, float], bool]


def give_back(app: Celery, orphaned: Verdict) -> set[bytes]:
    """Put every unacknowledged message that `orphaned` picks back on its queue; returns their delivery tags."""
    restored = set()
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        client = channel.client
        delivered = {tag: when for tag, when in client.zrange(channel.unacked_index_key, 0, -1, withscores=True)}
        for tag, raw in client.hgetall(channel.unacked_key).items():
            message, _, routing_key = json.loads(raw)
            task_id = message.get("headers", {}).get("id")
            if orphaned(tag, routing_key, task_id, delivered.get(tag, time.time())):
                channel.qos.restore_by_tag(tag, client)
                restored.add(tag)
    return restored


def watch_for_orphans(app: Celery, settings: Settings) -> None:
    """Once this Celery worker consumes: publish what it holds, and sweep for orphans every few seconds."""
    client = redis_client(settings)  # no patience: a beat is stamped when it is written, not a minute early

    @signals.worker_ready.connect(weak=False)
    def start(**_: object) -> None:
        start_watching(app, client, reserved_task_ids)

    @signals.worker_shutdown.connect(weak=False)
    def stop(**_: object) -> None:
        forget_heartbeat(client, Role.HOLDER)


def start_watching(app: Celery, client: redis.Redis, held: Callable[[], list[str]]) -> None:
    """List the tasks this process holds (`held`: their ids) every LIST_SECONDS, and sweep for orphans."""

    def listing() -> dict[str, Any]:
        listed_at = time.time()  # before the list: a message delivered later is judged only after the next one
        return {"held": held(), "listed_at": listed_at}

    start_heartbeat(client, Role.HOLDER, listing, every=LIST_SECONDS)
    threading.Thread(target=OrphanSweeper(app, client).run, name="orphan-sweep", daemon=True).start()


def reserved_task_ids() -> list[str]:
    """The tasks a Celery worker has taken and not acknowledged."""
    while True:
        try:
            return sorted(request.id for request in list(worker_state.reserved_requests))
        except RuntimeError:  # the consumer changed the set while we copied it
            continue


class OrphanSweeper:
    """Every LIST_SECONDS: give back what stayed orphaned since the previous sweep."""

    def __init__(self, app: Celery, client: redis.Redis) -> None:
        self.app = app
        self.client = client
        self.suspects: set[bytes] = set()
        self.reachable_since = time.monotonic()

    def run(self) -> None:
        while True:
            time.sleep(LIST_SECONDS)
            try:
                self.sweep()
            except redis.RedisError as error:
                self.reachable_since = time.monotonic() + LIST_SECONDS
                log.warning("sweep for orphaned messages failed: %s", error)
            except Exception:
                log.exception("sweep for orphaned messages failed")

    def sweep(self) -> int:
        holders = [beat for beat in alive(self.client, Role.HOLDER, LISTED_WITHIN) if "listed_at" in beat]
        if not holders or time.monotonic() - self.reachable_since < SETTLE_SECONDS:
            self.suspects = set()
            return 0
        judged_before = min(beat["listed_at"] for beat in holders)
        held = {task_id for beat in holders for task_id in beat["held"]}
        suspects: set[bytes] = set()

        def orphaned(tag: bytes, _: str, task_id: str | None, delivered: float) -> bool:
            if delivered < judged_before and task_id not in held:
                suspects.add(tag)
                return tag in self.suspects  # orphaned in the previous sweep as well
            return False

        restored = give_back(self.app, orphaned)
        self.suspects = suspects - restored
        if restored:
            log.warning("gave back %d messages that no live worker holds (a worker died or lost Redis)", len(restored))
        return len(restored)
