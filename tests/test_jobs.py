"""Job records on a real Redis: counters that a re-delivered task can't inflate, and the job's final state."""

from __future__ import annotations

import time

import pytest
import redis

from protocol.jobs import Jobs, item_error


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
