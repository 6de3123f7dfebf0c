"""One product at a time: `PUT /api/items/<id>` (and `lookalike put`) with its photos and metadata, checked before
anything is kept or queued, kept by content, loaded as a load of one product, answered with the `seq` to read at."""

from __future__ import annotations

import io
import json
import stat
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from common.products import ProductError, check_metadata, keep_photo, parse_metadata
from common.settings import Settings
from lookalike.redis_server import free_port
from lookalike.stack import LOOKALIKE, Stack
from lookalike.up import start_workers
from protocol import keys
from protocol.client import Client
from protocol.queues import Queue
from tests.images import BAD_IMAGES, encode
from tests.test_web import API_KEY, AUTH, app_for, error_of, photo
from web.app import create_app

SHIRT, BAG, TOP = "10186", "10227", "11013"  # shared catalogue photos, 60 x 80 pixels each
REFUSALS = ["no-photo", "too-many", "a-list", "nested", "not-json", "twice", "wait", "text-photo", "long-id", "dots",
            "tab-in-id"]  # fmt: skip


def put(web, item_id: str, photos: list[tuple[bytes, str]], headers: dict | None = None, **fields):
    """A PUT as a shop's backend sends it: each photo a file of the repeated field `photo`."""
    data = {"photo": [(io.BytesIO(data), name) for data, name in photos], **fields}
    return web.put(f"/api/items/{item_id}", data=data, headers=AUTH if headers is None else headers)


def nothing_queued(web) -> None:
    """No job record, no message, no photo kept."""
    service = web.application.extensions["lookalike"]
    assert not service.redis.keys("lookalike:job:*") and not service.redis.zcard(keys.LOADS)
    assert service.redis.llen(Queue.EMBED) == 0
    assert not (service.settings.uploads_dir / "photos").exists()


# -- the rules, without Redis --------------------------------------------------------------------------------------


def test_metadata_is_a_json_object_of_text_fields_and_numbers_or_booleans_are_taken_as_their_text():
    fields = parse_metadata('{"gender": " Women ", "price": 19.5, "stock": 3, "sale": true, "note": "", "x": null}')
    assert fields == {"gender": "Women", "price": "19.5", "stock": "3", "sale": "true"}  # empty ones left out
    assert parse_metadata("{}") == {} and check_metadata({"colour": "Blue"}) == {"colour": "Blue"}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[1, 2]", "must be a JSON object"),
        ('"Women"', "must be a JSON object"),
        ("{gender: Women}", "not valid JSON"),
        ('{"size": {"eu": 40}}', "must be text (or a number, true or false), not an object"),
        ('{"sizes": [40, 41]}', "not a list"),
        ('{"price": NaN}', "not valid JSON"),
        ('{"price": 1e999}', "not a float"),
        ('{"a": "1", "a": "2"}', "given twice"),
        ('{"image": "elsewhere.jpg"}', "set by lookalike"),
        ('{"id": "7"}', "set by lookalike"),
        ('{"a=b": "1"}', "without '='"),
        ('{"  ": "1"}', "a name is 1 to 200 printable characters"),
        (json.dumps({f"f{n}": "v" for n in range(201)}), "at most 200"),
        (json.dumps({"text": "x" * 70_000}), "over 65,536 bytes"),
    ],
)
def test_metadata_that_is_no_object_of_text_fields_is_refused_saying_why(text, says):
    with pytest.raises(ProductError) as refused:
        parse_metadata(text)
    assert says in str(refused.value)


def test_a_photo_is_kept_by_its_content_once_and_readable_by_every_worker(tmp_path, shared_dir):
    settings = Settings.from_env({"LOOKALIKE_DATA_DIR": str(tmp_path)})
    jpeg, png = photo(shared_dir, SHIRT), encode(Image.new("RGB", (40, 40), "red"), "PNG")
    kept = keep_photo(settings, jpeg)
    path = settings.uploads_dir / kept
    assert kept.startswith("photos/") and path.suffix == ".jpg" and path.read_bytes() == jpeg
    assert path.parent.name == path.stem[:2] and len(path.stem) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    written = path.stat().st_mtime_ns
    time.sleep(0.01)
    assert keep_photo(settings, jpeg) == kept and path.stat().st_mtime_ns == written  # nothing written again
    assert keep_photo(settings, png).endswith(".png")  # the suffix is its format's, whatever it was called
    assert sorted(p.name for p in (settings.uploads_dir / "photos").rglob("*") if p.is_file()) == sorted(
        [path.name, Path(keep_photo(settings, png)).name]
    )  # no temporary file left behind


# -- refused before anything is kept or queued (the web on a real Redis, no worker) ----------------------------------


@pytest.fixture
def idle(module_redis, tmp_path, shared_dir):
    web = app_for(module_redis, tmp_path, shared_dir, LOOKALIKE_MAX_PHOTOS="3")
    web.application.extensions["lookalike"].redis.flushdb()
    return web


@pytest.mark.parametrize(("data", "code"), BAD_IMAGES)
def test_a_bad_photo_is_refused_with_its_code_naming_which_photo_and_nothing_is_kept_or_queued(
    idle, shared_dir, data, code
):
    response = put(idle, "shirt", [(photo(shared_dir, SHIRT), "front.jpg"), (data, "back.jpg")])
    assert response.status_code == {"empty": 400, "too_large": 413}.get(code, 415)
    assert error_of(response) == code
    assert response.get_json()["error"]["message"].startswith("photo 2 (back.jpg): ")
    nothing_queued(idle)


@pytest.mark.parametrize(
    ("item_id", "photos", "fields", "code", "says"),
    [
        ("shirt", 0, {}, "missing_image", "multipart file field `photo`"),
        ("shirt", 4, {}, "bad_parameter", "4 photos: a product has at most 3 (LOOKALIKE_MAX_PHOTOS)"),
        ("shirt", 1, {"metadata": "[1]"}, "bad_parameter", "must be a JSON object"),
        ("shirt", 1, {"metadata": '{"size": {"eu": 40}}'}, "bad_parameter", "not an object"),
        ("shirt", 1, {"metadata": "{not json"}, "bad_parameter", "not valid JSON"),
        ("shirt", 1, {"metadata": ['{"a": "1"}', '{"b": "2"}']}, "bad_parameter", "send `metadata` once"),
        ("shirt", 1, {"wait": "11"}, "bad_parameter", "wait must be a whole number from 0 to 10"),
        ("shirt", 1, {"photo": "not a file"}, "missing_image", "as a file"),
        ("x" * 201, 1, {}, "bad_parameter", "is refused: an id is 1 to 200 printable characters"),
        ("..", 1, {}, "bad_parameter", "is refused: an id is"),
        ("a%09b", 1, {}, "bad_parameter", "is refused: an id is"),
    ],
    ids=REFUSALS,
)
def test_a_put_with_no_photo_too_many_bad_metadata_a_bad_id_or_wait_is_400_and_queues_nothing(
    idle, shared_dir, item_id, photos, fields, code, says
):
    sent = [(photo(shared_dir, SHIRT), f"{number}.jpg") for number in range(photos)]
    if "photo" in fields:  # a photo sent as a text field, not a file
        response = idle.put(f"/api/items/{item_id}", data=fields, headers=AUTH)
    else:
        response = put(idle, item_id, sent, **fields)
    assert response.status_code == 400 and error_of(response) == code, response.get_json()
    assert says in response.get_json()["error"]["message"]
    nothing_queued(idle)


def test_a_put_without_the_key_is_401_before_its_body_is_read(idle, shared_dir):
    for headers in ({}, {"Authorization": "Bearer not-the-key"}):
        response = put(idle, "shirt", [(photo(shared_dir, SHIRT), "front.jpg")], headers=headers)
        assert response.status_code == 401 and error_of(response) == "unauthorized"
    nothing_queued(idle)


def test_with_redis_down_a_put_is_503_broker_unavailable(tmp_path, shared_dir):
    web = app_for(f"redis://127.0.0.1:{free_port()}/0", tmp_path, shared_dir)
    response = put(web, "shirt", [(photo(shared_dir, SHIRT), "front.jpg")], metadata='{"gender": "Men"}')
    assert response.status_code == 503 and error_of(response) == "broker_unavailable"


def test_metadata_may_come_as_a_json_file_and_a_put_is_queued_as_a_load_of_one_product(idle, shared_dir):
    data = {"photo": [(io.BytesIO(photo(shared_dir, SHIRT)), "front.jpg")],
            "metadata": (io.BytesIO(b'{"gender": "Men"}'), "shirt.json")}  # fmt: skip
    response = idle.put("/api/items/shirt", data=data, headers=AUTH)
    assert response.status_code == 202, response.get_json()
    job = idle.get(response.get_json()["status_url"]).get_json()
    assert (job["kind"], job["state"], job["params"]) == ("load", "running", {"item": "shirt", "photos": 1})
    assert job["progress"]["total"] == 1 and job["item_url"] == "/api/items/shirt"
    service = idle.application.extensions["lookalike"]
    (message,) = [json.loads(raw) for raw in service.redis.lrange(Queue.EMBED, 0, -1)]
    assert message["headers"]["task"] == "lookalike.embed_batch"  # no plan: straight to an embed worker
    assert [load["params"] for load in idle.get("/api/catalog/loads").get_json()["loads"]] == [job["params"]]
    assert "product shirt" in idle.get("/catalog").get_data(as_text=True)
    assert "Product shirt" in idle.get(response.get_json()["page_url"]).get_data(as_text=True)


def test_a_product_whose_message_is_lost_is_queued_again_by_the_load_watchdog(load_watchdog, shared_dir):
    watchdog, jobs = load_watchdog, load_watchdog.jobs
    client = jobs.redis
    job_id = Client(watchdog.settings).put_item("shirt", [photo(shared_dir, SHIRT)], {"gender": "Men"})
    sent = client.lrange(Queue.EMBED, 0, -1)
    client.delete(Queue.EMBED)  # lost on the way
    client.hset(keys.job_key(job_id), "progressed", time.time() - 6)
    assert watchdog.check() == 1
    assert client.lrange(Queue.EMBED, 0, -1)[0].count(b"shirt") == sent[0].count(b"shirt")  # the same product
    unplanned = jobs.create("load", {"item": "hat", "photos": 1})  # its record never got its item: nothing to send
    client.hset(keys.job_key(unplanned), "progressed", time.time() - 6)
    watchdog.check()
    assert jobs.get(unplanned)["state"] == "failed" and jobs.get(unplanned)["error"]["code"] == "lost"


# -- real processes ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shop(redis_databases, tmp_path_factory, pretrained_model, shared_dir):
    """The index owner, a replica, a query process and embedders on an empty index, and the web in this process."""
    url = redis_databases.take()
    data = tmp_path_factory.mktemp("shop")
    stack = Stack(url, data, pretrained_model, shared_dir / "data", LOOKALIKE_API_KEY=API_KEY)
    stack.redis.flushdb()
    try:
        start_workers(stack, stack.settings)
        yield stack
    finally:
        stack.stop()
        redis_databases.give_back(url)


def kept_photos(stack: Stack) -> list[Path]:
    return sorted(path for path in (stack.settings.uploads_dir / "photos").rglob("*") if path.is_file())


def test_a_product_put_with_wait_is_answered_200_with_its_seq_and_read_back_whole_at_that_seq(shop, shared_dir):
    web = create_app(shop.settings).test_client()
    photos = [(photo(shared_dir, SHIRT), "front.jpg"), (photo(shared_dir, BAG), "back.jpg")]
    metadata = json.dumps({"productDisplayName": "Black Shirt", "gender": "Men", "price": 25})
    answer = put(web, "shirt-1", photos, metadata=metadata, wait="10")
    assert answer.status_code == 200, answer.get_json()
    job = answer.get_json()
    assert (job["kind"], job["state"], job["progress"]) == ("load", "done", {"total": 1, "done": 1, "failed": 0})
    assert isinstance(job["seq"], int) and answer.headers["Location"] == f"/api/jobs/{job['id']}"
    item = web.get(f"/api/items/shirt-1?min_seq={job['seq']}").get_json()
    assert len(item["photos"]) == 2 and all(reference.startswith("uploads/photos/") for reference in item["photos"])
    assert item["metadata"] == {"productDisplayName": "Black Shirt", "gender": "Men", "price": "25",
                                "image": item["photos"][0]}  # fmt: skip
    assert [web.get(url).status_code for url in item["photo_urls"]] == [200, 200]
    assert (shop.settings.uploads_dir / item["photos"][0].removeprefix("uploads/")).read_bytes() == photos[0][0]
    search = web.post("/api/search", data={"image": (io.BytesIO(photos[1][0]), "bag.jpg"), "min_seq": str(job["seq"]),
                                           "wait": "10"}).get_json()  # fmt: skip
    assert search["result"]["hits"][0]["id"] == "shirt-1" and search["result"]["hits"][0]["photo"] == 1


def test_the_same_put_twice_changes_nothing_and_still_answers_a_seq_to_read_at(shop, shared_dir):
    web = create_app(shop.settings).test_client()
    photos = [(photo(shared_dir, SHIRT), "front.jpg"), (photo(shared_dir, TOP), "worn.jpg")]
    metadata = json.dumps({"productDisplayName": "Shirt, twice"})
    first = put(web, "shirt-2", photos, metadata=metadata, wait="10").get_json()
    assert first["state"] == "done", first
    checksum, files = shop.redis.hget(keys.CHECKSUMS, "shirt-2"), kept_photos(shop)
    changes = Client(shop.settings).stats(min_seq=first["seq"])["seq"]
    again = put(web, "shirt-2", photos, metadata=metadata, wait="10")
    assert again.status_code == 200 and again.get_json()["state"] == "done", again.get_json()
    assert again.get_json()["seq"] == first["seq"]  # the change that holds it: it made none
    assert shop.redis.hget(keys.CHECKSUMS, "shirt-2") == checksum and kept_photos(shop) == files
    assert Client(shop.settings).stats(min_seq=again.get_json()["seq"])["seq"] == changes  # no change was made
    item = web.get(f"/api/items/shirt-2?min_seq={again.get_json()['seq']}").get_json()
    assert len(item["photos"]) == 2 and item["metadata"]["productDisplayName"] == "Shirt, twice"


def test_a_put_with_one_photo_replaces_the_products_photos_and_metadata(shop, shared_dir):
    web = create_app(shop.settings).test_client()
    two = [(photo(shared_dir, SHIRT), "front.jpg"), (photo(shared_dir, BAG), "back.jpg")]
    first = put(web, "shirt-3", two, metadata='{"colour": "Black"}', wait="10").get_json()
    before = web.get(f"/api/items/shirt-3?min_seq={first['seq']}").get_json()["photos"]
    replaced = put(web, "shirt-3", [(photo(shared_dir, TOP), "new.jpg")], wait="10").get_json()
    assert replaced["state"] == "done" and replaced["seq"] > first["seq"], replaced
    item = web.get(f"/api/items/shirt-3?min_seq={replaced['seq']}").get_json()
    assert len(before) == 2 and len(item["photos"]) == 1 and item["photos"][0] not in before
    assert item["metadata"] == {"image": item["photos"][0]}  # its colour is gone too: a PUT is the whole product
    assert Client(shop.settings).stats(min_seq=replaced["seq"])["photos"] == 2 + 2 + 1  # no orphan vector left


def test_without_wait_a_put_is_202_and_its_load_finishes_with_its_seq(shop, shared_dir):
    web = create_app(shop.settings).test_client()
    answer = put(web, "shirt-4", [(photo(shared_dir, SHIRT), "front.jpg")], metadata='{"gender": "Men"}')
    assert answer.status_code == 202 and answer.headers["Location"] == answer.get_json()["status_url"]
    job = web.get(f"{answer.get_json()['status_url']}?wait=10").get_json()
    assert job["state"] == "done" and job["params"] == {"item": "shirt-4", "photos": 1}, job
    assert web.get(f"/api/items/shirt-4?min_seq={job['seq']}").get_json()["metadata"]["gender"] == "Men"
    assert any(load["id"] == job["id"] for load in web.get("/api/catalog/loads").get_json()["loads"])


def test_lookalike_put_adds_a_product_from_the_command_line_and_refuses_a_bad_photo_before_queueing(
    shop, shared_dir, tmp_path
):
    front, back, bad = tmp_path / "front.jpg", tmp_path / "back.png", tmp_path / "notes.jpg"
    front.write_bytes(photo(shared_dir, SHIRT))
    back.write_bytes(encode(Image.open(io.BytesIO(photo(shared_dir, BAG))), "PNG"))
    bad.write_text("not a photo")
    run = subprocess.run([LOOKALIKE, "put", "shirt-5", front, back, "--field", "gender=Men", "--field", "price=25"],
                         env=shop.env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    seq = int(run.stdout.split("seq ")[1].split()[0])
    item = Client(shop.settings).get_item("shirt-5", min_seq=seq)
    assert item["metadata"] == {"gender": "Men", "price": "25", "image": item["photos"][0]}
    assert item["photos"][1].endswith(".png") and len(item["photos"]) == 2
    loads = shop.redis.zcard(keys.LOADS)
    refused = subprocess.run([LOOKALIKE, "put", "shirt-5", front, bad], env=shop.env, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"{bad}: the file is not an image in a known format (not_an_image)" in refused.stderr
    usage = subprocess.run([LOOKALIKE, "put", "shirt-5", front, "--field", "gender"], env=shop.env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert usage.returncode == 2 and "expected NAME=VALUE" in usage.stderr
    assert shop.redis.zcard(keys.LOADS) == loads  # neither was queued
    as_json = subprocess.run([LOOKALIKE, "put", "shirt-5", front, "--json"], env=shop.env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["state"] == "done"
