"""Searches that scale out and stay up, with real processes: waiting searches are embedded together; replicas
answer while the owner is frozen, killed or restarting; a replica or a query process killed in the middle of a read
or a batch leaves its searches to the others; a replica that missed changes ends with exactly the owner's items and
vectors."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import celery.exceptions
import pytest

from lookalike.stack import Stack
from lookalike.up import start_workers
from protocol import keys
from protocol.client import Client
from protocol.heartbeats import RECENT_SECONDS, Role
from protocol.queues import Queue, Task
from protocol.readers import ask_owner, ask_reader, ask_replicas
from tests.test_worker import SAMPLE_SIZE, image_bytes
from worker.replica import Replica


def loaded_stack(make_stack, shared_dir, **env: str) -> tuple[Stack, Client, dict]:
    stack = make_stack(**env)
    start_workers(stack, stack.settings)
    client = Client(stack.settings)
    load = client.follow(client.start_load(shared_dir / "data" / "fashion"), timeout=600)
    assert load["progress"]["done"] == SAMPLE_SIZE
    client.stats(min_seq=load["seq"])  # the replicas hold the whole load
    return stack, client, load


def freeze(stack: Stack, name: str) -> None:
    os.killpg(stack.processes[name].pid, signal.SIGSTOP)


def thaw(stack: Stack, name: str) -> None:
    os.killpg(stack.processes[name].pid, signal.SIGCONT)


def held(stack: Stack, queue: str) -> int:
    """Messages of `queue` a worker has taken and not acknowledged (kombu keeps them in its `unacked` hash)."""
    return sum(1 for raw in stack.redis.hvals("unacked") if json.loads(raw)[2] == queue)


def ask(client: Client, reader: str, task: Task, *args: object) -> dict:
    """A read sent to one kind of reader: the owner (through its queue), or the replicas (directly)."""
    if reader == "owner":
        answer = ask_owner(client.celery, task, list(args), 60)
    else:
        answer = ask_replicas(client.jobs.redis, task, list(args), 60)
    assert answer is not None, f"no {reader} answered {task} within 60 s"
    return answer


@pytest.mark.slow
def test_searches_waiting_together_are_embedded_in_one_batch(make_stack, shared_dir):
    """Six searches wait while the query process is frozen; thawed, it embeds them in one or two onnxruntime runs
    (Redis may have handed it the first one before it froze), each with its own answer. The wait for more is long
    here: on a busy machine kombu may hand a queued message over more slowly than the 5 ms a query process gives it."""
    stack, client, _ = loaded_stack(make_stack, shared_dir, LOOKALIKE_QUERY_WAIT_MS="500")
    before = stack.heartbeat(Role.QUERY)[0]
    freeze(stack, "query-1")
    photos = ["10186", "10227", "10230", "10279", "10428", "10186"]
    searches = [client.search(image_bytes(shared_dir, item_id), 3) for item_id in photos]
    thaw(stack, "query-1")
    jobs = [client.follow(job_id, timeout=60) for job_id in searches]
    assert [job["result"]["hits"][0]["id"] for job in jobs] == photos
    after = stack.wait_for(lambda: next((beat for beat in stack.heartbeat(Role.QUERY)
                                         if beat["searches"] >= before["searches"] + 6), None),
                           "the query process to report its batches", timeout=30)  # fmt: skip
    assert after["batches"] - before["batches"] <= 2 and after["largest_batch"] >= 5


@pytest.mark.slow
def test_searches_and_more_like_this_go_on_while_the_owner_is_frozen_killed_and_restarting(make_stack, shared_dir):
    """Frozen, the owner takes no write (one waits for it) and no read; killed, its writes wait in their queue; all
    along, and while it starts again, every search and "more like this" is answered by the replica."""
    stack, client, _ = loaded_stack(make_stack, shared_dir)
    photo = image_bytes(shared_dir, "10186")
    answered = []

    def search_and_similar() -> None:
        job = client.follow(client.search(photo, 3), timeout=30)
        assert job["state"] == "done" and job["result"]["hits"][0]["id"] == "10186", job
        assert len(client.similar("10186", 3)["hits"]) == 3
        answered.append(job["id"])

    def delete_waits(item_id: str) -> None:
        with pytest.raises(celery.exceptions.TimeoutError):  # no owner to apply it now: it waits
            Client(stack.settings, timeout=2).delete([item_id])

    freeze(stack, "index")
    for _ in range(3):
        search_and_similar()
    delete_waits("10227")
    thaw(stack, "index")
    stack.wait_for(lambda: client.get_item("10227") is None, "the owner, thawed, to apply the delete")
    stack.kill("index")
    for _ in range(3):
        search_and_similar()
    delete_waits("10230")

    restarting, failures = threading.Event(), []

    def keep_searching() -> None:
        while not restarting.is_set():
            try:
                search_and_similar()
            except AssertionError as failure:
                failures.append(failure)

    searcher = threading.Thread(target=keep_searching)
    searcher.start()
    try:
        stack.start("index")
    finally:
        restarting.set()
        searcher.join(60)
    assert failures == [] and len(answered) > 6
    stack.wait_for(lambda: client.get_item("10230") is None, "the restarted owner to apply the delete")
    assert client.stats()["items"] == SAMPLE_SIZE - 2
    assert {client.jobs.get(job_id)["state"] for job_id in answered} == {"done"}  # none left running


@pytest.mark.slow
def test_a_replica_killed_in_the_middle_of_a_read_leaves_its_search_to_the_others(make_stack, shared_dir):
    """Both replicas are frozen after a delete, so the search's read (waiting for the delete) is sent to them and
    taken, or left queued, by stopped processes; the first is killed: the read goes to the owner after
    LOOKALIKE_READ_TIMEOUT, which holds the delete and answers."""
    stack, client, _ = loaded_stack(make_stack, shared_dir, LOOKALIKE_REPLICAS="2")
    deleted = client.delete(["10227"])
    freeze(stack, "replica-2")
    freeze(stack, "replica-1")
    try:
        job_id = client.search(image_bytes(shared_dir, "10186"), 3, min_seq=deleted["seq"])
        # The read is sent within a second: queued, held, or in a stopped replica's socket (where nothing shows it)
        time.sleep(1)
        stack.kill("replica-1")
        job = client.follow(job_id, timeout=60)
    finally:
        thaw(stack, "replica-2")
    assert job["state"] == "done", job
    assert "10227" not in [hit["id"] for hit in job["result"]["hits"]] and job["result"]["hits"][0]["id"] == "10186"


@pytest.mark.slow
def test_a_query_process_killed_in_the_middle_of_a_batch_leaves_its_searches_to_another(make_stack, shared_dir):
    """The first query process has taken a batch and waits for the (frozen) readers when it is killed: its
    searches go back to the queue and the second query process answers them. (The frozen second one may have been
    handed one search by Redis before it froze: it answers that one once thawed.) The searches are all queued
    before the first one wakes, so that its first batch takes them: queued one by one on a slow machine, the first
    could be a batch of one, and the process waits for the frozen readers before it takes more."""
    stack, client, _ = loaded_stack(make_stack, shared_dir, LOOKALIKE_QUERY_PROCESSES="2")
    for name in ("query-1", "query-2", "replica-1", "index"):
        freeze(stack, name)
    photo = image_bytes(shared_dir, "10186")
    searches = [client.search(photo, 3) for _ in range(4)]
    thaw(stack, "query-1")

    def taken() -> bool:
        return stack.redis.llen(Queue.QUERY) == 0 and held(stack, Queue.QUERY) >= 3

    stack.wait_for(taken, "the first query process to take the searches", timeout=30)
    stack.kill("query-1")
    for name in ("query-2", "replica-1", "index"):
        thaw(stack, name)
    jobs = [client.follow(job_id, timeout=90) for job_id in searches]
    assert [job["state"] for job in jobs] == ["done"] * 4, jobs
    assert all(job["result"]["hits"][0]["id"] == "10186" for job in jobs)
    stack.wait_for(lambda: held(stack, Queue.QUERY) == 0, "every search acknowledged", timeout=30)


@pytest.mark.slow
def test_a_replica_that_missed_changes_ends_with_exactly_the_owners_items_and_vectors(make_stack, shared_dir):
    """Killed, changes made meanwhile, the change feed lost (Redis trimmed it): restarted, the replica closes the gap
    from a snapshot it asks the owner for, then follows the feed again."""
    stack, client, _ = loaded_stack(make_stack, shared_dir)
    stack.kill("replica-1")
    deleted = client.delete(["10186", "10227", "10230"])
    folder = stack.settings.uploads_dir / "more"
    folder.mkdir(parents=True)
    for item_id in ("10279", "10428"):  # the same photos under new ids, with metadata
        (folder / f"new-{item_id}.jpg").write_bytes(image_bytes(shared_dir, item_id))
    (folder / "styles.csv").write_text("id,gender\nnew-10279,Men\nnew-10428,Women\n")
    more = client.follow(client.start_load(folder, folder / "styles.csv"), timeout=120)
    assert more["state"] == "done" and more["seq"] == deleted["seq"] + 2
    stack.redis.delete(keys.CHANGES)  # the feed lost everything the replica missed

    stack.start("replica", "replica-1")
    later = client.delete(["10279"])  # followed through the feed again
    owner = ask(client, "owner", Task.INDEX_STATS, later["seq"], True)
    replica = ask(client, "replica", Task.INDEX_STATS, later["seq"], True)
    assert "stats" in owner and "stats" in replica, (owner, replica)
    owner, replica = owner["stats"], replica["stats"]
    assert (owner["role"], replica["role"]) == (Role.INDEX, Role.REPLICA)
    assert replica["seq"] == owner["seq"] == later["seq"] and replica["items"] == owner["items"] == SAMPLE_SIZE - 2
    assert replica["digest"] == owner["digest"]


@pytest.mark.slow
def test_a_replica_that_slept_through_a_snapshot_catches_up_with_no_write_arriving(make_stack, shared_dir):
    """Frozen while the owner snapshotted and trimmed the feed past it, the replica finds only the snapshot's entry
    in the feed after the change its blocked read had already been handed: it loads that snapshot at once instead
    of waiting, out of reads, for some later write."""
    stack, client, _ = loaded_stack(make_stack, shared_dir, LOOKALIKE_SNAPSHOT_EVERY="5")
    replica_pid = stack.processes["replica-1"].pid
    freeze(stack, "replica-1")
    client.delete(["10186"])  # handed to the replica's blocked read of the feed, in its socket
    deleted = client.delete(["10227", "10230", "10279", "10428"])  # the fifth change: a snapshot, the feed trimmed
    first = stack.redis.xrange(keys.CHANGES, count=1)
    assert first and first[0][0] == f"{deleted['seq']}-1".encode(), "the feed holds only the new snapshot"
    thaw(stack, "replica-1")

    def replica_seq() -> int:
        return next((beat["seq"] for beat in stack.heartbeat(Role.REPLICA) if beat["pid"] == replica_pid), -1)

    stack.wait_for(lambda: replica_seq() == deleted["seq"], "the replica to reach the owner's change", timeout=10)
    assert client.stats(min_seq=deleted["seq"])["items"] == SAMPLE_SIZE - 5


def test_a_replica_more_than_max_lag_behind_takes_no_reads_until_it_caught_up():
    replica = Replica.__new__(Replica)
    replica.settings, replica.seq, replica.taking_reads = type("Settings", (), {"max_lag": 5}), 10, False
    seconds = [9.0]
    replica.lag = lambda: (3, seconds[0])
    assert not replica.gate() and not replica.taking_reads  # far behind from the start: no reads at the first look
    taken = []
    for seconds[0] in (0.5, 6.0, 7.0, 4.0, 0.0):
        taken.append(replica.gate())
    assert taken == [True, False, False, True, True] and replica.taking_reads


def test_reads_go_to_the_owner_when_no_replica_keeps_up_and_a_read_no_replica_took_is_withdrawn(module_redis):
    import redis

    client = redis.Redis.from_url(module_redis)
    client.flushdb()

    class Owner:
        """Answers as the owner would, through a Celery result (unit test: no worker)."""

        asked = 0

        def send_task(self, task: str, args: list, queue: str, expires: float) -> Owner:
            assert queue == Queue.SEARCH
            self.asked += 1
            return self

        def get(self, timeout: float, disable_sync_subtasks: bool) -> dict:
            return {"from": "owner"}

        def forget(self) -> None:
            pass

    def beat(pid: int, lag_seconds: float, taking_reads: bool = True) -> None:
        status = {"role": Role.REPLICA, "pid": pid, "host": "h", "lag_seconds": lag_seconds,
                  "taking_reads": taking_reads, "seen": time.time()}  # fmt: skip
        client.hset(keys.WORKERS, f"replica:h:{pid}", json.dumps(status))

    def read() -> dict:
        return ask_reader(owner, client, Task.GET_ITEM, ["10186", 0], timeout=5, max_lag=5, patience=0.3)

    owner = Owner()
    assert read() == {"from": "owner"} and owner.asked == 1 and client.llen(keys.READS) == 0
    beat(1, 30.0)
    beat(3, 0.0, taking_reads=False)  # stopping: its last beats say it takes no more reads
    time.sleep(RECENT_SECONDS)  # a reading of the beats a second old will do for a read
    assert read() == {"from": "owner"} and owner.asked == 2  # too far behind, or stopping
    beat(2, 0.2)
    time.sleep(RECENT_SECONDS)
    # a replica keeps up, but none takes the read: it is withdrawn, and the owner answers
    assert read() == {"from": "owner"} and owner.asked == 3 and client.llen(keys.READS) == 0

    def replica() -> None:
        taken = json.loads(client.brpop([keys.READS], timeout=10)[1])
        assert taken["task"] == Task.GET_ITEM and taken["args"] == ["10186", 0] and taken["expires"] > time.time()
        client.lpush(taken["answer_to"], json.dumps({"from": "replica"}))

    answering = threading.Thread(target=replica)
    answering.start()
    assert read() == {"from": "replica"} and owner.asked == 3
    answering.join()
