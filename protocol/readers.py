"""Which index reader answers a read: a replica that keeps up with the owner (queue `read`), else the owner itself
(queue `search`); a reader that does not answer in time, or is behind the change the read waits for, is passed
over for the other."""

from __future__ import annotations

import time
from typing import Any

import celery.exceptions
import redis
from celery import Celery

from common.errors import ErrorCode
from protocol import keys
from protocol.heartbeats import Role, alive
from protocol.queues import READS, Queue, Task


class NoReaderAnswered(celery.exceptions.TimeoutError):
    """Neither a replica nor the owner answered within the time given."""


def keeping_up(client: redis.Redis, max_lag: float) -> list[dict[str, Any]]:
    """The replicas alive now that are at most `max_lag` seconds behind the owner."""
    return [beat for beat in alive(client, Role.REPLICA) if beat.get("lag_seconds", float("inf")) <= max_lag]


def latest_change(client: redis.Redis) -> int | None:
    """The owner's last sequence number as Redis knows it (the change feed's last entry, the owner's heartbeat), or
    None when neither tells. A write answers only once its change is in the feed, so no write answered a later one."""
    last = client.xrevrange(keys.CHANGES, count=1)
    known = [int(last[0][0].split(b"-")[0])] if last else []
    known += [beat["seq"] for beat in alive(client, Role.INDEX) if isinstance(beat.get("seq"), int)]
    return max(known, default=None)


def reader_queues(client: redis.Redis, max_lag: float) -> tuple[Queue, Queue]:
    """The queue to ask first, and the one to ask when that one does not answer."""
    if keeping_up(client, max_lag):
        return Queue.READ, Queue.SEARCH
    return Queue.SEARCH, Queue.READ


def ask_reader(
    app: Celery, client: redis.Redis, task: Task, args: list[Any], timeout: float, max_lag: float, patience: float
) -> Any:
    """Send a read and return its answer, asking the other kind of reader after `patience` seconds without one (or
    on a `behind` answer), until `timeout` seconds have passed: then the last `behind` answer, or NoReaderAnswered."""
    if task not in READS:
        raise ValueError(f"{task} is not a read")
    deadline = time.monotonic() + timeout
    queues = reader_queues(client, max_lag)
    attempt, behind = 0, None
    while (left := deadline - time.monotonic()) > 0:
        wait = min(patience, left)
        # The message expires with the wait: a reader that finds it later must not answer it to no one.
        result = app.send_task(task, args=args, queue=queues[attempt % 2], expires=wait)
        attempt += 1
        try:
            answer = result.get(timeout=wait, disable_sync_subtasks=False)
        except (celery.exceptions.TimeoutError, celery.exceptions.TaskRevokedError):
            continue  # no answer in time, or the message expired before a reader took it: ask the other kind
        finally:
            result.forget()
        if isinstance(answer, dict) and answer.get("error", {}).get("code") == ErrorCode.BEHIND:
            behind = answer
            continue
        return answer
    if behind is not None:
        return behind
    raise NoReaderAnswered(f"no index reader answered {task} within {timeout:.0f} s")
