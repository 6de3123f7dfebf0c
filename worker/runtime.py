"""What each worker process holds: settings, a Redis client, its model (made after the fork) and heartbeat."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import redis

from lookalike.settings import Settings
from worker.jobs import Jobs
from worker.model import EmbeddingModel, load_model

if TYPE_CHECKING:
    from worker.owner import IndexOwner

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10
WORKERS_KEY = "lookalike:workers"  # hash: "<role>:<host>:<pid>" -> JSON status, refreshed by each process


@cache
def settings() -> Settings:
    return Settings.from_env()


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)


@dataclass
class ProcessState:
    """What one worker process holds: its Redis connection, its model session, and the index if it owns it."""

    redis: redis.Redis
    jobs: Jobs
    model: EmbeddingModel | None = None
    owner: IndexOwner | None = None


@cache
def _process_state(pid: int) -> ProcessState:
    """Keyed by pid so that a forked child never uses its parent's sessions or sockets."""
    client = redis_client(settings().redis_url)
    return ProcessState(client, Jobs(client, settings().search_ttl))


def state() -> ProcessState:
    return _process_state(os.getpid())


def jobs() -> Jobs:
    return state().jobs


def embedding_model() -> EmbeddingModel:
    """This process's onnxruntime session, created on first use (after the fork)."""
    current = state()
    if current.model is None:
        config = settings()
        current.model = load_model(config.model, config.providers, intra_op_threads=config.threads)
    return current.model


def start_heartbeat(role: str, status: Callable[[], dict[str, Any]]) -> None:
    """Publish this process's status every few seconds; the web's health check reads it."""
    name = f"{role}:{socket.gethostname()}:{os.getpid()}"
    client = state().redis

    def beat() -> None:
        while True:
            try:
                payload = {"role": role, "pid": os.getpid(), "host": socket.gethostname(), **status()}
                client.hset(WORKERS_KEY, name, json.dumps({**payload, "seen": time.time()}))
            except redis.RedisError as error:
                log.warning("heartbeat to Redis failed: %s", error)
            except Exception:  # a status callback must never stop the heartbeat
                log.exception("heartbeat status failed")
            threading.Event().wait(HEARTBEAT_SECONDS)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
