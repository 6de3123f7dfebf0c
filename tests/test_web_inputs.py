"""What the web decodes is bounded: a search's own pixel cap, a few decodes per process at once, a thumbnail's
file size; on a real Redis, with no worker running."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from common.settings import Settings
from tests.images import encode
from tests.test_web import error_of, search
from web.app import create_app


@pytest.fixture
def make_web(module_redis, tmp_path):
    """The web on an empty Redis, the catalogue root a folder of its own, with the settings given."""
    root = tmp_path / "root"
    root.mkdir()

    def make(**env: str):
        settings = Settings.from_env({"LOOKALIKE_REDIS_URL": module_redis, "LOOKALIKE_DATA_DIR": str(tmp_path / "d"),
                                      "LOOKALIKE_CATALOG_ROOT": str(root), **env})  # fmt: skip
        web = create_app(settings).test_client()
        web.application.extensions["lookalike"].redis.flushdb()
        return web

    return make


def test_a_search_upload_over_the_search_pixel_cap_is_413_though_a_load_would_take_it(make_web):
    web = make_web(LOOKALIKE_MAX_SEARCH_PIXELS="1000000", LOOKALIKE_MAX_PIXELS="2000000")
    response = search(web, encode(Image.new("RGB", (1100, 1000), "red"), "PNG"))
    assert response.status_code == 413 and error_of(response) == "too_large"
    assert "over the cap of 1,000,000 pixels" in response.get_json()["error"]["message"]
    at_the_cap = search(web, encode(Image.new("RGB", (1000, 1000), "red"), "PNG"))
    assert error_of(at_the_cap) == "no_worker"  # decoded and accepted; then no query worker to send it to


def test_an_image_that_finds_every_decode_of_its_process_busy_waits_then_gets_503_busy(make_web):
    web = make_web(LOOKALIKE_WEB_DECODES="1")
    photo = encode(Image.new("RGB", (64, 64), "blue"), "JPEG")
    root = web.application.extensions["lookalike"].settings.catalog_root
    (root / "photo.jpg").write_bytes(photo)
    holding, release = threading.Event(), threading.Event()

    def decode_elsewhere() -> None:  # another request of this process, in the middle of its decode
        with web.application.extensions["lookalike"].decoding():
            holding.set()
            release.wait(30)

    other = threading.Thread(target=decode_elsewhere)
    other.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        refused = search(web, photo)
        waited = time.monotonic() - started
        thumbnail = web.get("/thumbnails/catalog/photo.jpg")
    finally:
        release.set()
        other.join()
    assert refused.status_code == 503 and error_of(refused) == "busy" and refused.headers["Retry-After"] == "2"
    assert "decoding 1 images already" in refused.get_json()["error"]["message"]
    assert 1.5 < waited < 10
    assert thumbnail.status_code == 503 and thumbnail.headers["Retry-After"] == "2"
    assert error_of(search(web, photo)) == "no_worker"  # the decode is free again: decoded, then no query worker
    assert web.get("/thumbnails/catalog/photo.jpg").status_code == 200


def test_a_thumbnail_of_a_file_over_the_byte_cap_is_404_with_the_reason(make_web):
    web = make_web(LOOKALIKE_MAX_IMAGE_BYTES="3000")
    root = web.application.extensions["lookalike"].settings.catalog_root
    Image.effect_noise((64, 64), 64).save(root / "noisy.png")  # about 4 KB
    Image.new("RGB", (64, 64), "blue").save(root / "small.png")
    refused = web.get("/thumbnails/catalog/noisy.png")
    assert refused.status_code == 404
    assert "noisy.png can&#39;t be shown" in refused.get_data(as_text=True)
    assert "over LOOKALIKE_MAX_IMAGE_BYTES (3,000)" in refused.get_data(as_text=True)
    assert web.get("/thumbnails/catalog/small.png").status_code == 200
