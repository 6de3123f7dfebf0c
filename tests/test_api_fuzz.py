"""Schemathesis, a third-party fuzzer, against the served stack: the answers hold to web/openapi.json."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lookalike.redis_server import free_port
from lookalike.up import start_workers
from protocol.client import Client

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
