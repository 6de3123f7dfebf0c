"""The web with Flask's test client: every endpoint and error status, on a real Redis, with and without workers."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from common.settings import Settings
from lookalike.redis_server import free_port
from protocol.client import MAX_SEARCH_PHOTOS
from protocol.jobs import FINISHED
from tests.images import BAD_IMAGES, encode, side_by_side
from web.app import create_app

MAX_UPLOAD = 200_000
API_KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}  # writes need it (tests/test_writes.py)
FORM_TOKEN = re.compile(r'action="[^"]*\?csrf_token=([0-9a-f]+)"')


def photo(shared_dir: Path, item_id: str = "10186") -> bytes:
    return (shared_dir / "data" / "fashion" / "images" / f"{item_id}.jpg").read_bytes()


TWO_PRODUCTS = ("10186", "10227")  # a black shirt and a purple handbag, 60 x 80 pixels each


def two_products(shared_dir: Path) -> bytes:
    """A 120 x 80 photo of two catalogue products side by side."""
    return side_by_side(*(shared_dir / "data" / "fashion" / "images" / f"{item}.jpg" for item in TWO_PRODUCTS))


def app_for(redis_url: str, tmp_path: Path, shared_dir: Path, **env: str):
    settings = Settings.from_env(
        {
            "LOOKALIKE_REDIS_URL": redis_url,
            "LOOKALIKE_DATA_DIR": str(tmp_path),
            "LOOKALIKE_CATALOG_ROOT": str(shared_dir / "data"),
            "LOOKALIKE_MAX_UPLOAD": str(MAX_UPLOAD),
            "LOOKALIKE_CALL_TIMEOUT": "2",
            "LOOKALIKE_API_KEY": API_KEY,
            **env,
        }
    )
    return create_app(settings).test_client()


@pytest.fixture
def idle(module_redis, tmp_path, shared_dir):
    """The web on a real, empty Redis with no worker running."""
    web = app_for(module_redis, tmp_path, shared_dir)
    web.application.extensions["lookalike"].redis.flushdb()
    return web


def search(web, data: bytes, filename: str = "photo.jpg", **fields: str | list[str]):
    return web.post("/api/search", data={"image": (io.BytesIO(data), filename), **fields})


def catalog_form(web, fields: dict, **options):
    """The catalogue page's form as a browser sends it: signed in with the key, with its page's CSRF token."""
    web.post(f"/catalog/key?csrf_token={page_token(web)}", data={"api_key": API_KEY})
    return web.post(f"/catalog?csrf_token={page_token(web)}", data=fields, **options)


def page_token(web) -> str:
    return FORM_TOKEN.search(web.get("/catalog").get_data(as_text=True)).group(1)


def error_of(response) -> str:
    assert response.is_json, response.data[:200]
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]["code"]


# -- requests refused before anything is queued -------------------------------------------------------------


@pytest.mark.parametrize(("data", "code"), BAD_IMAGES)
def test_bad_uploads_get_their_own_code_and_status(idle, data, code):
    response = search(idle, data)
    assert response.status_code == {"empty": 400, "too_large": 413}.get(code, 415)
    assert error_of(response) == code


def test_an_upload_over_the_cap_is_413(idle):
    response = search(idle, encode(Image.effect_noise((400, 400), 64).convert("RGB"), "PNG"))
    assert response.status_code == 413 and error_of(response) == "too_large"
    huge = search(idle, b"\xff" * (MAX_UPLOAD + 100_000))  # over the request cap: refused before it is read
    assert huge.status_code == 413 and error_of(huge) == "too_large"


@pytest.mark.parametrize("k", ["0", "101", "-3", "abc", "1.5", "9" * 30])
def test_k_outside_1_to_100_is_400(idle, shared_dir, k):
    response = search(idle, photo(shared_dir), k=k)
    assert response.status_code == 400 and error_of(response) == "bad_parameter"


@pytest.mark.parametrize("value", ["gender", "=Men", "x" * 300 + "=1"])
def test_malformed_filters_are_400(idle, shared_dir, value):
    response = search(idle, photo(shared_dir), filter=value)
    assert response.status_code == 400 and error_of(response) == "bad_parameter"


@pytest.mark.parametrize("min_seq", ["-1", "abc", "1.5", "9" * 19])
def test_a_min_seq_that_is_not_a_sequence_number_is_400(idle, shared_dir, min_seq):
    for response in (search(idle, photo(shared_dir), min_seq=min_seq), idle.get(f"/api/items/1?min_seq={min_seq}"),
                     idle.get(f"/api/items/1/similar?min_seq={min_seq}")):  # fmt: skip
        assert response.status_code == 400 and error_of(response) == "bad_parameter"


@pytest.mark.parametrize(
    ("crop", "reason"),
    [
        ("1,2,3", "four whole numbers"),
        ("a,b,c,d", "four whole numbers"),
        ("0,0,60.5,80", "four whole numbers"),
        ("0,0,0,80", "must be positive, not 0x80"),
        ("0,0,60,-80", "must be positive, not 60x-80"),
        ("-1,0,60,80", "starts outside the image"),
        ("70,0,60,80", "reaches outside the image, which is 120x80 pixels"),
        ("0,0,31,80", "too small to search; make it at least 32x32"),
    ],
)
def test_a_bad_crop_box_is_400_saying_what_is_wrong_with_it(idle, shared_dir, crop, reason):
    response = search(idle, two_products(shared_dir), crop=crop)
    assert response.status_code == 400 and error_of(response) == "bad_parameter"
    assert reason in response.get_json()["error"]["message"]
    form = idle.post("/search", data={"image": (io.BytesIO(two_products(shared_dir)), "two.png"), "crop": crop})
    assert form.status_code == 400 and reason in form.get_data(as_text=True)


def test_a_search_without_an_image_is_400(idle):
    response = idle.post("/api/search", data={"k": "5"})
    assert response.status_code == 400 and error_of(response) == "missing_image"


def test_a_search_of_more_photos_than_the_cap_or_of_several_with_a_crop_is_400(idle, shared_dir):
    many = [(io.BytesIO(photo(shared_dir)), f"{n}.jpg") for n in range(MAX_SEARCH_PHOTOS + 1)]
    too_many = idle.post("/api/search", data={"image": many})
    assert (
        too_many.status_code == 400 and f"at most {MAX_SEARCH_PHOTOS} photos" in too_many.get_json()["error"]["message"]
    )
    two = [(io.BytesIO(photo(shared_dir)), "a.jpg"), (io.BytesIO(photo(shared_dir)), "b.jpg")]
    cropped = idle.post("/api/search", data={"image": two, "crop": "0,0,40,40"})
    assert cropped.status_code == 400 and "single `image`" in cropped.get_json()["error"]["message"]
    over = [(io.BytesIO(photo(shared_dir)), "a.jpg"), (io.BytesIO(b"\xff" * (MAX_UPLOAD + 10)), "b.jpg")]
    too_large = idle.post("/api/search", data={"image": over})  # the request is within its cap, photo 2 is not
    assert too_large.status_code == 413 and too_large.get_json()["error"]["message"].startswith("photo 2: ")


def test_with_no_index_worker_searches_and_item_reads_are_503_at_once(idle, shared_dir):
    for response in (search(idle, photo(shared_dir)), idle.get("/api/items/10186"),
                     idle.get("/api/items/10186/similar"), idle.delete("/api/items/10186", headers=AUTH)):  # fmt: skip
        assert response.status_code == 503 and error_of(response) == "no_worker"
        assert response.headers["Retry-After"]
    health = idle.get("/healthz")
    assert health.status_code == 503
    assert health.get_json()["index"] == {"alive": False} and health.get_json()["broker"]["reachable"]


@pytest.mark.parametrize("job_id", ["nope", "0123456789abcdef0123456789abcdef", "G" * 32])
def test_unknown_jobs_are_404(idle, job_id):
    response = idle.get(f"/api/jobs/{job_id}")
    assert response.status_code == 404 and error_of(response) == "not_found"
    assert idle.get(f"/jobs/{job_id}").status_code == 404


A_JOB = "/api/jobs/0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "query",
    [f"{A_JOB}?errors_limit=many", f"{A_JOB}?errors_limit=\u00b2", f"{A_JOB}?errors_offset={'9' * 5000}",
     "/api/catalog/loads?limit=0", "/api/catalog/loads?limit=1000", "/api/catalog/loads?limit=-1",
     "/api/items/10186/similar?k=\u00b2"],
)  # fmt: skip
def test_bad_numbers_in_queries_are_400(idle, query):
    response = idle.get(query)
    assert response.status_code == 400 and error_of(response) == "bad_parameter"
    assert idle.get("/thumbnails/catalog/fashion/images/10186.jpg?size=\u00b2").status_code == 400


def test_wrong_methods_and_routes(idle):
    wrong = idle.put("/api/search")
    assert wrong.status_code == 405 and error_of(wrong) == "method_not_allowed"
    missing = idle.get("/api/nothing-here")
    assert missing.status_code == 404 and error_of(missing) == "not_found"


# -- catalogue loads: who may start them, and what they accept --------------------------------------------


@pytest.mark.parametrize(
    "request_body",
    [
        {"json": {}},
        {"json": ["fashion"]},
        {"json": {"source": "../../etc"}},
        {"json": {"source": "/etc"}},  # a leading / is the catalogue root, which has no etc
        {"json": {"source": "no-such-folder"}},
        {"json": {"source": "fashion", "metadata": "../../etc/passwd"}},
        {"data": {"archive": (io.BytesIO(b"zip"), "catalog.zip")}},
        {"data": {"archive": (io.BytesIO(b"tar"), "c.tar"), "source": "fashion"}},
        {"data": {"source": "fashion", "csv": (io.BytesIO(b"id\n1\n"), "m.txt")}},
    ],
    ids=["empty", "not-an-object", "dot-dot", "rooted", "missing", "metadata-outside", "zip", "both", "not-csv"],
)
def test_bad_load_requests_are_400_and_leave_no_upload_behind(idle, request_body):
    response = idle.post("/api/catalog/loads", headers=AUTH, **request_body)
    assert response.status_code == 400 and error_of(response) == "bad_parameter"
    uploads = idle.application.extensions["lookalike"].settings.uploads_dir
    assert not uploads.exists() or not any(uploads.iterdir())


@pytest.mark.parametrize(
    "headers",
    [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Origin": "http://evil.example"},
     {"Origin": "http://localhost:9999"}],
)  # fmt: skip
def test_writes_from_another_sites_page_are_refused(idle, headers):
    for response in (idle.post("/api/catalog/loads", json={"source": "fashion"}, headers=headers),
                     catalog_form(idle, {"source": "fashion"}, headers=headers),
                     idle.delete("/api/items/10186", headers=headers)):  # fmt: skip
        assert response.status_code == 403
    assert error_of(idle.post("/api/catalog/loads", json={"source": "fashion"}, headers=headers)) == "cross_site"
    own_page = {"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"}
    assert catalog_form(idle, {"source": "fashion"}, headers=own_page).status_code == 303


def test_a_catalogue_upload_over_its_cap_is_413(module_redis, tmp_path, shared_dir):
    web = app_for(module_redis, tmp_path, shared_dir, LOOKALIKE_MAX_CATALOG_UPLOAD="100000")
    archive = (io.BytesIO(b"\0" * 300_000), "big.tar")
    response = web.post("/api/catalog/loads", data={"archive": archive}, headers=AUTH)
    assert response.status_code == 413 and "100,000" in response.get_json()["error"]["message"]


# -- thumbnails -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference",
    ["catalog/../outside.jpg", "catalog/%2e%2e/outside.jpg", "catalog/link.jpg", "catalog/linked/outside.jpg",
     f"catalog/{'..%2f' * 3}outside.jpg", "uploads/../outside.jpg", "home/outside.jpg", "catalog/notes.txt",
     "catalog/none.jpg"],
)  # fmt: skip
def test_thumbnails_never_leave_the_catalogue(module_redis, tmp_path, reference):
    """A real photo sits beside the catalogue root, reachable by `..`, by a link to it and by a linked folder."""
    root, photo_bytes = tmp_path / "root", encode(Image.new("RGB", (32, 32), "blue"), "JPEG")
    root.mkdir()
    (tmp_path / "outside.jpg").write_bytes(photo_bytes)
    (root / "inside.jpg").write_bytes(photo_bytes)
    (root / "notes.txt").write_text("not an image")
    (root / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    (root / "linked").symlink_to(tmp_path)
    web = create_app(Settings.from_env({"LOOKALIKE_REDIS_URL": module_redis, "LOOKALIKE_DATA_DIR": str(tmp_path / "d"),
                                        "LOOKALIKE_CATALOG_ROOT": str(root)})).test_client()  # fmt: skip
    assert web.get("/thumbnails/catalog/inside.jpg").status_code == 200
    assert web.get(f"/thumbnails/{reference}").status_code == 404


@pytest.mark.parametrize(
    ("endpoint", "argument", "value"),
    [("api.item", "item_id", "10186"), ("pages.item", "item_id", "a b/é?#%&+"),
     ("pages.thumbnail", "reference", "catalog/img dir/ü#1.jpg"), ("pages.thumbnail", "reference", "LINK-MARK")],
)  # fmt: skip
def test_the_links_of_hits_are_the_urls_url_for_builds(module_redis, tmp_path, endpoint, argument, value):
    from flask import url_for

    from web.api import link

    app = create_app(Settings.from_env({"LOOKALIKE_REDIS_URL": module_redis, "LOOKALIKE_DATA_DIR": str(tmp_path)}))
    with app.test_request_context("/", base_url="http://shop.example/lookalike"):
        assert link(endpoint, **{argument: value}) == url_for(endpoint, **{argument: value})
        assert link(endpoint, **{argument: "10227"}) == url_for(endpoint, **{argument: "10227"})  # built once


def test_thumbnails_are_small_jpegs_the_browser_may_cache(idle):
    response = idle.get("/thumbnails/catalog/fashion/images/10186.jpg")
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    assert "max-age" in response.headers["Cache-Control"] and "public" in response.headers["Cache-Control"]
    assert max(Image.open(io.BytesIO(response.data)).size) <= 320
    again = idle.get(
        "/thumbnails/catalog/fashion/images/10186.jpg", headers={"If-None-Match": response.headers["ETag"]}
    )
    assert again.status_code == 304 and not again.data


# -- pages, operators' endpoints, the API's own description ---------------------------------------------------


def test_pages_say_what_is_wrong_in_a_sentence(idle, shared_dir):
    home = idle.get("/")
    assert home.status_code == 200 and b"No index worker is running" in home.data
    refused = idle.post("/search", data={"image": (io.BytesIO(b"plain text"), "x.jpg")})
    assert refused.status_code == 415 and b"That file is not an image" in refused.data
    no_worker = idle.post("/search", data={"image": (io.BytesIO(photo(shared_dir)), "x.jpg")})
    assert no_worker.status_code == 503 and b"No index worker is running" in no_worker.data
    catalog = idle.get("/catalog")
    assert catalog.status_code == 200 and b"No catalogue loads yet" in catalog.data
    not_signed_in = idle.post("/catalog", data={"source": "fashion"})
    assert not_signed_in.status_code == 401 and b"enter the API key on the catalogue page" in not_signed_in.data
    unavailable = idle.get("/items/10186")
    assert unavailable.status_code == 503 and unavailable.headers["Retry-After"]
    assert b"No index worker is running" in unavailable.data
    for page in (home, refused, catalog):
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]


def metric_samples(text: str) -> dict[tuple, float]:
    """(name, *sorted label pairs) -> value, as prometheus_client's parser reads the exposition."""
    return {
        (sample.name, *sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_are_prometheus_text(idle, shared_dir):
    search(idle, b"text")
    idle.post("/api/catalog/loads", json={"source": "fashion"}, headers=AUTH)
    response = idle.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    samples = metric_samples(response.get_data(as_text=True))  # prometheus_client's own parser
    refused = ("lookalike_http_requests_total", ("method", "POST"), ("route", "/api/search"), ("status", "415"))
    assert samples[refused] == 1
    assert samples["lookalike_jobs_created_total", ("kind", "load")] == 1
    assert samples["lookalike_queue_depth", ("queue", "embed")] == 1
    assert samples["lookalike_workers_alive", ("role", "index")] == 0
    assert samples["lookalike_broker_up",] == 1
    assert samples["lookalike_http_request_duration_seconds_bucket", ("le", "+Inf"), ("route", "/api/search")] == 1
    assert samples["lookalike_search_duration_seconds_count",] == 0


def test_metric_labels_are_bounded_by_the_routes_and_the_http_methods(idle):
    for number in range(5):
        idle.open(f"/api/jobs/{number:032x}", method=f"MADEUP{number}")
        idle.get(f"/no/such/page/{number}")
        idle.get(f"/api/jobs/{number:032x}")
    samples = metric_samples(idle.get("/metrics").get_data(as_text=True))
    requests = [dict(labels) for name, *labels in samples if name == "lookalike_http_requests_total"]
    assert {"route": "(no route)", "method": "OTHER", "status": "405"} in requests
    assert {(labels["route"], labels["method"]) for labels in requests} == {
        ("(no route)", "OTHER"), ("/api/jobs/<job_id>", "GET"), ("(no route)", "GET")
    }  # fmt: skip


@pytest.mark.parametrize("bad", ["a%00b", "x" * 5000, "%ff%fe", "..%2f..%2fetc", "catalog/a%00.jpg"])
def test_a_nul_byte_or_an_impossible_name_in_any_route_is_a_4xx_never_a_500(module_redis, tmp_path, shared_dir, bad):
    web = app_for(module_redis, tmp_path, shared_dir, LOOKALIKE_API_KEY="key")
    for rule in web.application.url_map.iter_rules():
        if "<" not in rule.rule:
            continue
        path = re.sub(r"<[^>]+>", bad, rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            response = web.open(path, method=method, headers={"Authorization": "Bearer key"})
            # no worker runs here: an item can't be read, and says so
            unanswerable = response.status_code == 503 and "no index worker is running" in response.text
            assert response.status_code < 500 or unanswerable, (method, path[:80], response.status_code)


@pytest.mark.parametrize("source", ["fashion\x00", {"path": "fashion"}, ["fashion"], "x" * 5000, "y" * 300 + "/z"])
def test_a_load_of_a_source_that_is_no_file_name_is_400(module_redis, tmp_path, shared_dir, source):
    web = app_for(module_redis, tmp_path, shared_dir, LOOKALIKE_API_KEY="key")
    for fields in ({"source": source}, {"source": "fashion", "metadata": source}):
        response = web.post("/api/catalog/loads", json=fields, headers={"Authorization": "Bearer key"})
        assert response.status_code == 400 and error_of(response) == "bad_parameter"


def test_loads_are_shown_by_their_catalogue_reference_never_a_server_path(module_redis, tmp_path, shared_dir):
    web = app_for(module_redis, tmp_path, shared_dir, LOOKALIKE_API_KEY="key")
    started = web.post(
        "/api/catalog/loads", json={"source": "fashion/styles.csv"}, headers={"Authorization": "Bearer key"}
    )
    assert started.status_code == 202
    for page in (web.get("/catalog"), web.get("/api/catalog/loads"), web.get(started.get_json()["page_url"])):
        text = page.get_data(as_text=True)
        assert "catalog/fashion/styles.csv" in text and str(shared_dir.resolve()) not in text


def test_the_openapi_file_documents_exactly_the_api_routes(idle):
    spec = idle.get("/api/openapi.json").get_json()
    documented = {(path, method.upper()) for path, item in spec["paths"].items() for method in item}
    routes = {
        (rule.rule.replace("<", "{").replace(">", "}"), method)
        for rule in idle.application.url_map.iter_rules()
        if rule.rule.startswith(("/api/", "/healthz", "/metrics"))
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert documented == routes


# -- Redis down ------------------------------------------------------------------------------------------------


def test_with_redis_down_every_endpoint_answers_503_or_degrades(tmp_path, shared_dir):
    web = app_for(f"redis://127.0.0.1:{free_port()}/0", tmp_path, shared_dir)
    submitted = search(web, encode(Image.new("RGB", (64, 64), "red"), "PNG"))
    assert submitted.status_code == 503 and error_of(submitted) == "broker_unavailable"
    assert web.get("/api/jobs/0123456789abcdef0123456789abcdef").status_code == 503
    assert web.post("/api/catalog/loads", json={"source": "fashion"}, headers=AUTH).status_code == 503
    health = web.get("/healthz")
    assert health.status_code == 503 and health.get_json()["broker"]["reachable"] is False
    assert web.delete("/api/items/10186", headers=AUTH).status_code == 503
    assert error_of(web.get("/api/items/10186")) == "broker_unavailable"
    metrics = web.get("/metrics")
    assert metrics.status_code == 200 and metric_samples(metrics.get_data(as_text=True))["lookalike_broker_up",] == 0
    home = web.get("/")
    assert home.status_code == 200 and b"Redis" in home.data
    assert web.get("/catalog").status_code == 503


# -- against the real service: workers loaded with the shared sample ------------------------------------------


def follow(web, status_url: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = web.get(status_url).get_json()
        if job["state"] in FINISHED:
            return job
        time.sleep(0.05)
    raise AssertionError(f"{status_url} did not finish in {timeout} s")


@pytest.mark.slow
def test_a_search_through_the_api_finds_the_product_with_links(live, shared_dir):
    response = search(live, photo(shared_dir, "10186"), k="5")
    assert response.status_code == 202 and response.headers["Location"] == response.get_json()["status_url"]
    job = follow(live, response.get_json()["status_url"])
    assert {"id", "kind", "state", "progress", "result", "created", "finished"} <= set(job)
    hits = job["result"]["hits"]
    assert len(hits) == 5 and hits[0]["id"] == "10186" and hits[0]["score"] > 0.999
    assert hits[0]["page_url"] == "/items/10186" and hits[0]["item_url"] == "/api/items/10186"
    thumbnail = live.get(hits[0]["thumbnail_url"])
    assert thumbnail.status_code == 200 and thumbnail.mimetype == "image/jpeg"
    filtered = follow(live, search(live, photo(shared_dir, "10186"), k="3", filter=["gender=Women"]).location)
    assert [hit["metadata"]["gender"] for hit in filtered["result"]["hits"]] == ["Women"] * 3
    nothing = follow(live, search(live, photo(shared_dir, "10186"), filter=["gender=Nobody"]).location)
    assert nothing["state"] == "done" and nothing["result"]["hits"] == []


@pytest.mark.slow
def test_a_search_with_wait_is_answered_in_the_request_and_without_a_thread_to_wait_with_is_202(served, shared_dir):
    live = create_app(served.stack.settings).test_client()
    answered = search(live, photo(shared_dir, "10186"), k="3", wait="10")
    assert answered.status_code == 200 and answered.headers["Location"] == f"/api/jobs/{answered.get_json()['id']}"
    job = answered.get_json()
    assert job["state"] == "done" and job["result"]["hits"][0]["id"] == "10186"
    assert job["result"]["hits"][0]["page_url"] == "/items/10186"
    queued = search(live, photo(shared_dir, "10230"), k="3")  # 202; then its record, waited for
    waited = live.get(f"{queued.get_json()['status_url']}?wait=10").get_json()
    assert waited["state"] == "done" and waited["result"]["hits"][0]["id"] == "10230"
    assert search(live, photo(shared_dir, "10186"), wait="11").get_json()["error"]["code"] == "bad_parameter"
    assert live.get(f"/api/jobs/{job['id']}?wait=x").status_code == 400
    settings = dataclasses.replace(served.stack.settings, web_waiting=0)  # every thread may be taken: none waits
    idle = create_app(settings).test_client()
    assert search(idle, photo(shared_dir, "10186"), wait="10").status_code == 202


@pytest.mark.slow
def test_a_search_of_several_photos_answers_each_in_order_a_bad_one_with_its_own_error(live, shared_dir):
    photos = [(io.BytesIO(photo(shared_dir, "10227")), "bag.jpg"), (io.BytesIO(b"not an image"), "notes.jpg"),
              (io.BytesIO(photo(shared_dir, "10186")), "shirt.jpg")]  # fmt: skip
    answered = live.post("/api/search", data={"image": photos, "k": "3", "wait": "10"})
    assert answered.status_code == 200, answered.get_json()
    job = answered.get_json()
    assert job["state"] == "partial" and job["params"]["photos"] == 3
    bag, notes, shirt = job["result"]["results"]
    assert bag["hits"][0]["id"] == "10227" and shirt["hits"][0]["id"] == "10186" and len(shirt["hits"]) == 3
    assert shirt["hits"][0]["page_url"] == "/items/10186" and "hits" not in notes
    assert notes["error"]["code"] == "not_an_image"
    page = live.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert page.count("Photo 2 of 3") == 1 and page.count('class="card"') == 6 and "That file is not an image" in page
    unreadable = [(io.BytesIO(b"no"), "a.jpg"), (io.BytesIO(b"neither"), "b.jpg")]
    failed = follow(live, live.post("/api/search", data={"image": unreadable}).location)
    assert failed["state"] == "failed" and failed["error"]["code"] == "not_an_image"


@pytest.mark.slow
def test_a_filter_on_a_field_the_catalogue_does_not_have_is_400_naming_the_fields_it_has(live, shared_dir):
    for response in (
        search(live, photo(shared_dir, "10186"), filter=["gender=Women", "madeUp=1"]),
        live.get("/api/items/10186/similar?filter=madeUp=1"),
    ):
        assert response.status_code == 400 and response.get_json()["error"]["code"] == "unknown_field"
        assert "'madeUp'" in response.get_json()["error"]["message"]
        assert "articleType, baseColour" in response.get_json()["error"]["message"]


@pytest.mark.slow
def test_the_form_redirects_to_a_job_page_that_shows_the_gallery(live, shared_dir):
    form = live.get("/")
    assert b'value="gender=Women"' in form.data and b"1,002 products" in form.data
    submitted = live.post("/search", data={"image": (io.BytesIO(photo(shared_dir, "10227")), "p.jpg"), "k": "4"})
    assert submitted.status_code == 303 and submitted.location.startswith("/jobs/")
    job_id = submitted.location.rsplit("/", 1)[1]
    follow(live, f"/api/jobs/{job_id}")
    page = live.get(submitted.location).get_data(as_text=True)
    assert page.count('class="card"') == 4 and 'href="/items/10227"' in page
    preview = live.get(f"/jobs/{job_id}/preview.jpg")
    assert preview.status_code == 200 and preview.mimetype == "image/jpeg"


@pytest.mark.slow
def test_a_crop_around_one_of_two_products_finds_that_product_and_the_result_names_the_box(live, shared_dir):
    for crop, left, product in zip(("0,0,60,80", "60,0,60,80"), (0, 60), TWO_PRODUCTS, strict=True):
        job = follow(live, search(live, two_products(shared_dir), k="3", crop=crop).location)
        assert job["state"] == "done" and job["result"]["hits"][0]["id"] == product, job
        assert job["result"]["crop"] == {"x": left, "y": 0, "width": 60, "height": 80}
    whole = follow(live, search(live, two_products(shared_dir), k="3", crop="").location)  # the form without a box
    assert whole["state"] == "done" and "crop" not in whole["result"]

    form = {"image": (io.BytesIO(two_products(shared_dir)), "two.png"), "k": "3", "crop": "60,0,60,80"}
    submitted = live.post("/search", data=form)
    job_id = submitted.location.rsplit("/", 1)[1]
    follow(live, f"/api/jobs/{job_id}")
    page = live.get(submitted.location).get_data(as_text=True)
    assert "searched only the box at 60,0, 60x80 pixels of your photo" in page and 'href="/items/10227"' in page
    assert "more like this</label>" in page and 'name="from_job"' not in page  # the preview has the box on it
    preview = np.asarray(Image.open(io.BytesIO(live.get(f"/jobs/{job_id}/preview.jpg").data)))
    assert preview.shape == (80, 120, 3)
    assert preview[40, 61, 2] > 180 and preview[40, 61, 0] < 120, "the box's left edge is drawn on the preview"


@pytest.mark.slow
def test_items_more_like_this_and_their_page(live):
    item = live.get("/api/items/10186").get_json()
    assert item["metadata"]["articleType"] == "Shirts" and item["thumbnail_url"].startswith("/thumbnails/catalog/")
    similar = live.get("/api/items/10186/similar?k=3&filter=gender=Men").get_json()["hits"]
    assert len(similar) == 3 and "10186" not in [hit["id"] for hit in similar]
    assert live.get("/api/items/no-such-item").status_code == 404
    assert live.get("/api/items/no-such-item/similar").status_code == 404
    assert error_of(live.get("/api/items/10186/similar?k=500")) == "bad_parameter"
    page = live.get("/items/10186").get_data(as_text=True)
    assert "More like this" in page and page.count('class="card"') == 12
    assert live.get("/items/no-such-item").status_code == 404


@pytest.mark.slow
def test_health_and_metrics_of_a_running_service(live):
    health = live.get("/healthz")
    body = health.get_json()
    assert health.status_code == 200 and body["status"] == "ok", body
    assert body["index"]["items"] == 1002 and body["query_workers"]["providers"] == ["CPUExecutionProvider"]
    assert len(body["index"]["model_sha256"]) == 64 and body["embed_workers"]["alive"] == 2
    (replica,) = body["replicas"]
    assert replica["items"] == 1002 and replica["taking_reads"] and replica["lag_seconds"] <= 5
    samples = metric_samples(live.get("/metrics").get_data(as_text=True))
    assert samples["lookalike_workers_alive", ("role", "embed")] == 2 and samples["lookalike_index_items",] == 1002
    assert samples["lookalike_workers_alive", ("role", "replica")] == 1
    assert samples["lookalike_workers_alive", ("role", "query")] == 1
    replica_name = ("replica", f"{replica['host']}:{replica['pid']}")
    assert samples["lookalike_replica_lag_changes", replica_name] == replica["lag_changes"]
    assert samples["lookalike_jobs_finished_total", ("kind", "load"), ("state", "partial")] >= 1


@pytest.mark.slow
def test_delete_then_upload_an_archive_that_brings_the_item_back(live, served, shared_dir, tmp_path):
    auth = {"Authorization": f"Bearer {served.api_key}"}  # the key lookalike web made at its first start
    deleted = live.delete("/api/items/10227", headers=auth).get_json()
    assert deleted == {"deleted": "10227", "seq": deleted["seq"]} and deleted["seq"] > 1002
    assert live.get(f"/api/items/10227?min_seq={deleted['seq']}").status_code == 404  # read your own write
    assert live.delete("/api/items/10227", headers=auth).status_code == 404

    with open(shared_dir / "data" / "fashion" / "styles.csv", newline="") as styles:
        rows = csv.reader(styles)
        header, row = next(rows), next(row for row in rows if row[0] == "10227")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, data in (("styles.csv", f"{','.join(header)}\n{','.join(row)}\n".encode()),
                           ("images/10227.jpg", photo(shared_dir, "10227"))):  # fmt: skip
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    archive.seek(0)
    response = live.post("/api/catalog/loads", data={"archive": (archive, "one.tar.gz")}, headers=auth)
    assert response.status_code == 202
    job = follow(live, response.get_json()["status_url"])
    assert (job["state"], job["progress"]) == ("done", {"total": 1, "done": 1, "failed": 0})
    assert job["seq"] == deleted["seq"] + 1
    item = live.get(f"/api/items/10227?min_seq={job['seq']}").get_json()
    assert item["metadata"]["productDisplayName"] == row[-1]
    assert item["metadata"]["image"].startswith("archives/")
    assert live.get(item["thumbnail_url"]).status_code == 200
    page = live.get(f"/jobs/{job['id']}").get_data(as_text=True)
    assert 'value="100"' in page and '<span class="state">done</span>' in page
    listed = live.get("/api/catalog/loads?limit=1").get_json()["loads"][0]
    assert listed["id"] == job["id"] and listed["params"]["source"] == "uploads/" + listed["params"]["source"][8:]
    assert str(served.stack.settings.data_dir) not in json.dumps(listed)  # no server paths for clients
