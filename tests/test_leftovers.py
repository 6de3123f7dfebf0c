"""What a request, a load or a process leaves in the data folder goes once nothing needs it: an upload once its load
has finished, what refused and killed unpackings left soon after, and the logs of `lookalike up` are rotated."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from common.areas import CatalogError, new_upload_folder
from common.errors import ErrorCode
from common.settings import Settings
from lookalike import stack as stack_module
from lookalike.stack import LOG_BACKUPS, Stack
from lookalike.up import tend
from protocol.celery_app import create_celery
from protocol.client import Client
from protocol.jobs import item_error
from tests.images import encode
from tests.test_writes import API_KEY, AUTH, web_for
from worker.catalog import plan_catalog
from worker.leftovers import UNCLAIMED_SECONDS, remove_leftovers
from worker.watchdog import LoadWatchdog

HOUR = 3600.0


def archive(names: list[str]) -> bytes:
    """A tar archive of small photos with these names."""
    photo = encode(Image.new("RGB", (8, 8), "red"), "JPEG")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in names:
            member = tarfile.TarInfo(name)
            member.size = len(photo)
            tar.addfile(member, io.BytesIO(photo))
    return buffer.getvalue()


def backdate(folder: Path, seconds: float) -> None:
    """Make the folder and what it holds look untouched for `seconds`."""
    then = time.time() - seconds
    for path in (*folder.rglob("*"), folder):
        os.utime(path, (then, then))


def test_an_uploaded_catalogue_stays_while_its_load_runs_and_goes_once_it_finished(module_redis, tmp_path,
                                                                                     shared_dir):  # fmt: skip
    web = web_for(module_redis, tmp_path, shared_dir, LOOKALIKE_API_KEY=API_KEY)
    settings, jobs = web.application.config["LOOKALIKE"], web.application.extensions["lookalike"].jobs
    upload = {"archive": (io.BytesIO(archive(["a.jpg", "b.jpg"])), "shop.tar"),
              "csv": (io.BytesIO(b"id,colour\na,red\n"), "shop.csv")}  # fmt: skip
    accepted = web.post("/api/catalog/loads", data=upload, headers=AUTH)
    assert accepted.status_code == 202
    job_id = accepted.get_json()["job_id"]
    (folder,) = settings.uploads_dir.iterdir()
    assert sorted(path.name for path in folder.iterdir()) == ["catalog.tar", "metadata.csv"]
    backdate(folder, HOUR)  # a long load: only the load itself keeps its upload
    watchdog = LoadWatchdog(create_celery(settings), jobs, settings)
    watchdog.check()
    assert folder.is_dir()  # queued: a worker will read it
    jobs.start(job_id)
    watchdog.check()
    assert folder.is_dir()  # running: the watchdog may have to plan it again
    jobs.fail(job_id, item_error(ErrorCode.BAD_CATALOG, "refused"))
    watchdog.check()
    assert not folder.exists() and not any(settings.uploads_dir.iterdir())


@pytest.mark.slow
def test_the_index_owner_removes_an_uploaded_catalogue_once_its_load_finished_and_keeps_its_images(
    make_stack, shared_dir
):
    stack = make_stack(LOOKALIKE_LOAD_STALL="5")  # the owner's watchdog then looks every second
    stack.start("index")
    stack.start("embed")
    folder = new_upload_folder(stack.settings)  # as the web saves an upload, then queues its load
    folder.mkdir(parents=True)
    photos = shared_dir / "data" / "fashion" / "images"
    with tarfile.open(folder / "catalog.tar", "w") as tar:
        for item_id in ("10186", "10227"):
            tar.add(photos / f"{item_id}.jpg", f"images/{item_id}.jpg")
    client = Client(stack.settings)
    job = client.follow(client.start_load(folder / "catalog.tar"), timeout=120)
    assert job["state"] == "done" and client.stats()["items"] == 2
    backdate(folder, UNCLAIMED_SECONDS + 60)
    stack.wait_for(lambda: not folder.exists(), "the index owner to remove the finished load's upload", timeout=30)
    (unpacked,) = stack.settings.archives_dir.iterdir()  # what the items point at, and a build embeds again
    assert sorted(path.name for path in unpacked.rglob("*.jpg")) == ["10186.jpg", "10227.jpg"]
    assert client.get_item("10186")["metadata"]["image"] == f"archives/{unpacked.name}/images/10186.jpg"


def test_an_upload_no_load_ever_claimed_goes_after_a_while_and_folders_lookalike_did_not_make_stay(tmp_path):
    settings = Settings.from_env({"LOOKALIKE_DATA_DIR": str(tmp_path)})
    orphans = [new_upload_folder(settings) for _ in range(2)]  # a web that died between saving and queueing
    for folder in orphans:
        folder.mkdir(parents=True)
        (folder / "catalog.tar").write_bytes(archive(["a.jpg"]))
    backdate(orphans[0], UNCLAIMED_SECONDS + 60)
    own = settings.uploads_dir / "spring"  # images a shop put there itself, and loaded from there
    own.mkdir()
    (own / "a.jpg").write_bytes(b"photo")
    backdate(own, 30 * 24 * HOUR)
    assert remove_leftovers(settings, load_sources=[]) == [orphans[0]]
    assert sorted(settings.uploads_dir.iterdir()) == sorted([orphans[1], own])


def test_a_refused_archive_leaves_nothing_behind_in_the_archives_folder(tmp_path):
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "shop.tar").write_bytes(archive(["a.jpg", "b.jpg", "c.jpg"]))
    settings = Settings.from_env({"LOOKALIKE_DATA_DIR": str(tmp_path / "data"), "LOOKALIKE_CATALOG_ROOT": str(catalog),
                                  "LOOKALIKE_MAX_ARCHIVE_MEMBERS": "2"})  # fmt: skip
    with pytest.raises(CatalogError, match="LOOKALIKE_MAX_ARCHIVE_MEMBERS"):
        plan_catalog(settings, "shop.tar")
    assert not any(settings.archives_dir.iterdir())


def test_what_a_killed_unpacking_left_goes_once_its_task_is_surely_gone(tmp_path):
    settings = Settings.from_env({"LOOKALIKE_DATA_DIR": str(tmp_path), "LOOKALIKE_TASK_TIME_LIMIT": "60"})
    digest = "d" * 64
    unpacked, dead, running = (settings.archives_dir / name for name in (digest, f".{digest}.k1", f".{digest}.k2"))
    for folder in (unpacked, dead, running):
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "a.jpg").write_bytes(b"photo")
    backdate(unpacked, 30 * 24 * HOUR)  # indexed items point at its images: it stays however old
    backdate(dead, 2 * 60 + 10)
    backdate(running, 60)  # its task may still be unpacking
    assert remove_leftovers(settings, load_sources=[]) == [dead]
    assert sorted(settings.archives_dir.iterdir()) == sorted([unpacked, running])


def test_each_start_of_a_process_rotates_its_log_and_a_few_are_kept(tmp_path):
    stack = Stack("redis://127.0.0.1:1/0", tmp_path, tmp_path / "model.onnx", tmp_path)
    for _ in range(LOG_BACKUPS + 3):
        stack._spawn("settings", "settings").wait(60)
    assert stack.log_paths["settings"] == stack.logs / "settings.log"
    expected = ["settings.log", *(f"settings.log.{number}" for number in range(1, LOG_BACKUPS + 1))]
    assert sorted(path.name for path in stack.logs.iterdir()) == sorted(expected)
    assert all("LOOKALIKE_BATCH=" in (stack.logs / name).read_text() for name in expected)


def test_a_log_that_grows_past_its_cap_is_rotated_while_its_process_writes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(stack_module, "LOG_MAX_BYTES", 1000)
    stack = Stack("redis://127.0.0.1:1/0", tmp_path, tmp_path / "model.onnx", tmp_path)
    path = stack.log_paths["web"] = stack.logs / "web.log"
    with path.open("ab", buffering=0) as log:  # as the process holds it: open, appending
        for round_number in range(LOG_BACKUPS + 2):
            log.write(f"round {round_number}\n".encode() + b"x" * 1000)
            tend(stack)  # what `lookalike up` does each second
            assert path.stat().st_size == 0
        log.write(b"and on\n")
    assert path.read_bytes() == b"and on\n"  # written at the new end: no gap of zeros where the old lines were
    backups = sorted(stack.logs.glob("web.log.*"))
    assert len(backups) == LOG_BACKUPS
    assert (stack.logs / "web.log.1").read_bytes().startswith(f"round {LOG_BACKUPS + 1}\n".encode())
