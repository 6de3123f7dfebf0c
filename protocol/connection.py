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
