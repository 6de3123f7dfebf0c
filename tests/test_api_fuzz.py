"""Schemathesis, a third-party fuzzer, against the served stack: the answers hold to web/openapi.json."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from lookalike.redis_server import free_port
from lookalike.up import start_workers
from protocol.client import Client
from tests.images import BAD_IMAGES, encode
from tests.test_web import AUTH, app_for

FUZZ_SECONDS = 90  # coverage, fuzzing and the stateful phase together: about 900 requests on 2 cores
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
ITEMS = 40
MANY_PHOTOS = 10  # products with three photos
API_KEY = "fuzzing-key"


def small_catalog(shared_dir: Path, root: Path) -> None:
    """A 40-product shop of the shared images, the first ten with three photos each (`images/<id>/`): the fuzzer
    may delete and load, so it gets a catalogue of its own."""
    sample = shared_dir / "data" / "fashion"
    images = root / "shop" / "images"
    images.mkdir(parents=True)
    lines = (sample / "styles.csv").read_text().splitlines()
    rows = [line for line in lines[1:] if (sample / "images" / f"{line.split(',')[0]}.jpg").exists()][:ITEMS]
    (root / "shop" / "styles.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    ids = [row.split(",")[0] for row in rows]
    for number, item_id in enumerate(ids):
        if number < MANY_PHOTOS:
            (images / item_id).mkdir()
            for other in ids[number : number + 3]:
                shutil.copy(sample / "images" / f"{other}.jpg", images / item_id)
        else:
            shutil.copy(sample / "images" / f"{item_id}.jpg", images)


@pytest.mark.slow
def test_the_served_api_holds_to_its_openapi_description_under_schemathesis(make_stack, shared_dir, tmp_path):
    small_catalog(shared_dir, tmp_path / "catalog")
    stack = make_stack(LOOKALIKE_API_KEY=API_KEY, LOOKALIKE_CATALOG_ROOT=str(tmp_path / "catalog"))
    start_workers(stack, stack.settings)
    url = stack.start_web(free_port())
    client = Client(stack.settings)
    load = client.follow(client.start_load(tmp_path / "catalog" / "shop"), timeout=300)
    assert load["progress"]["done"] == ITEMS, load
    fuzzer = Path(sys.executable).parent / "schemathesis"
    command = [str(fuzzer), "run", f"{url}/api/openapi.json", "--checks", CHECKS, "--max-time", str(FUZZ_SECONDS),
               "--phases", "examples,coverage,fuzzing,stateful", "--header", f"Authorization: Bearer {API_KEY}",
               "--workers", "1", "--request-timeout", "30", "--no-color"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=FUZZ_SECONDS + 240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]


# `PUT /api/items/<id>` fuzzed in this process, fast: any id, any number of any photos (genuine ones among them, so
# that the other fields are reached), metadata as any text or any JSON, any `wait`, stray fields.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
GENUINE = [encode(Image.new("RGB", (8, 8), "red"), "PNG"), encode(Image.new("RGB", (40, 30), "blue"), "JPEG")]
PHOTOS = st.sampled_from(GENUINE) | st.sampled_from([bad.values[0] for bad in BAD_IMAGES]) | st.binary(max_size=64)
FIELD_TEXT = st.text(max_size=40) | st.integers(-5, 20).map(str)


@pytest.fixture(scope="module")
def product_web(module_redis, tmp_path_factory, shared_dir):
    web = app_for(module_redis, tmp_path_factory.mktemp("fuzzed-puts"), shared_dir, LOOKALIKE_MAX_PHOTOS="3")
    web.application.extensions["lookalike"].redis.flushdb()
    return web


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    item_id=st.sampled_from(["shirt", "10186", "a b", "%", "é"]) | st.text(max_size=210),
    photos=st.lists(st.tuples(PHOTOS, st.text(max_size=20)), max_size=5),
    metadata=st.none() | JSON_VALUES.map(json.dumps) | st.text(max_size=60),
    wait=st.none() | st.sampled_from(["", "0", "1"]) | FIELD_TEXT,
    stray=st.none() | st.dictionaries(st.sampled_from(["photo", "metadata", "wait", "x"]), FIELD_TEXT, max_size=2),
)
def test_any_put_of_a_product_is_answered_in_json_202_or_4xx_never_a_server_error(
    product_web, item_id, photos, metadata, wait, stray
):
    data = {"photo": [(io.BytesIO(body), name or "photo") for body, name in photos]}
    data |= {name: value for name, value in (("metadata", metadata), ("wait", wait)) if value is not None}
    for name, value in (stray or {}).items():
        data[name] = [*([data[name]] if isinstance(data.get(name), str) else data.get(name, [])), value]
    response = product_web.put(f"/api/items/{quote(item_id, safe='')}", data=data, headers=AUTH)
    event(f"{response.status_code} {(response.get_json() or {}).get('error', {}).get('code', '')}")
    assert response.status_code in (202, 400, 404, 405, 413, 415), (response.status_code, response.data[:300])
    body = response.get_json()
    assert body is not None, response.data[:300]
    if response.status_code == 202:
        assert set(body) == {"job_id", "status_url", "page_url"}
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
