"""What each worker process holds: settings, a Redis client, its model (made after the fork), the index."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from common.model import EmbeddingModel, load_model
from common.settings import Settings
from protocol import keys
from protocol.connection import Patience, redis_client
from protocol.jobs import Jobs

REDIS_PATIENCE = 60  # seconds a worker's Redis calls keep trying while Redis restarts
MODELS_KEPT = 2

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
    models: dict[Path, EmbeddingModel] = field(default_factory=dict)  # by file, the latest used last
    owner: IndexOwner | None = None
    replica: Replica | None = None


@cache
def _process_state(pid: int) -> ProcessState:
    """Keyed by pid so that a forked child never uses its parent's sessions or sockets."""
    client = redis_client(settings(), patience=REDIS_PATIENCE)
    return ProcessState(client, Jobs.for_settings(client, settings()))


def state() -> ProcessState:
    return _process_state(os.getpid())


def stop_waiting_for_redis() -> None:
    """On the way out: this process's Redis calls fail at once instead of riding out an outage for REDIS_PATIENCE,
    so a stop does not wait a minute for a Redis stopped before it (podman-compose stops services in file order,
    and after a failover the primary is a service listed after the workers)."""
    Patience.stopping.set()


def jobs() -> Jobs:
    return state().jobs


def serving_model_file() -> Path:
    """The model of the serving index, as its owner published it (LOOKALIKE_MODEL before any owner did)."""
    serving = state().redis.get(keys.SERVING)
    return Path(json.loads(serving)["model"]) if serving else settings().model


def embedding_model(threads: int | None = None, model_file: Path | None = None) -> EmbeddingModel:
    """This process's onnxruntime session of `model_file` (default: the serving index's model), created on first
    use (after the fork) with `threads` intra-op threads (default: LOOKALIKE_THREADS, the embed processes' share of
    the cores). Sessions of MODELS_KEPT models are kept: the serving one and the one an index is being built with."""
    current, config = state(), settings()
    model_file = model_file or serving_model_file()
    model = current.models.pop(model_file, None)
    if model is None:
        model = load_model(model_file, config.providers, intra_op_threads=threads or config.threads)
        while len(current.models) >= MODELS_KEPT:
            current.models.pop(next(iter(current.models)))
    current.models[model_file] = model
    return model


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
