"""Which index reader answers a read: the replicas that keep up with the owner, asked directly (a read pushed to
the `lookalike:reads` list, its answer pushed to a list of its own that the asker blocks on: one hop each way,
no task, no stored result), else the owner itself, through its `search` queue, between its writes. A reader that
does not answer in time, or is behind the change the read waits for, is passed over for the other."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import celery.exceptions
import redis
from celery import Celery

from common.errors import ErrorCode
from protocol import keys
from protocol.heartbeats import RECENT_SECONDS, Role, alive
from protocol.queues import Queue, Task

READS = frozenset({Task.NEAREST, Task.SIMILAR_ITEMS, Task.GET_ITEM, Task.INDEX_STATS})
BLOCK_SECONDS = 0.5  # the longest single blocking pop: shorter than any client's socket time-out (at least 1 s)
ANSWER_SECONDS = 10  # how long an answer no asker took stays in Redis
# Answers that send a read to the other kind of reader: this one is behind the change asked for, or failed on it.
PASSED_OVER = frozenset({ErrorCode.BEHIND, ErrorCode.INDEX_ERROR})


class NoReaderAnswered(celery.exceptions.TimeoutError):
    """Neither a replica nor the owner answered within the time given."""


def keeping_up(client: redis.Redis, max_lag: float, fresh: float = 0.0) -> list[dict[str, Any]]:
    """The replicas alive now that take reads, at most `max_lag` seconds behind the owner (`fresh`: as `alive`)."""
    replicas = alive(client, Role.REPLICA, fresh=fresh)
    return [beat for beat in replicas if beat.get("taking_reads") and beat.get("lag_seconds", float("inf")) <= max_lag]


def latest_change(client: redis.Redis) -> int | None:
    """The owner's last sequence number as Redis knows it (the change feed's last entry, the owner's heartbeat), or
    None when neither tells. A write answers only once its change is in the feed, so no write answered a later one."""
    last = client.xrevrange(keys.CHANGES, count=1)
    known = [int(last[0][0].split(b"-")[0])] if last else []
    known += [beat["seq"] for beat in alive(client, Role.INDEX) if isinstance(beat.get("seq"), int)]
    return max(known, default=None)


def ask_replicas(client: redis.Redis, task: Task, args: list[Any], wait: float) -> Any | None:
    """A read answered by whichever replica takes it first; None when none answered within `wait` seconds (a read
    no replica took is withdrawn, and one taken too late is dropped by its replica: nobody answers to no one)."""
    answer_key = keys.read_answer(uuid.uuid4().hex)
    read = json.dumps({"task": task, "args": args, "answer_to": answer_key, "expires": time.time() + wait})
    client.lpush(keys.READS, read)
    deadline = time.monotonic() + wait
    try:
        while (left := deadline - time.monotonic()) > 0:
            answered = client.brpop([answer_key], timeout=min(left, BLOCK_SECONDS))
            if answered is not None:
                return json.loads(answered[1])
    finally:
        client.lrem(keys.READS, 1, read)  # not taken yet: no replica will (a no-op when one took it)
    return None


def ask_owner(app: Celery, task: Task, args: list[Any], wait: float) -> Any | None:
    """A read answered by the index owner, between its writes; None when it did not answer within `wait` seconds."""
    # The message expires with the wait: an owner that finds it later must not answer it to no one.
    result = app.send_task(task, args=args, queue=Queue.SEARCH, expires=wait)
    try:
        return result.get(timeout=wait, disable_sync_subtasks=False)
    except (celery.exceptions.TimeoutError, celery.exceptions.TaskRevokedError):
        return None  # no answer in time, or the message expired before the owner took it
    finally:
        result.forget()


def ask_reader(
    app: Celery, client: redis.Redis, task: Task, args: list[Any], timeout: float, max_lag: float, patience: float
) -> Any:
    """Send a read and return its answer: to the replicas when one keeps up, else to the owner; the other kind is
    asked after `patience` seconds without an answer (or on a `behind` or `index_error` one), until `timeout`
    seconds have passed: then the last such answer, or NoReaderAnswered."""
    if task not in READS:
        raise ValueError(f"{task} is not a read")
    deadline = time.monotonic() + timeout
    replicas_first = bool(keeping_up(client, max_lag, RECENT_SECONDS))
    attempt, behind = 0, None
    while (left := deadline - time.monotonic()) > 0:
        wait = min(patience, left)
        to_replicas = (attempt % 2 == 0) == replicas_first
        answer = ask_replicas(client, task, args, wait) if to_replicas else ask_owner(app, task, args, wait)
        attempt += 1
        if answer is None:
            continue
        if isinstance(answer, dict) and answer.get("error", {}).get("code") in PASSED_OVER:
            behind = answer
            continue
        return answer
    if behind is not None:
        return behind
    raise NoReaderAnswered(f"no index reader answered {task} within {timeout:.0f} s")
