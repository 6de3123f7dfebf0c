"""No load stuck, nothing silently short, Redis bounded: messages that kill their worker, messages lost on the way,
and what dead processes leave behind, with real Redis and real worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from lookalike.stack import Stack
from protocol.celery_app import create_celery
from protocol.client import Client
from protocol.heartbeats import FORGET_SECONDS, alive
from tests.conftest import REPO
from tests.poisoned_embedder import POISON
from tests.test_worker import SAMPLE_SIZE, STYLES_ROWS, freeze_when
from worker import runtime, tasks
from worker.embedding import BatchOutcome
from worker.watchdog import REQUEUES, LoadWatchdog

STALL = "5"  # LOOKALIKE_LOAD_STALL, seconds: the least it may be


def start_poisoned_embedder(stack: Stack) -> subprocess.Popen:
    """An embed worker (tests/poisoned_embedder.py) whose process dies on any batch with the item `poison`."""
    stack.log_paths["embed"] = stack.logs / "embed-poisoned.log"
    with stack.log_paths["embed"].open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.poisoned_embedder"], cwd=REPO, env=stack.env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    stack.processes["embed"] = process
    ours = lambda: {process.pid, *stack.pool_children("embed")}  # noqa: E731
    stack.wait_for(lambda: any(beat["pid"] in ours() for beat in stack.heartbeat("embed")), "the embedder", 60, process)
    return process


def copy_photos(stack: Stack, shared_dir, folder: str, ids: list[str]) -> None:
    target = stack.settings.uploads_dir / folder
    target.mkdir(parents=True)
    for name, photo in zip(ids, ("10186", "10227", "10230", "10279", "10428"), strict=False):
        (target / f"{name}.jpg").write_bytes((shared_dir / "data" / "fashion" / "images" / f"{photo}.jpg").read_bytes())


def freeze_while_waiting_for_work(stack: Stack, kind: str) -> None:
    """SIGSTOP the worker at a moment when its consumer is blocked in BRPOP: Redis hands the next message to it."""
    db = str(stack.redis.connection_pool.connection_kwargs["db"])

    def every_worker_waits() -> bool:  # each worker consumes on one connection; only the stack's workers use its db
        clients = stack.redis.client_list()
        return sum(c["db"] == db and c["cmd"] == "brpop" and "b" in c["flags"] for c in clients) == len(stack.processes)

    freeze_when(stack, kind, every_worker_waits, "waiting for work")


@pytest.mark.slow
def test_a_message_that_kills_its_worker_every_time_fails_its_items_as_worker_lost(make_stack, shared_dir):
    stack = make_stack(LOOKALIKE_BATCH="1", LOOKALIKE_MAX_DELIVERIES="2")
    stack.start("index")
    start_poisoned_embedder(stack)
    copy_photos(stack, shared_dir, "shop", ["a", "b", POISON, "c"])
    client = Client(stack.settings)
    job = client.follow(client.start_load(stack.settings.uploads_dir / "shop"), timeout=180)
    assert (job["state"], job["progress"]) == ("partial", {"total": 4, "done": 3, "failed": 1})
    assert [(error["id"], error["code"]) for error in job["errors"]] == [(POISON, "worker_lost")]
    assert client.stats()["items"] == 3
    assert stack.processes["embed"].poll() is None  # the worker lived on; its pool processes were replaced


@pytest.mark.slow
def test_a_plan_lost_in_a_killed_workers_socket_is_planned_again(make_stack, shared_dir):
    """The window kombu leaves: a worker frozen while it waits for work is handed a message, and killed before it
    records it as taken. Nothing holds the message any more; the watchdog plans the load again."""
    stack = make_stack(LOOKALIKE_LOAD_STALL=STALL)
    stack.start("index")
    stack.start("embed")
    copy_photos(stack, shared_dir, "shop", ["a", "b", "c"])
    client = Client(stack.settings)
    freeze_while_waiting_for_work(stack, "embed")
    job_id = client.start_load(stack.settings.uploads_dir / "shop")
    stack.kill("embed")
    assert stack.redis.llen("embed") == 0 and not stack.redis.hlen("unacked")  # the message is gone
    stack.start("embed")
    job = client.follow(job_id, timeout=120)
    assert (job["state"], job["progress"]) == ("done", {"total": 3, "done": 3, "failed": 0})
    assert "its plan was lost; planned again" in stack.log_paths["index"].read_text()


@pytest.mark.slow
def test_a_batch_deleted_from_its_queue_is_queued_again_and_every_item_is_accounted_for(make_stack, shared_dir):
    stack = make_stack(LOOKALIKE_BATCH="8", LOOKALIKE_EMBED_PROCESSES="1", LOOKALIKE_LOAD_STALL=STALL)
    stack.start("index")
    stack.start("embed")
    client = Client(stack.settings)
    job_id = client.start_load(shared_dir / "data" / "fashion")
    stack.wait_for(lambda: client.jobs.get(job_id)["progress"]["total"], "the load to be planned", 120)
    group = stack.processes["embed"].pid
    os.killpg(group, signal.SIGSTOP)
    try:
        newest = stack.redis.lindex("embed", 0)
        assert newest and job_id in json.loads(newest)["headers"]["argsrepr"]
        assert stack.redis.lrem("embed", 1, newest) == 1  # the last batch: its items are lost
    finally:
        os.killpg(group, signal.SIGCONT)
    job = client.follow(job_id, timeout=300)
    assert job["progress"] == {"total": STYLES_ROWS, "done": SAMPLE_SIZE, "failed": STYLES_ROWS - SAMPLE_SIZE}
    assert job["errors_by_code"] == {"missing_file": STYLES_ROWS - SAMPLE_SIZE}
    assert client.stats()["items"] == SAMPLE_SIZE
    assert "missing items queued again (1 of 2)" in stack.log_paths["index"].read_text()


def test_items_lost_every_time_they_are_queued_again_fail_as_lost_and_the_load_ends_partial(load_watchdog):
    watchdog, jobs, settings = load_watchdog, load_watchdog.jobs, load_watchdog.settings
    client = jobs.redis
    job_id = jobs.create("load", {"source": "shop"})
    jobs.start(job_id)
    jobs.remember_items(job_id, [{"id": name, "area": "catalog", "path": f"{name}.jpg"} for name in "abc"])
    jobs.set_total(job_id, 3)
    jobs.record(job_id, done=["a"])

    def stalled() -> None:
        client.hset(f"lookalike:job:{job_id}", "progressed", time.time() - 6)

    assert watchdog.check() == 0  # progress a moment ago
    stalled()
    client.lpush("embed", json.dumps({"headers": {"argsrepr": f"('{job_id}', [])"}}))
    patient = LoadWatchdog(create_celery(settings), jobs, settings)
    assert patient.check() == 0  # one of its messages waits in the queue
    client.delete("embed")
    assert patient.check() == 0  # and it looks again only a stall period later
    for attempt in range(1, REQUEUES + 1):
        client.delete("embed")
        stalled()
        assert watchdog.check() == 1
        sent = [json.loads(raw) for raw in client.lrange("embed", 0, -1)]
        assert [message["headers"]["task"] for message in sent] == ["lookalike.embed_batch"]
        assert jobs.activity(job_id).requeued == attempt
        assert watchdog.check() == 0  # and then it waits for them
    client.delete("embed")  # lost again
    stalled()
    assert watchdog.check() == 1
    job = jobs.get(job_id)
    assert (job["state"], job["progress"]) == ("partial", {"total": 3, "done": 1, "failed": 2})
    assert job["errors_by_code"] == {"lost": 2} and jobs.active_loads() == []


def test_the_beats_of_processes_dead_for_long_are_removed_by_whoever_reads_them(module_redis):
    client = redis.Redis.from_url(module_redis)
    client.flushdb()
    now = time.time()
    beats = {"embed:gone:1": now - FORGET_SECONDS - 1, "embed:quiet:2": now - 60, "embed:here:3": now}
    for field, seen in beats.items():
        client.hset("lookalike:workers", field, json.dumps({"role": "embed", "pid": 1, "seen": seen}))
    assert len(alive(client, "embed")) == 1
    assert sorted(client.hkeys("lookalike:workers")) == [b"embed:here:3", b"embed:quiet:2"]


@pytest.fixture
def tasks_here(module_redis, tmp_path, monkeypatch):
    """The tasks run in this process (Celery's apply), with Redis for their job records and a catalogue root."""
    client = redis.Redis.from_url(module_redis)
    client.flushdb()
    monkeypatch.setenv("LOOKALIKE_REDIS_URL", module_redis)
    monkeypatch.setenv("LOOKALIKE_CATALOG_ROOT", str(tmp_path / "catalog"))
    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOOKALIKE_BATCH", "2")
    for cached in (runtime.settings, runtime._process_state):
        cached.cache_clear()
    create_celery(runtime.settings())
    yield runtime.jobs()
    for cached in (runtime.settings, runtime._process_state):
        cached.cache_clear()


def refuse_after(calls: int):
    """A stand-in for a task's `delay` whose publish fails after `calls` successes (Redis went away)."""
    sent = []

    def delay(*args):
        if len(sent) == calls:
            raise ConnectionError("Redis went away")
        sent.append(args)

    return delay


def test_items_a_task_could_not_queue_on_are_counted_failed(tasks_here, tmp_path, monkeypatch):
    jobs = tasks_here
    shop = tmp_path / "catalog" / "shop"
    shop.mkdir(parents=True)
    for name in "abcde":
        (shop / f"{name}.jpg").write_bytes(b"not decoded while planning")
    load = jobs.create("load", {"source": "shop"})
    monkeypatch.setattr(tasks.embed_batch, "delay", refuse_after(1))
    tasks.plan_load.apply(args=[load, "shop"])
    job = jobs.get(load)
    assert job["progress"] == {"total": 5, "done": 0, "failed": 3}  # the first batch of two was queued
    assert job["errors_by_code"] == {"enqueue_failed": 3}
    assert sorted(jobs.missing_items(load), key=lambda item: item["id"]) == [
        {"id": item_id, "photos": [{"area": "catalog", "path": f"shop/{item_id}.jpg"}], "metadata": {}}
        for item_id in "ab"
    ]  # what the watchdog would queue again

    embedded = BatchOutcome(changes=[{"op": "upsert", "id": "a"}, {"op": "upsert", "id": "b"}], unchanged=["c"])
    monkeypatch.setattr(tasks, "embed_items", lambda *_: embedded)
    monkeypatch.setattr(runtime, "embedding_model", lambda **_: None)
    monkeypatch.setattr(tasks.apply_changes, "delay", refuse_after(0))
    batch = jobs.create("load", {})
    jobs.start(batch)
    jobs.set_total(batch, 3)
    tasks.embed_batch.apply(args=[batch, [{"id": item_id} for item_id in "abc"]])
    job = jobs.get(batch)
    assert (job["state"], job["progress"]) == ("partial", {"total": 3, "done": 1, "failed": 2})
    assert job["errors_by_code"] == {"enqueue_failed": 2}
