"""Job records on a real Redis: counters that a re-delivered task can't inflate, and the job's final state."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from protocol.jobs import Jobs, compact_hit, item_error


@pytest.fixture
def jobs(module_redis) -> Jobs:
    client = redis.Redis.from_url(module_redis)
    client.flushdb()
    return Jobs(client, search_ttl=60)


def test_a_load_counts_each_item_once_and_finishes_partial(jobs):
    job_id = jobs.create("load", {"source": "shop"})
    assert jobs.get(job_id)["state"] == "queued"
    jobs.start(job_id)
    jobs.record(job_id, errors={"bad": item_error("missing_file", "image bad.jpg does not exist")})
    jobs.record(job_id, done=["a", "b"])
    jobs.record(job_id, done=["a", "b"])  # the same batch delivered twice
    assert jobs.get(job_id)["state"] == "running"  # total not known yet
    jobs.set_total(job_id, 4)
    assert jobs.record(job_id, done=["c"]) == (3, 1)
    job = jobs.get(job_id)
    assert job["state"] == "partial" and job["finished"]
    assert job["progress"] == {"total": 4, "done": 3, "failed": 1}
    assert job["errors"] == [{"id": "bad", "code": "missing_file", "message": "image bad.jpg does not exist"}]
    assert job["errors_by_code"] == {"missing_file": 1}
    counters_only = jobs.get(job_id, error_limit=0)  # what a polling client reads
    assert "errors" not in counters_only and counters_only["progress"] == job["progress"]
    assert [load["id"] for load in jobs.list_loads()] == [job_id]


def test_an_item_that_fails_and_then_succeeds_counts_as_done(jobs):
    job_id = jobs.create("load", {})
    jobs.start(job_id)
    jobs.record(job_id, errors={"a": item_error("index_unwritable", "disk full")})
    jobs.record(job_id, done=["a"])
    jobs.record(job_id, errors={"a": item_error("truncated", "late duplicate")})  # ignored: already done
    jobs.set_total(job_id, 1)
    job = jobs.get(job_id)
    assert (job["state"], job["progress"]["failed"], "errors_by_code" in job) == ("done", 0, False)


def test_every_item_failing_fails_the_load_and_an_empty_load_is_done(jobs):
    failing = jobs.create("load", {})
    jobs.start(failing)
    jobs.record(failing, errors={"x": item_error("not_an_image", "text")})
    jobs.set_total(failing, 1)
    assert jobs.get(failing)["state"] == "failed"
    empty = jobs.create("load", {})
    jobs.start(empty)
    jobs.set_total(empty, 0)
    assert jobs.get(empty)["state"] == "done"


def test_search_jobs_expire_and_carry_their_result_or_error(jobs):
    found = jobs.create("search", {"k": 3})
    jobs.start(found)
    jobs.finish(found, {"hits": [{"id": "a", "score": 0.9}]})
    assert jobs.get(found)["result"] == {"hits": [{"id": "a", "score": 0.9}]}
    assert 0 < jobs.redis.ttl(f"lookalike:job:{found}") <= 60
    failed = jobs.create("search", {"k": 3})
    jobs.fail(failed, item_error("not_an_image", "the file is not an image"))
    assert jobs.get(failed)["error"]["code"] == "not_an_image"
    assert jobs.get("no-such-job") is None
    assert jobs.list_loads() == []


def test_the_first_outcome_of_a_job_is_the_one_that_stays(jobs):
    search = jobs.create("search", {"k": 3})
    assert jobs.finish(search, {"hits": []}) is True
    assert jobs.fail(search, item_error("search_failed", "a second delivery")) is False  # ran twice: counted once
    job = jobs.get(search)
    assert job["state"] == "done" and "error" not in job
    assert jobs.metrics()["finished:search:done"] == 1 and "finished:search:failed" not in jobs.metrics()
    assert jobs.fail("no-such-job", item_error("x", "y")) is False and jobs.get("no-such-job") is None


def test_a_search_no_worker_answers_in_time_fails_instead_of_waiting_forever(jobs):
    impatient = Jobs(jobs.redis, search_ttl=60, search_timeout=1)
    search = impatient.create("search", {"k": 3})
    load = impatient.create("load", {})
    assert impatient.get(search)["state"] == "queued"
    time.sleep(1.2)
    job = impatient.get(search)
    assert job["state"] == "failed" and job["error"]["code"] == "timed_out"
    assert impatient.start(search) is False  # the worker that turns up late does nothing
    assert impatient.finish(search, {"hits": []}) is False  # and could change nothing
    assert impatient.get(search)["state"] == "failed"
    assert impatient.start("no-such-job") is False and impatient.get("no-such-job") is None
    assert impatient.get(load)["state"] == "queued"  # loads wait for workers as long as it takes


def test_a_row_refused_while_planning_stays_when_an_item_of_the_same_name_is_done(jobs):
    job_id = jobs.create("load", {})
    jobs.start(job_id)
    jobs.record(job_id, planning_errors={"row 7": item_error("invalid_row", "row 7 has no id")})
    jobs.record(job_id, errors={"row 7": item_error("truncated", "cut short")})
    jobs.record(job_id, done=["row 7"])  # an item whose id is "row 7" fails, then is loaded after all
    jobs.set_total(job_id, 2)
    job = jobs.get(job_id)
    assert (job["state"], job["progress"]) == ("partial", {"total": 2, "done": 1, "failed": 1})
    assert job["errors"] == [{"id": "row 7", "code": "invalid_row", "message": "row 7 has no id"}]
    assert job["errors_by_code"] == {"invalid_row": 1}


def test_errors_are_read_a_page_at_a_time_and_past_the_cap_only_counted(jobs):
    capped = Jobs(jobs.redis, most_errors=5)
    job_id = capped.create("load", {})
    capped.start(job_id)
    capped.record(job_id, planning_errors={"row 3": item_error("invalid_row", "row 3 has no id")})
    capped.record(job_id, errors={f"item-{n:02}": item_error("missing_file", f"image {n}") for n in range(20)})
    capped.record(job_id, done=["item-01"])  # a stored error goes: its place is free for the next one
    capped.record(job_id, errors={"late": item_error("truncated", "cut short")})
    job = capped.get(job_id, error_offset=1, error_limit=3)
    assert job["progress"]["failed"] == 21 and job["errors_not_stored"] == 16
    assert job["errors_by_code"] == {"invalid_row": 1, "missing_file": 19, "truncated": 1}
    assert [error["id"] for error in job["errors"]] == ["item-00", "item-02", "item-03"]
    assert [error["id"] for error in capped.item_errors(job_id, 0, 10)] == [
        "row 3", "item-00", "item-02", "item-03", "late"
    ]  # fmt: skip
    assert capped.redis.zcard(f"lookalike:job:{job_id}:error_ids") == 5


def test_a_finished_load_and_all_its_parts_expire_and_a_late_task_writes_nothing_back(jobs):
    keeping = Jobs(jobs.redis, retention=120)
    job_id = keeping.create("load", {})
    keeping.start(job_id)
    assert keeping.count_delivery(job_id, "task-1") == 1 and keeping.count_delivery(job_id, "task-1") == 2
    keeping.remember_items(job_id, [{"id": "a"}, {"id": "b"}])
    keeping.record(job_id, done=["a"], errors={"b": item_error("missing_file", "gone")})
    assert keeping.active_loads() == [job_id]
    keeping.set_total(job_id, 2)
    parts = jobs.redis.keys(f"lookalike:job:{job_id}*")
    assert parts and all(0 < jobs.redis.ttl(key) <= 120 for key in parts), parts
    assert not jobs.redis.exists(f"lookalike:job:{job_id}:items")  # the plan is no longer needed
    assert keeping.active_loads() == [] and keeping.get(job_id)["progress"]["done"] == 1
    keeping.record(job_id, done=["b"])  # a late redelivery: counted, and it expires with the rest
    assert all(0 < jobs.redis.ttl(key) <= 120 for key in jobs.redis.keys(f"lookalike:job:{job_id}*"))
    for key in jobs.redis.keys(f"lookalike:job:{job_id}*"):
        jobs.redis.delete(key)  # the retention ran out
    keeping.record(job_id, done=["c"], errors={"d": item_error("missing_file", "gone")})
    assert keeping.count_delivery(job_id, "task-2") == 0
    assert jobs.redis.keys(f"lookalike:job:{job_id}*") == [] and keeping.get(job_id) is None
    keeping.redis.zadd("lookalike:loads", {job_id: time.time() - 200})  # listed when it was created
    keeping.create("load", {})
    assert job_id not in [load_id.decode() for load_id in jobs.redis.zrange("lookalike:loads", 0, -1)]


def test_the_items_a_running_load_is_missing_are_those_neither_done_nor_failed(jobs):
    job_id = jobs.create("load", {"source": "shop"})
    jobs.start(job_id)
    items = [{"id": f"item-{n}", "area": "catalog", "path": f"{n}.jpg", "metadata": {}} for n in range(2500)]
    jobs.remember_items(job_id, items)
    jobs.set_total(job_id, 2501)
    jobs.record(job_id, planning_errors={"item-7 (row 9)": item_error("duplicate_id", "again")})
    jobs.record(job_id, done=[f"item-{n}" for n in range(0, 2500, 2)], errors={"item-1": item_error("empty", "")})
    missing = jobs.missing_items(job_id)
    assert sorted(item["id"] for item in missing) == sorted(f"item-{n}" for n in range(3, 2500, 2))
    assert missing[0] == next(item for item in items if item["id"] == missing[0]["id"])
    activity = jobs.activity(job_id)
    assert (activity.state, activity.total, activity.requeued) == ("running", 2501, 0)
    assert jobs.note_requeued(job_id) == 1 and jobs.activity(job_id).idle_seconds < 1


def test_a_search_record_keeps_the_matched_photo_and_a_few_others_of_a_hit():
    photos = [f"catalog/p/{number}.jpg" for number in range(10)]
    hit = {"id": "p", "score": 0.9, "metadata": {"image": photos[0]}, "photo": 7, "photos": photos}
    kept = compact_hit(hit)
    assert kept["photos"] == [photos[0], photos[1], photos[2], photos[7]] and kept["photo"] == 3
    assert kept["photos"][kept["photo"]] == photos[7] and kept["photo_count"] == 10
    few = {**hit, "photo": 1, "photos": photos[:3]}
    assert compact_hit(few) == few


def test_every_request_waiting_for_a_job_wakes_when_it_finishes(jobs):
    job_id = jobs.create("search", {})
    woken: list[bool] = []
    waiters = [threading.Thread(target=lambda: woken.append(jobs.wait_until_finished(job_id, 30))) for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.2)
    jobs.finish(job_id, {"hits": []})
    for waiter in waiters:
        waiter.join(20)  # far less than their 30 s: woken by the finish, not by the end of the wait
    assert woken == [True, True, True]
    assert jobs.wait_until_finished(job_id, 1)  # one that comes later finds the word still there
    assert not jobs.wait_until_finished(jobs.create("search", {}), 0.1)
