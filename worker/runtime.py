"""What each worker process holds: settings, a Redis client, its model (made after the fork), the index."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import redis

from common.model import EmbeddingModel, load_model
from common.settings import Settings
from protocol.connection import redis_client
from protocol.jobs import Jobs

REDIS_PATIENCE = 60  # seconds a worker's Redis calls keep trying while Redis restarts

if TYPE_CHECKING:
    from worker.owner import IndexOwner
    from worker.reader import IndexReader
    from worker.replica import Replica


@cache
def settings() -> Settings:
    return Settings.from_env()


@dataclass
class ProcessState:
    """What one worker process holds: its Redis connection, its model session, and the index it owns or follows."""

    redis: redis.Redis
    jobs: Jobs
    model: EmbeddingModel | None = None
    owner: IndexOwner | None = None
    replica: Replica | None = None


@cache
def _process_state(pid: int) -> ProcessState:
    """Keyed by pid so that a forked child never uses its parent's sessions or sockets."""
    client = redis_client(settings().redis_url, patience=REDIS_PATIENCE)
    return ProcessState(client, Jobs.for_settings(client, settings()))


def state() -> ProcessState:
    return _process_state(os.getpid())


def jobs() -> Jobs:
    return state().jobs


def embedding_model(threads: int | None = None) -> EmbeddingModel:
    """This process's onnxruntime session, created on first use (after the fork) with `threads` intra-op threads
    (default: LOOKALIKE_THREADS, the embed processes' share of the cores)."""
    current = state()
    if current.model is None:
        config = settings()
        current.model = load_model(config.model, config.providers, intra_op_threads=threads or config.threads)
    return current.model


def reader() -> IndexReader:
    """The reads this process answers: its replica's, or the owner's."""
    current = state()
    if current.replica is not None:
        return current.replica.reader
    if current.owner is not None:
        return current.owner.reader
    raise RuntimeError("this process holds no index (start `lookalike worker replica` or `lookalike worker index`)")


def index_status() -> dict[str, Any]:
    """What `index_stats` answers: the figures of the index this process holds, and who it is."""
    current = state()
    if current.replica is not None:
        return current.replica.status()
    if current.owner is not None:
        return current.owner.status()
    raise RuntimeError("this process holds no index")
