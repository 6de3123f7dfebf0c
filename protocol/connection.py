"""Redis clients with the time-outs and the patience each side needs."""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


def redis_client(url: str, timeout: float = 10, patience: float = 0) -> redis.Redis:
    """A client that gives up on an unresponsive Redis after `timeout` seconds (connecting: at most 5).

    With `patience`, a lost connection is tried again for about that many seconds: a worker's task rides out a
    Redis restart instead of failing half done. The web has none: it answers 503 at once.
    """
    persistence: dict[str, Any] = {}
    if patience:
        persistence = {
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=int(patience) + 5),
            # not on time-outs: a command whose answer was lost may have run, and some can't run twice
            "retry_on_error": [redis.ConnectionError],
        }
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=min(timeout, 5), health_check_interval=30, **persistence
    )


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
