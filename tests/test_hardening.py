"""Hostile files, load and back-pressure against the real stack: Redis, worker processes and the web."""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import requests
from PIL import Image

from lookalike.redis_server import EmbeddedRedis, free_port
from lookalike.stack import Stack
from protocol import keys
from protocol.client import Client
from protocol.queues import Task
from protocol.readers import ask_replicas
from tests.conftest import BENCH
from tests.images import BAD_IMAGES, ODD_IMAGES, encode
from tests.test_catalog import sparse_archive
from tests.test_worker import (
    SAMPLE_SIZE,
    STYLES_ROWS,
    freeze_while_holding_a_message,
    image_bytes,
    loading,
    search,
)
from web.app import create_app

pytestmark = pytest.mark.slow

API_KEY = "k3y-that-must-never-be-logged"
WORKER_PEAK_BYTES = 1.5 * 2**30  # model session + one decoded batch; a decoded bomb alone would be 30 GB


def peak_memory(pid: int) -> int:
    """The most resident memory the process ever had (VmHWM), bytes."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def write_corpus(folder: Path) -> dict[str, str | None]:
    """Every bad and odd image as `<id>.jpg` with a CSV listing them; id -> the error code expected (None: fine)."""
    folder.mkdir(parents=True)
    expected: dict[str, str | None] = {}
    for param in BAD_IMAGES + ODD_IMAGES:
        item_id = param.id
        (folder / f"{item_id}.jpg").write_bytes(param.values[0])
        expected[item_id] = param.values[1] if len(param.values) > 1 else None
    with (folder / "catalog.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "image", "kind"])
        writer.writerows([item_id, f"{item_id}.jpg", "hostile"] for item_id in expected)
    return expected


def test_hostile_files_in_a_load_are_per_item_errors_and_no_worker_dies(make_stack):
    stack = make_stack()
    stack.start("index")
    stack.start("embed")
    workers = {stack.processes["index"].pid, stack.processes["embed"].pid, *stack.pool_children("embed")}
    expected = write_corpus(stack.settings.uploads_dir / "hostile")
    client = Client(stack.settings)
    job = client.follow(client.start_load(stack.settings.uploads_dir / "hostile" / "catalog.csv"), timeout=300)

    refused = {error["id"]: error["code"] for error in job["errors"]}
    assert refused == {item_id: code for item_id, code in expected.items() if code}
    assert job["progress"] == {"total": len(expected), "done": len(ODD_IMAGES), "failed": len(BAD_IMAGES)}
    assert job["errors_by_code"] == dict(sorted(Counter(code for code in expected.values() if code).items()))
    assert client.stats()["items"] == len(ODD_IMAGES)
    # no worker died or was replaced, and none held a decoded bomb in memory
    assert workers <= {stack.processes["index"].pid, stack.processes["embed"].pid, *stack.pool_children("embed")}
    assert not [log.name for log in stack.logs.glob("*.log") if "WorkerLostError" in log.read_text()]
    for pid in workers:
        assert peak_memory(pid) < WORKER_PEAK_BYTES, f"process {pid} peaked at {peak_memory(pid) / 2**30:.2f} GiB"


@pytest.mark.parametrize("data", ODD_IMAGES)
def test_odd_but_genuine_images_are_searched_through_the_api(live, served, data):
    response = live.post("/api/search", data={"image": (io.BytesIO(data), "odd.jpg"), "k": "3"})
    assert response.status_code == 202, response.get_json()
    job = served.client.follow(response.get_json()["job_id"], timeout=60)
    assert job["state"] == "done" and len(job["result"]["hits"]) == 3
    preview = live.get(f"/jobs/{job['id']}/preview.jpg")
    assert preview.status_code == 200 and preview.mimetype == "image/jpeg"
    assert preview.data.startswith(b"\xff\xd8") and b"<script" not in preview.data  # re-encoded, never echoed


def test_200_uploads_from_20_clients_are_all_answered(served, tmp_path):
    """The bounded version of bench/load.py: each answer a 202 whose search ends done, or a 429/503 with a reason
    and Retry-After; nothing else (no 500, no lost job)."""
    report = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, BENCH / "load.py", "--url", served.url, "--clients", "20", "--uploads", "200",
         "--json", report],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(BENCH.parent)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(report.read_text())
    print(result.stdout)
    assert figures["uploads"] == 200 and figures["bad_answers"] == 0 and figures["failed_jobs"] == 0
    assert set(figures["statuses"]) <= {"202", "429", "503"} and figures["statuses"].get("202", 0) > 0


def test_a_full_search_queue_answers_503_and_stalled_searches_fail(make_stack, shared_dir):
    """Back-pressure: with the query process frozen, searches queue up to the limit, then 503 busy + Retry-After.
    Those waiting longer than LOOKALIKE_SEARCH_TIMEOUT are failed (timed_out), and no query process runs them."""
    stack = make_stack(LOOKALIKE_MAX_QUEUED_SEARCHES="3", LOOKALIKE_SEARCH_TIMEOUT="4")
    stack.start("index")
    stack.start("query")
    web = create_app(stack.settings).test_client()
    photo = (shared_dir / "data" / "fashion" / "images" / "10186.jpg").read_bytes()

    def search():
        return web.post("/api/search", data={"image": (io.BytesIO(photo), "photo.jpg")})

    client = Client(stack.settings)
    os.killpg(stack.processes["query"].pid, signal.SIGSTOP)
    try:
        answers = [search() for _ in range(6)]
        accepted = [answer.get_json()["job_id"] for answer in answers if answer.status_code == 202]
        stalled = [client.follow(job_id, timeout=30) for job_id in accepted]
    finally:
        os.killpg(stack.processes["query"].pid, signal.SIGCONT)
    busy = [answer for answer in answers if answer.status_code == 503]
    assert len(accepted) >= 3 and busy and len(accepted) + len(busy) == 6
    assert busy[0].get_json()["error"]["code"] == "busy" and busy[0].headers["Retry-After"] == "2"
    assert {(job["state"], job["error"]["code"]) for job in stalled} == {("failed", "timed_out")}
    # the query process is back and the queue drains: the expired searches are dropped, not run
    stack.wait_for(lambda: stack.redis.llen("query") == 0, "the query queue to drain")
    fresh = search()
    assert fresh.status_code == 202, fresh.get_json()
    assert client.follow(fresh.get_json()["job_id"], timeout=60)["state"] == "done"
    assert all(client.jobs.get(job_id)["error"]["code"] == "timed_out" for job_id in accepted)


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_redis_restart_during_a_load_is_a_503_then_the_load_finishes(tmp_path, pretrained_model, shared_dir):
    """Redis stops (its append-only file kept) part way through a load: the web answers 503 with a reason, the
    workers reconnect by themselves once it is back, and every item of the load is accounted for: a batch embedded
    while Redis was away is still sent to the index owner, and a message Redis handed out just as it stopped (kombu
    had no time to note it as taken) is queued again by the load watchdog."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    stack = Stack(
        server.url, tmp_path / "data", pretrained_model, shared_dir / "data", LOOKALIKE_BATCH="8",
        LOOKALIKE_LOAD_STALL="20",
    )  # fmt: skip
    try:
        stack.start("index")
        stack.start("query")
        stack.start("embed")
        url = stack.start_web(free_port())
        client = Client(stack.settings)
        job_id = client.start_load(shared_dir / "data" / "fashion")
        stack.wait_for(lambda: client.jobs.get(job_id)["progress"]["done"] >= 200, "the load to get going", 120)
        server.stop()
        status, health = get_json(f"{url}/healthz")
        assert status == 503 and health["broker"]["reachable"] is False
        status, job = get_json(f"{url}/api/jobs/{job_id}")
        assert status == 503 and job["error"]["code"] == "broker_unavailable"
        time.sleep(3)
        server = EmbeddedRedis(tmp_path / "redis", port=server.port).start()
        job = client.follow(job_id, timeout=300)
        assert job["progress"] == {"total": STYLES_ROWS, "done": SAMPLE_SIZE, "failed": STYLES_ROWS - SAMPLE_SIZE}
        assert client.stats()["items"] == SAMPLE_SIZE
        stack.wait_for(lambda: get_json(f"{url}/healthz")[0] == 200, "the web to see a healthy service again")
    finally:
        stack.stop()
        server.stop()


def test_a_whole_embed_worker_killed_mid_load_is_replaced_and_the_load_finishes(make_stack, shared_dir):
    """kill -9 of the worker and its pool while it holds messages: a new worker gets them back within a minute
    (not Redis's visibility timeout of half an hour) and every item is indexed exactly once."""
    stack, client, job_id = loading(make_stack, shared_dir, done_at=100)
    freeze_while_holding_a_message(stack, "embed", "embed")
    stack.kill("embed")
    stack.start("embed")
    job = client.follow(job_id, timeout=240)
    assert job["progress"] == {"total": STYLES_ROWS, "done": SAMPLE_SIZE, "failed": STYLES_ROWS - SAMPLE_SIZE}
    assert job["errors_by_code"] == {"missing_file": STYLES_ROWS - SAMPLE_SIZE}
    assert client.stats()["items"] == SAMPLE_SIZE
    assert any("messages that no live worker holds" in log.read_text() for log in stack.logs.glob("*.log"))


def test_an_index_it_cannot_write_refuses_changes_and_keeps_answering_searches(make_stack, shared_dir):
    """Disk full, as the index owner sees it (a file size limit: every write that grows a file fails): a load's
    items fail with index_unwritable instead of being acknowledged, searches still work, and once there is room
    again the same load indexes them."""
    stack = make_stack(LOOKALIKE_API_KEY=API_KEY)
    stack.start("index")
    stack.start("query")
    stack.start("embed")
    client = Client(stack.settings)
    photos = shared_dir / "data" / "fashion" / "images"
    for name, ids in (("first", ("10186", "10227")), ("second", ("10230", "10279", "10428"))):
        folder = stack.settings.uploads_dir / name
        folder.mkdir(parents=True)
        for item_id in ids:
            (folder / f"{item_id}.jpg").write_bytes((photos / f"{item_id}.jpg").read_bytes())
    assert client.follow(client.start_load(stack.settings.uploads_dir / "first"), timeout=120)["state"] == "done"
    owner = stack.processes["index"].pid
    _, hard = resource.prlimit(owner, resource.RLIMIT_FSIZE)
    resource.prlimit(owner, resource.RLIMIT_FSIZE, (1, hard))  # the soft limit only: it can be lifted again
    try:
        refused = client.follow(client.start_load(stack.settings.uploads_dir / "second"), timeout=120)
        assert refused["state"] == "failed" and refused["errors_by_code"] == {"index_unwritable": 3}
        assert client.stats()["items"] == 2
        hits = search(client, (photos / "10227.jpg").read_bytes())["result"]["hits"]
        assert hits[0]["id"] == "10227"
    finally:
        resource.prlimit(owner, resource.RLIMIT_FSIZE, (hard, hard))
    again = client.follow(client.start_load(stack.settings.uploads_dir / "second"), timeout=120)
    assert again["state"] == "done" and client.stats()["items"] == 5
    assert stack.processes["index"].poll() is None and stack.processes["index"].pid == owner
    assert not [log.name for log in stack.logs.glob("*.log") if API_KEY in log.read_text()]  # no secret logged


class Planted:
    """Unpickling this runs a command: what a pickle message in Redis could do to a worker that accepted it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_workers_refuse_pickled_messages(make_stack, tmp_path):
    stack = make_stack()
    stack.start("embed")
    marker = tmp_path / "pickle-ran"
    client = Client(stack.settings)
    client.celery.send_task("lookalike.embed_batch", args=["job", [Planted(marker)]], serializer="pickle")
    log = stack.log_paths["embed"]
    stack.wait_for(lambda: "untrusted content" in log.read_text(), "the worker to refuse the message")
    assert not marker.exists() and stack.processes["embed"].poll() is None


def test_a_query_process_decodes_no_search_over_the_search_pixel_cap(make_stack):
    """The web checks an upload's pixels, and so does the query process: a search from any client is decoded under
    LOOKALIKE_MAX_SEARCH_PIXELS, not under the loads' LOOKALIKE_MAX_PIXELS."""
    stack = make_stack(LOOKALIKE_MAX_SEARCH_PIXELS="1000000")
    stack.start("index")
    stack.start("query")
    client = Client(stack.settings)
    refused = client.follow(client.search(encode(Image.new("RGB", (1100, 1000), "red"), "PNG")), timeout=60)
    assert refused["state"] == "failed" and refused["error"]["code"] == "too_large"
    assert "over the cap of 1,000,000 pixels" in refused["error"]["message"]
    at_the_cap = client.follow(client.search(encode(Image.new("RGB", (1000, 1000), "red"), "PNG")), timeout=60)
    assert at_the_cap["state"] == "done", at_the_cap


def test_a_130_byte_archive_that_unpacks_to_4_gib_fails_its_load_with_bad_catalog(make_stack):
    stack = make_stack()
    stack.start("index")
    stack.start("embed")
    stack.settings.uploads_dir.mkdir(parents=True)
    bomb = sparse_archive(stack.settings.uploads_dir / "bomb.tar.gz", "images/1.jpg", 4 * 2**30)
    client = Client(stack.settings)
    job = client.follow(client.start_load(bomb), timeout=120)
    assert job["state"] == "failed" and job["error"]["code"] == "bad_catalog"
    assert "holds a sparse file (images/1.jpg)" in job["error"]["message"]
    assert not list(stack.settings.archives_dir.rglob("*.jpg"))


def test_names_that_are_not_utf8_and_files_over_the_byte_cap_are_item_errors_and_the_rest_loads(make_stack, shared_dir):
    photo = (shared_dir / "data" / "fashion" / "images" / "10186.jpg").read_bytes()
    stack = make_stack(LOOKALIKE_MAX_IMAGE_BYTES=str(len(photo)))
    stack.start("index")
    stack.start("embed")
    folder = stack.settings.uploads_dir / "drop"
    folder.mkdir(parents=True)
    (folder / "10186.jpg").write_bytes(photo)
    (folder / "larger.jpg").write_bytes(photo + b"\0")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as file:
        file.write(photo)
    with (folder / "huge.jpg").open("wb") as file:
        file.truncate(4 * 2**30)  # holes: nothing on disk
    client = Client(stack.settings)
    job = client.follow(client.start_load(folder), timeout=120)
    assert job["progress"] == {"total": 4, "done": 1, "failed": 3}, job
    assert job["errors_by_code"] == {"invalid_name": 1, "too_large": 2}
    assert client.stats()["items"] == 1
    assert peak_memory(stack.processes["embed"].pid) < WORKER_PEAK_BYTES


def test_reads_and_searches_waiting_for_a_change_never_made_are_refused_at_once_and_hold_up_no_one(served, shared_dir):
    """Anonymous loops of `min_seq=999999999999` are 400 at the web, and a replica asked directly says `behind` at
    once instead of waiting for the change: plain reads beside the flood are answered as fast as without it."""
    bogus = 999_999_999_999
    photo = image_bytes(shared_dir, "10186")
    refusals: list[tuple[int, str]] = []
    stop = threading.Event()

    def flood() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                for path in (f"/api/items/10186?min_seq={bogus}", f"/api/items/10186/similar?min_seq={bogus}"):
                    answer = session.get(served.url + path, timeout=30)
                    refusals.append((answer.status_code, answer.json()["error"]["code"]))
                files = {"image": ("photo.jpg", photo)}
                answer = session.post(f"{served.url}/api/search", data={"min_seq": bogus}, files=files, timeout=30)
                refusals.append((answer.status_code, answer.json()["error"]["code"]))

    def plain_read() -> float:
        started = time.monotonic()
        answer = requests.get(f"{served.url}/api/items/10186/similar", timeout=30)
        assert answer.status_code == 200, answer.text
        return time.monotonic() - started

    alone = sorted(plain_read() for _ in range(10))
    floods = [threading.Thread(target=flood) for _ in range(4)]
    for thread in floods:
        thread.start()
    try:
        beside = sorted(plain_read() for _ in range(30))
    finally:
        stop.set()
        for thread in floods:
            thread.join(60)
    assert refusals and set(refusals) == {(400, "bad_parameter")}
    # Before, each bogus read held the one replica for a second: plain reads queued behind seconds of them.
    assert beside[len(beside) // 2] < max(0.5, 5 * alone[len(alone) // 2]), (alone, beside)
    started = time.monotonic()
    replica = ask_replicas(served.client.jobs.redis, Task.GET_ITEM, ["10186", bogus], 30)
    assert replica["error"]["code"] == "behind" and time.monotonic() - started < 0.5


def test_a_replica_drops_reads_it_cant_parse_and_answers_one_it_fails_on_with_index_error(served):
    """Garbage pushed to the replicas' list of reads is dropped with a log line (an answer never goes to a key that
    is not an answer's), a read the replica fails on is answered `index_error` (its asker then asks the owner),
    and the replica answers the next read."""
    client = served.client.jobs.redis
    outside = keys.job_key("0" * 32, keys.FINISHED)
    read = {"task": Task.GET_ITEM, "args": ["10186", 0], "answer_to": outside, "expires": time.time() + 60}
    garbage = [b"not json", json.dumps({"task": Task.GET_ITEM}), json.dumps(read),
               json.dumps({**read, "answer_to": keys.read_answer("x"), "expires": "soon"}),
               json.dumps({**read, "task": Task.DELETE_ITEMS, "answer_to": keys.read_answer("y")})]  # fmt: skip
    client.lpush(keys.READS, *garbage)
    failed = ask_replicas(client, Task.GET_ITEM, ["10186", "not a number"], 30)
    assert failed["error"]["code"] == "index_error"
    assert ask_replicas(client, Task.GET_ITEM, ["10186", 0], 30)["item"]["id"] == "10186"
    assert not client.exists(outside, keys.read_answer("x"), keys.read_answer("y")) and not client.llen(keys.READS)


def test_search_records_are_small_and_bounded_and_redis_is_capped_without_eviction(make_stack, shared_dir):
    """A search record keeps each hit's short metadata only; past LOOKALIKE_MAX_LIVE_SEARCHES live records, or with
    Redis at 80% of its maxmemory, a search is 503 `busy` with Retry-After; the embedded Redis has a cap and never
    evicts; /healthz and /metrics show Redis's memory."""
    stack = make_stack(LOOKALIKE_MAX_LIVE_SEARCHES="3", LOOKALIKE_SEARCH_TTL="4")
    for kind in ("index", "query", "embed"):
        stack.start(kind)
    shop = stack.settings.uploads_dir / "long"
    shop.mkdir(parents=True)
    (shop / "long-1.jpg").write_bytes(image_bytes(shared_dir, "10186"))
    description = "<p>" + "A shirt of fine cotton. " * 400 + "</p>"  # a shop export's HTML description
    (shop / "styles.csv").write_text(f'id,productDisplayName,description\nlong-1,Blue shirt,"{description}"\n')
    client = Client(stack.settings)
    assert client.follow(client.start_load(shop, shop / "styles.csv"), timeout=120)["state"] == "done"
    web = create_app(stack.settings).test_client()
    photo = image_bytes(shared_dir, "10186")

    def search():
        return web.post("/api/search", data={"image": (io.BytesIO(photo), "photo.jpg")})

    answers = [search() for _ in range(4)]
    assert [answer.status_code for answer in answers] == [202, 202, 202, 503]
    refused = answers[-1]
    assert (
        refused.get_json()["error"]["code"] == "busy"
        and "LOOKALIKE_MAX_LIVE_SEARCHES" in refused.get_json()["error"]["message"]
    )
    assert 2 <= int(refused.headers["Retry-After"]) <= 4
    hit = client.follow(answers[0].get_json()["job_id"], timeout=60)["result"]["hits"][0]
    assert hit["id"] == "long-1" and hit["metadata"] == {
        "productDisplayName": "Blue shirt",
        "image": hit["metadata"]["image"],
    }
    assert client.get_item("long-1")["metadata"]["description"] == description  # the whole item is a read away
    assert stack.redis.memory_usage(f"lookalike:job:{answers[0].get_json()['job_id']}") < 2048

    time.sleep(4.5)  # the records expire, and with them the count
    assert search().status_code == 202

    health = web.get("/healthz").get_json()["broker"]
    assert health["memory"]["max_bytes"] == 2 * 1024**3 and health["memory"]["policy"] == "noeviction"
    assert health["live_searches"] == 1
    metrics = web.get("/metrics").get_data(as_text=True)
    assert "lookalike_redis_memory_used_bytes" in metrics and "lookalike_live_searches 1.0" in metrics

    cap = stack.redis.config_get("maxmemory")["maxmemory"]
    stack.redis.config_set("maxmemory", int(stack.redis.info("memory")["used_memory"] / 0.9))  # 90% full
    try:
        time.sleep(2)  # the web reads Redis's memory at most once a second
        nearly_full = search()
        memory = web.get("/healthz").get_json()["broker"]["memory"]
    finally:
        stack.redis.config_set("maxmemory", cap)
    assert nearly_full.status_code == 503, (nearly_full.get_json(), memory)
    assert "Redis is nearly full" in nearly_full.get_json()["error"]["message"], memory
