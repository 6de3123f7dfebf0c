"""How each kind of worker starts: bulk embedders (prefork, niced), the index owner (one process), query processes
(micro-batched searches) and replicas (read-only copies of the index)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from celery import Celery, signals

import worker.tasks  # noqa: F401 - registers the tasks with the app each kind creates
from common.model import ModelError, load_model
from common.settings import Settings
from protocol.celery_app import create_celery
from protocol.connection import redis_client
from protocol.heartbeats import Role, forget_heartbeat, start_heartbeat
from protocol.queues import Queue, Task
from worker import runtime
from worker.owner import IndexOwner
from worker.queries import QueryConsumer
from worker.recovery import start_watching, watch_for_orphans
from worker.replica import Replica
from worker.watchdog import LoadWatchdog

log = logging.getLogger(__name__)

BUILD_CHECK_SECONDS = 2.0
MODEL_POLL_SECONDS = 1.0
BUILD_ASK_AGAIN_SECONDS = 60.0  # an `advance_build` not handled by then (lost, or a long queue): another one


def run_worker(kind: str, loglevel: str) -> int:
    """Run a worker of `kind` in this process until it is stopped."""
    settings = runtime.settings()
    if kind != "replica":  # a replica answers by vector: it never opens the model
        wait_for_model(settings)
    app = create_celery(settings, publish_patience=runtime.REDIS_PATIENCE)
    if kind in ("embed", "index"):  # a Celery worker; a query process lists what it holds itself, a replica none
        watch_for_orphans(app, settings)
        signals.worker_shutting_down.connect(lambda **_: runtime.stop_waiting_for_redis(), weak=False)
    starts: dict[str, Callable[[Celery, Settings, str], None]] = {
        "embed": run_embedders,
        "index": run_index_owner,
        "query": run_query_process,
        "replica": run_replica,
    }
    starts[kind](app, settings, loglevel)
    return 0


def wait_for_model(settings: Settings) -> None:
    """Up to LOOKALIKE_MODEL_WAIT seconds for the model file: in a deployment, the export service may still be
    writing it (it appears whole, renamed into place); then opening it says what is wrong, as without a wait."""
    deadline = time.monotonic() + settings.model_wait
    if not settings.model.exists() and settings.model_wait:
        log.info("waiting up to %d s for the model at %s", settings.model_wait, settings.model)
    while not settings.model.exists() and time.monotonic() < deadline:
        time.sleep(MODEL_POLL_SECONDS)


def _argv(queues: str, pool: str, name: str, loglevel: str, *extra: str) -> list[str]:
    return ["worker", "-Q", queues, "-P", pool, "-n", name, "--loglevel", loglevel, "--without-gossip",
            "--without-mingle", *extra]  # fmt: skip


def embed_worker_argv(settings: Settings, loglevel: str) -> list[str]:
    # -O fair: a task goes to an idle child, not to one that already has a batch waiting.
    return _argv(Queue.EMBED, "prefork", "embed@%h", loglevel, "-c", str(settings.embed_processes), "-O", "fair")


def index_worker_argv(loglevel: str) -> list[str]:
    # Solo pool: tasks run in this very process, the one that holds the index (hnswlib is not safe to share).
    return _argv(f"{Queue.SEARCH},{Queue.INDEX}", "solo", "index@%h", loglevel)


def run_embedders(app: Celery, settings: Settings, loglevel: str) -> None:
    check_model_elsewhere(settings)
    prepare_embed_processes()
    app.worker_main(embed_worker_argv(settings, loglevel))


def run_index_owner(app: Celery, settings: Settings, loglevel: str) -> None:
    owner = open_index_owner(app)
    try:
        app.worker_main(index_worker_argv(loglevel))
    finally:
        owner.close()
        forget_heartbeat(owner.redis, Role.INDEX)


def run_query_process(app: Celery, settings: Settings, loglevel: str) -> None:
    """Searches by image: micro-batches of up to LOOKALIKE_QUERY_BATCH, embedded on this process's session."""
    model = runtime.embedding_model(settings.query_threads)
    log.info("query process %d: %s on %s, %d threads, batches of up to %d", os.getpid(), model.path.name,
             model.provider, settings.query_threads, settings.query_batch)  # fmt: skip
    consumer = QueryConsumer(app, settings)
    client = runtime.state().redis
    start_watching(app, redis_client(settings), consumer.held_ids)
    identity = {"provider": model.provider, "model": model.path.name, "model_sha256": model.sha256}
    start_heartbeat(client, Role.QUERY, lambda: {**identity, **consumer.figures.as_dict()})
    try:
        consumer.run()
    finally:
        runtime.stop_waiting_for_redis()
        forget_heartbeat(client, Role.QUERY)
        forget_heartbeat(client, Role.HOLDER)


def run_replica(app: Celery, settings: Settings, loglevel: str) -> None:
    """A read-only copy of the index: loaded from the owner's snapshot, kept up by its change feed, answering the
    reads the replicas are sent directly (not a Celery worker: a read has no task to run, only an answer to push)."""
    replica = Replica(settings, runtime.state().redis, app).open()
    runtime.state().replica = replica
    replica.start_following()
    stopping = threading.Event()

    def stop(*_: object) -> None:
        stopping.set()
        runtime.stop_waiting_for_redis()  # a read waiting on a Redis that is away gives up now

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    start_heartbeat(runtime.state().redis, Role.REPLICA, replica.heartbeat, every=1)
    try:
        replica.serve_reads(lambda task, args: app.tasks[task](*args), stopping)
    finally:
        replica.taking_reads = False  # a beat the heartbeat thread still sends says so: no read is sent here
        forget_heartbeat(runtime.state().redis, Role.REPLICA)


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
        yield_the_cpu(settings.embed_nice)
        model = runtime.embedding_model()
        log.info("embed process %d: %s on %s, %d threads", os.getpid(), model.path.name, model.provider,
                 settings.threads)  # fmt: skip
        status = {"provider": model.provider, "model": model.path.name, "model_sha256": model.sha256}
        start_heartbeat(runtime.state().redis, Role.EMBED, lambda: status)


def yield_the_cpu(niceness: int) -> None:
    """Bulk work yields the CPU to searches: lower priority, and on Linux the idle scheduling class, whose tasks run
    only on a core nothing else wants (a search's threads preempt them at once, which niceness alone doesn't do)."""
    os.nice(niceness)
    if niceness and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def open_index_owner(app: Celery) -> IndexOwner:
    """Open the index (taking its lock), give back orphaned messages, publish a heartbeat, watch the loads."""
    settings = runtime.settings()
    owner = IndexOwner.open(settings, runtime.state().redis)
    runtime.state().owner = owner
    owner.restore_orphaned_messages(app)
    log.info("index owner %d: %s, %d items at change %d", os.getpid(), owner.model.path.name, len(owner.store.index),
             owner.store.seq)  # fmt: skip
    owner.on_change = start_heartbeat(runtime.state().redis, Role.INDEX, owner.heartbeat).set
    LoadWatchdog(app, owner.jobs, settings).start()  # one owner, so one watchdog over the loads
    threading.Thread(target=ask_to_advance_builds, args=(app, owner), name="builds", daemon=True).start()
    return owner


def ask_to_advance_builds(app: Celery, owner: IndexOwner) -> None:
    """While an index is being built, queue `advance_build` every BUILD_CHECK_SECONDS (one at a time): the owner,
    between its tasks, starts the next round or switches when the round has finished. A round's last items may
    fail in an embed worker, so the owner can't count on hearing of the end itself."""
    while True:
        time.sleep(BUILD_CHECK_SECONDS)
        if owner.alias.building is None or time.monotonic() - owner.advance_asked < BUILD_ASK_AGAIN_SECONDS:
            continue
        owner.advance_asked = time.monotonic()
        try:
            app.send_task(Task.ADVANCE_BUILD)
        except Exception as error:  # Redis away: asked again at the next look
            log.warning("could not ask the index owner to advance its build: %s", error)
            owner.advance_asked = 0.0
