"""Redis clients with the time-outs and the patience each side needs, to one Redis or to its Sentinel-chosen primary."""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from common.settings import Settings
from protocol import keys
from protocol.sentinel import primary_client, uses_sentinel

log = logging.getLogger(__name__)

REPLICA_WAIT_MS = 1000  # how long an acknowledged write waits for a Redis replica to hold it


class Patience(Retry):
    """A worker's retries: about `patience` seconds' worth while the process runs, none once it is stopping (a stop
    must not wait a minute for a Redis that is away). redis-py copies a client's Retry into each connection, and a
    call under way retries with its copy, so the one switch for them all is this class's."""

    stopping = threading.Event()

    @property  # type: ignore[override]
    def _retries(self) -> int:
        return 0 if Patience.stopping.is_set() else self.__dict__["retries_while_running"]

    @_retries.setter
    def _retries(self, value: int) -> None:
        self.__dict__["retries_while_running"] = value


def redis_client(settings: Settings, timeout: float = 10, patience: float = 0) -> redis.Redis:
    """A client that gives up on an unresponsive Redis after `timeout` seconds (connecting: at most 5).

    With `patience`, a lost connection is tried again for about that many seconds: a worker's task rides out a
    Redis restart or a Sentinel failover (a few seconds) instead of failing half done. The web has none: it answers
    503 at once, trying once more on a fresh connection only, which with Sentinel asks for the primary anew.
    """
    retries = int(patience) + 5 if patience else 1
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, 5),
        "health_check_interval": 30,
        "retry": Patience(ExponentialBackoff(cap=1.0, base=0.05), retries) if patience else Retry(NoBackoff(), retries),
        # not on time-outs: a command whose answer was lost may have run, and some can't run twice
        "retry_on_error": [redis.ConnectionError],
    }
    if uses_sentinel(settings.redis_url):
        return primary_client(settings, **options)
    return redis.Redis.from_url(settings.redis_url, **options)


def wait_for_replica(client: redis.Redis) -> int:
    """Wait, up to REPLICA_WAIT_MS, until a Redis replica holds every write made so far (this client's and any
    other's, such as kombu's publish): WAIT counts one connection's writes, so it follows a mark written on its own
    connection, after them. Returns how many replicas hold them; none (the replica is down) is logged, not refused:
    the primary alone still serves, as it did before it had a replica."""
    with client.pipeline(transaction=False) as pipe:
        pipe.incr(keys.REPLICATION_MARK)
        pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS)
        held = int(pipe.execute()[1])
    if not held:
        log.warning("no Redis replica acknowledged a write within %d ms: it is lost should the primary fail now",
                    REPLICA_WAIT_MS)  # fmt: skip
    return held


SEARCHES_UP_TO = 0.8  # of Redis's maxmemory: past it searches are refused, the rest kept for loads, queues, the feed


def redis_memory(client: redis.Redis) -> dict[str, Any]:
    """What Redis holds and may hold: `used_bytes`, `max_bytes` (0: no cap), `policy`, and whether searches are
    refused for it (`full`: past SEARCHES_UP_TO of the cap)."""
    info = client.info("memory")
    used, cap = int(info["used_memory"]), int(info.get("maxmemory", 0))
    return {
        "used_bytes": used,
        "max_bytes": cap,
        "policy": info.get("maxmemory_policy", ""),
        "full": bool(cap) and used >= SEARCHES_UP_TO * cap,
    }
