"""How the two kinds of worker start: bulk embedders (prefork, niced) and the index owner (one process)."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from celery import Celery, signals

from common.model import ModelError, load_model
from common.settings import Settings
from protocol.heartbeats import start_heartbeat
from protocol.queues import Queue
from worker import runtime
from worker.owner import IndexOwner

log = logging.getLogger(__name__)


def embed_worker_argv(settings: Settings, loglevel: str) -> list[str]:
    # -O fair: a task goes to an idle child, not to one that already has a batch waiting.
    return ["worker", "-Q", Queue.EMBED, "-P", "prefork", "-c", str(settings.embed_processes), "-O", "fair",
            "-n", "embed@%h", "--loglevel", loglevel, "--without-gossip", "--without-mingle"]  # fmt: skip


def index_worker_argv(loglevel: str) -> list[str]:
    # Solo pool: tasks run in this very process, the one that holds the index (hnswlib is not safe to share).
    return ["worker", "-Q", f"{Queue.SEARCH},{Queue.INDEX}", "-P", "solo", "-n", "index@%h",
            "--loglevel", loglevel, "--without-gossip", "--without-mingle"]  # fmt: skip


def check_model_elsewhere(settings: Settings) -> None:
    """Open the model once in a throw-away process, so a bad model is one clear error, not a crash loop of
    pool processes, and no onnxruntime session exists in this parent before it forks."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        problem = pool.submit(_model_problem, str(settings.model), settings.providers).result()
    if problem:
        raise ModelError(problem)


def _model_problem(path: str, providers: tuple[str, ...]) -> str | None:
    try:
        load_model(path, providers)
    except ModelError as error:
        return str(error)
    return None


def prepare_embed_processes() -> None:
    """Each pool process, right after the fork: lower its priority, open its own session, start its heartbeat."""

    @signals.worker_process_init.connect(weak=False)
    def init_embed_process(**_: object) -> None:
        settings = runtime.settings()
        os.nice(settings.embed_nice)  # bulk work yields the CPU to searches
        model = runtime.embedding_model()
        log.info("embed process %d: %s on %s, %d threads", os.getpid(), model.path.name, model.provider,
                 settings.threads)  # fmt: skip
        status = {"provider": model.provider, "model": model.path.name, "model_sha256": model.sha256}
        start_heartbeat(runtime.state().redis, "embed", lambda: status)


def open_index_owner(app: Celery) -> IndexOwner:
    """Open the index (taking its lock), give back orphaned messages, and publish a heartbeat."""
    settings = runtime.settings()
    owner = IndexOwner.open(settings, runtime.state().redis)
    runtime.state().owner = owner
    owner.restore_orphaned_messages(app)
    log.info("index owner %d: %s on %s", os.getpid(), owner.model.path.name, owner.model.provider)
    owner.on_change = start_heartbeat(runtime.state().redis, "index", owner.heartbeat).set
    return owner
