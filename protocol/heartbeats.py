"""Worker heartbeats in Redis: each process publishes its status; the web's health check reads them."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import redis

from protocol import keys

log = logging.getLogger(__name__)


class Role(StrEnum):
    """What a process is, as its heartbeat says."""

    INDEX = "index"  # the index owner
    REPLICA = "replica"
    EMBED = "embed"
    QUERY = "query"
    HOLDER = "holder"  # a worker's main process: the tasks it has taken and not acknowledged (worker.recovery)


HEARTBEAT_SECONDS = 10
SOONEST_SECONDS = 1  # a woken heartbeat still waits this long after the previous one
ALIVE_SECONDS = 3 * HEARTBEAT_SECONDS  # a process that missed this many seconds of beats counts as gone
RECENT_SECONDS = 1.0  # how old a reading of the beats a check on every request or read may use
FORGET_SECONDS = 10 * ALIVE_SECONDS  # a beat this old is removed by whoever reads the beats (a process killed -9)

# Removes a beat unless it was refreshed since it was read. KEYS: the workers hash. ARGV: (field, beat) pairs.
FORGET_SCRIPT = """
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
"""


def _field(role: str) -> str:
    return f"{role}:{socket.gethostname()}:{os.getpid()}"


def start_heartbeat(
    client: redis.Redis, role: str, status: Callable[[], dict[str, Any]], every: float = HEARTBEAT_SECONDS
) -> threading.Event:
    """Publish this process's status every `every` seconds from a daemon thread; set the event to publish sooner."""
    name = _field(role)
    wake = threading.Event()

    def beat() -> None:
        while True:
            wake.clear()  # before the status is taken: a change made while it is published wakes the next beat
            try:
                seen = time.time()  # before the status is taken: a reader compares it with what it asked since
                payload = {"role": role, "pid": os.getpid(), "host": socket.gethostname(), **status()}
                client.hset(keys.WORKERS, name, json.dumps({**payload, "seen": seen}))
            except redis.RedisError as error:
                log.warning("heartbeat to Redis failed: %s", error)
            except Exception:  # a status callback must never stop the heartbeat
                log.exception("heartbeat status failed")
            time.sleep(min(SOONEST_SECONDS, every))
            wake.wait(max(0.0, every - SOONEST_SECONDS))

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    return wake


def forget_heartbeat(client: redis.Redis, role: str) -> None:
    """A clean stop: this process is gone now, not in ALIVE_SECONDS (unless Redis is away: then it ages out)."""
    try:
        client.hdel(keys.WORKERS, _field(role))
    except redis.RedisError as error:
        log.warning("could not tell Redis this %s process stopped (its heartbeat ages out instead): %s", role, error)


def heartbeats(client: redis.Redis, role: str | None = None, since: float = 0.0) -> list[dict[str, Any]]:
    """The latest status of each worker process (of one role), newest first, seen at or after `since`; beats
    older than FORGET_SECONDS (processes that died without a word) are removed on the way."""
    raw = client.hgetall(keys.WORKERS)
    beats = [json.loads(value) for value in raw.values()]
    forgotten = time.time() - FORGET_SECONDS
    stale = [
        part
        for (field, value), beat in zip(raw.items(), beats, strict=True)
        if beat["seen"] < forgotten
        for part in (field, value)
    ]
    if stale:
        client.eval(FORGET_SCRIPT, 1, keys.WORKERS, *stale)
    chosen = [beat for beat in beats if (role is None or beat["role"] == role) and beat["seen"] >= since]
    return sorted(chosen, key=lambda beat: beat["seen"], reverse=True)


def alive(client: redis.Redis, role: str, within: float = ALIVE_SECONDS, fresh: float = 0.0) -> list[dict[str, Any]]:
    """Processes of `role` that reported in within the last `within` seconds. `fresh`: this process's own reading
    of the beats will do when at most that many seconds old (checks made on every request: beats come every 1-10 s,
    and a clean stop is seen that much later)."""
    since = time.time() - within
    if not fresh:
        return heartbeats(client, role, since)
    read_at, beats = _readings.get(client, (-float("inf"), []))
    if time.monotonic() - read_at > fresh:
        _readings[client] = (time.monotonic(), beats := heartbeats(client))
    return [beat for beat in beats if beat["role"] == role and beat["seen"] >= since]


_readings: weakref.WeakKeyDictionary[redis.Redis, tuple[float, list[dict[str, Any]]]] = weakref.WeakKeyDictionary()
