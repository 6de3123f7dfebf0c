"""Model changes without downtime, with real processes: an index of another model is built beside the serving one
while searches go on, writes made meanwhile reach it, it is switched in, the replica follows, a rollback serves
the old one again; an owner killed in the middle of a build goes on with what the new index lacks; an index
folder from before aliases is adopted in place."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import redis

from common.model import load_model
from common.settings import Settings
from lookalike.stack import LOOKALIKE, Stack
from lookalike.up import start_workers
from protocol.client import Client
from protocol.heartbeats import Role
from protocol.queues import Queue, Task
from tests.onnx_models import pooling_model
from tests.test_scale_out import ask, loaded_stack
from tests.test_worker import SAMPLE_SIZE, image_bytes
from web.app import create_app
from worker.aliases import ADOPTED, read_alias
from worker.index import IndexParams, Photo
from worker.owner import IndexOwner
from worker.snapshots import ModelIdentity
from worker.store import DurableIndex
from worker.wal import Change


def another_model(model: Path, folder: Path, name: str = "again") -> Path:
    """The same network under another sha256: its vectors are those of `model`, but the index must not know it."""
    graph = onnx.load(str(model))
    graph.doc_string = f"the same weights, exported again as {name}"
    path = folder / f"{name}.onnx"
    onnx.save(graph, str(path))
    return path


def owner_beat(stack: Stack) -> dict:
    return stack.heartbeat(Role.INDEX)[0]


def searching(client: Client, photo: bytes, stop: threading.Event, failures: list, answered: list) -> None:
    while not stop.is_set():
        job = client.follow(client.search(photo, 3), timeout=60)
        if job["state"] != "done" or job["result"]["hits"][0]["id"] != "10186":
            failures.append(job)
        answered.append(job["id"])


def switched(stack: Stack, index_id: str) -> dict | None:
    beat = owner_beat(stack)
    return beat if beat["index_id"] == index_id else None


def replica_follows(stack: Stack, client: Client, model_sha256: str) -> dict:
    """Wait for the replica to hold the owner's index, then compare the two item by item, vector by vector."""
    stack.wait_for(
        lambda: any(beat["model_sha256"] == model_sha256 for beat in stack.heartbeat(Role.REPLICA)),
        "the replica to follow the switch",
    )
    seq = owner_beat(stack)["seq"]
    owner = ask(client, "owner", Task.INDEX_STATS, seq, True)["stats"]
    replica = ask(client, "replica", Task.INDEX_STATS, seq, True)["stats"]
    assert (owner["model_sha256"], replica["model_sha256"]) == (model_sha256, model_sha256)
    assert replica["digest"] == owner["digest"] and replica["items"] == owner["items"]
    return owner


@pytest.mark.slow
def test_an_index_of_another_model_is_built_beside_switched_in_followed_and_rolled_back(
    make_stack, shared_dir, pretrained_model, tmp_path
):
    """Searches go on all along and none fails; a delete and a load made during the build are in the new index;
    /healthz shows the build's progress; the replica follows the switch and the rollback."""
    stack, client, _ = loaded_stack(make_stack, shared_dir)
    old = owner_beat(stack)
    new_model = another_model(pretrained_model, tmp_path)
    stop, failures, answered = threading.Event(), [], []
    searcher = threading.Thread(
        target=searching, args=(client, image_bytes(shared_dir, "10186"), stop, failures, answered)
    )
    searcher.start()
    try:
        started = client.build_index(str(new_model))
        building = stack.wait_for(lambda: (owner_beat(stack).get("building") or {}).get("items"), "a build's items")
        health = create_app(stack.settings).test_client().get("/healthz").get_json()
        assert health["index"]["index_id"] == old["index_id"]
        assert health["index"]["building"]["index_id"] == started["index_id"] and building <= SAMPLE_SIZE
        assert health["index"]["building"]["of"] == SAMPLE_SIZE

        deleted = client.delete(["10227"])  # writes while the new index is being built
        folder = stack.settings.uploads_dir / "more"
        folder.mkdir(parents=True)
        (folder / "new-10279.jpg").write_bytes(image_bytes(shared_dir, "10279"))
        more = client.follow(client.start_load(folder), timeout=120)
        assert more["state"] == "done" and more["seq"] > deleted["seq"]

        # The load may end after the switch (its photo embedded again with the new model): the heartbeat that
        # names the new index can come before the one that counts the load's change
        beat = stack.wait_for(
            lambda: (found := switched(stack, started["index_id"])) and found["seq"] >= more["seq"] and found,
            "the switch, with the load's change",
            timeout=300,
        )
    finally:
        stop.set()
        searcher.join(90)
    assert failures == [] and len(answered) > 3
    assert beat["model"] == new_model.name and beat["seq"] > deleted["seq"]  # sequence numbers go on
    assert beat["items"] == SAMPLE_SIZE  # one deleted, one loaded
    assert client.get_item("10227", min_seq=more["seq"]) is None and client.get_item("new-10279") is not None
    new = replica_follows(stack, client, beat["model_sha256"])
    assert new["model_sha256"] != old["model_sha256"]
    job = client.follow(client.search(image_bytes(shared_dir, "10186"), 3), timeout=60)
    assert job["state"] == "done" and job["result"]["hits"][0]["id"] == "10186"

    rolled = client.rollback_index()
    assert rolled["serving"] == old["index_id"] and rolled["seq"] > beat["seq"]
    replica_follows(stack, client, old["model_sha256"])
    job = client.follow(client.search(image_bytes(shared_dir, "10186"), 3), timeout=60)
    assert job["state"] == "done" and job["result"]["hits"][0]["id"] == "10186"
    assert client.delete_index(started["index_id"])["folder"] == f"indexes/{started['index_id']}"
    assert not (stack.settings.index_dir / "indexes" / started["index_id"]).exists()


@pytest.mark.slow
def test_an_owner_killed_in_the_middle_of_a_build_goes_on_with_what_the_new_index_lacks(
    make_stack, shared_dir, pretrained_model, tmp_path
):
    """`lookalike index build --wait` follows it through the restart until the switch."""
    stack, client, _ = loaded_stack(make_stack, shared_dir, LOOKALIKE_BATCH="16")
    command = [LOOKALIKE, "index", "build", "--model", str(another_model(pretrained_model, tmp_path)), "--wait"]
    waiting = subprocess.Popen(command, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    building = stack.wait_for(lambda: owner_beat(stack).get("building") or {}, "the build to begin")
    # Killed as soon as the first vectors of the build are in its log (a heartbeat can come too late: on idle
    # cores the whole build takes a few seconds)
    log_folder = stack.settings.index_dir / read_alias(stack.settings.index_dir).building.folder
    stack.wait_for(lambda: any(log.stat().st_size for log in log_folder.glob("wal-*.log")), "the build to get going")
    stack.kill("index")
    assert read_alias(stack.settings.index_dir).building is not None  # killed in the middle of the build
    stack.start("index")
    output, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0 and f"switched: index {building['index_id']} serves, 1002 items" in output, output
    beat = owner_beat(stack)
    assert beat["index_id"] == building["index_id"] and beat["items"] == SAMPLE_SIZE
    alias = read_alias(stack.settings.index_dir)
    assert alias.building is None and alias.serving == f"indexes/{building['index_id']}"
    replica_follows(stack, client, beat["model_sha256"])
    listed = subprocess.run([LOOKALIKE, "index", "list"], env=stack.env, capture_output=True, text=True, check=True)
    assert f"{building['index_id']}  serving" in listed.stdout and "previous (for rollback)" in listed.stdout


@pytest.mark.slow
def test_a_round_whose_messages_were_lost_ends_after_the_stall_and_the_next_one_embeds_what_it_missed(
    make_stack, shared_dir, pretrained_model, tmp_path
):
    """Redis handed the round's batches to a worker that died before kombu recorded them: nothing is queued or
    held, and no one will ever count those items. The build goes on without an owner restart."""
    stack, client, _ = loaded_stack(make_stack, shared_dir, LOOKALIKE_LOAD_STALL="5")
    stack.kill("embed")
    started = client.build_index(str(another_model(pretrained_model, tmp_path)))
    assert stack.redis.delete(Queue.EMBED) == 1  # the round's batches, lost
    stack.start("embed")
    beat = stack.wait_for(lambda: switched(stack, started["index_id"]), "the switch", timeout=300)
    assert beat["items"] == SAMPLE_SIZE
    assert f"index {started['index_id']}: round 1 lost its messages" in stack.log_paths["index"].read_text()


@pytest.mark.slow
def test_a_tuned_model_of_the_serving_model_is_built_from_the_stored_vectors_without_embedding_again(
    make_stack, shared_dir, pretrained_model, tmp_path
):
    """The head alone runs on the vectors the serving index holds: no embed batch, and the vectors are the tuned
    model's own (a catalogue photo searched with the tuned model finds itself at a similarity of 1)."""
    stack, client, _ = loaded_stack(make_stack, shared_dir)
    tuned = tmp_path / "tuned.onnx"
    losses = [argument for label in ("articleType", "gender") for argument in ("--allow-loss", label)]
    subprocess.run(
        [LOOKALIKE, "tune", "--model", pretrained_model, "--catalog", shared_dir / "data" / "fashion", "--label",
         "articleType", "--label", "gender", "--epochs", "2", *losses, "--out", tuned],
        env=stack.env, check=True, capture_output=True,
    )  # fmt: skip
    old = owner_beat(stack)
    started = client.build_index(str(tuned))
    beat = stack.wait_for(lambda: switched(stack, started["index_id"]), "the switch", timeout=300)
    assert beat["items"] == SAMPLE_SIZE and beat["model_sha256"] == load_model(tuned, ["cpu"]).sha256
    owner_log = stack.log_paths["index"].read_text()
    assert f"index {started['index_id']} re-projects the vectors of index {old['index_id']}" in owner_log
    assert f"index {started['index_id']}, round 1: {SAMPLE_SIZE} items to re-project, 0 to embed" in owner_log
    job = client.follow(client.search(image_bytes(shared_dir, "10186"), 3), timeout=60)
    assert job["state"] == "done" and job["result"]["hits"][0]["id"] == "10186"
    assert job["result"]["hits"][0]["score"] > 0.999

    # Serving another model now: the raw index, kept for a rollback, still has the vectors to re-project
    again = client.build_index(str(another_model(pretrained_model, tmp_path)))
    stack.wait_for(lambda: switched(stack, again["index_id"]), "the switch to another export", timeout=300)
    retuned = client.build_index(str(tuned))
    beat = stack.wait_for(lambda: switched(stack, retuned["index_id"]), "the switch back to the tuned model")
    assert beat["items"] == SAMPLE_SIZE
    assert f"index {retuned['index_id']} re-projects the vectors of index {old['index_id']}" in (
        stack.log_paths["index"].read_text()
    )


SHOP = ("10186", "10227", "10230", "10279", "10428", "10506", "10713", "10790")


def index_build(stack: Stack, *argv: str) -> subprocess.CompletedProcess:
    """`lookalike index build --wait ARGV`, as an operator runs it."""
    command = [LOOKALIKE, "index", "build", "--wait", *argv]
    return subprocess.run(command, env=stack.env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_build_never_drops_an_item_whose_photo_went_missing(make_stack, shared_dir, pretrained_model, tmp_path):
    """With the same model the item keeps its vector and the switch goes on. With another model the build stops
    short of the switch and names the item (`index build --wait` exits 1, /healthz and `index list` say why); the
    photo put back and the build asked again, it switches with the item; `--allow-missing 1` switches without it."""
    stack = make_stack()
    start_workers(stack, stack.settings)
    client = Client(stack.settings)
    shop = stack.settings.uploads_dir / "shop"
    shop.mkdir(parents=True)
    for item_id in SHOP:
        (shop / f"{item_id}.jpg").write_bytes(image_bytes(shared_dir, item_id))
    assert client.follow(client.start_load(shop), timeout=120)["progress"]["done"] == len(SHOP)
    photo, aside = shop / "10186.jpg", tmp_path / "10186.jpg"
    photo.rename(aside)

    same = client.build_index()
    stack.wait_for(lambda: switched(stack, same["index_id"]), "the switch to the same model's index", timeout=120)
    assert owner_beat(stack)["items"] == len(SHOP) and client.get_item("10186") is not None

    other = another_model(pretrained_model, tmp_path)
    stopped = index_build(stack, "--model", str(other))
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert "1 serving items could not be carried over" in stopped.stderr and "10186: missing_file" in stopped.stderr
    assert "--allow-missing 1" in stopped.stderr
    building = create_app(stack.settings).test_client().get("/healthz").get_json()["index"]["building"]
    assert building["missing"] == 1 and building["missing_items"][0]["id"] == "10186"
    listing = subprocess.run([LOOKALIKE, "index", "list"], env=stack.env, capture_output=True, text=True, check=True)
    assert "building, stopped: 1 items missing" in listing.stdout
    serving = owner_beat(stack)
    assert serving["index_id"] == same["index_id"] and serving["items"] == len(SHOP)

    aside.rename(photo)
    again = index_build(stack, "--model", str(other))
    assert again.returncode == 0, again.stdout + again.stderr
    beat = owner_beat(stack)
    assert beat["model"] == other.name and beat["items"] == len(SHOP) and client.get_item("10186") is not None

    photo.rename(aside)
    third = another_model(pretrained_model, tmp_path, "third")
    allowed = index_build(stack, "--model", str(third), "--allow-missing", "1")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    beat = owner_beat(stack)
    assert beat["model"] == third.name and beat["items"] == len(SHOP) - 1
    assert client.get_item("10186", min_seq=beat["seq"]) is None


def test_an_index_folder_from_before_aliases_is_adopted_in_place(tmp_path, module_redis):
    """No ALIAS, the index's files in the index folder itself: the owner serves it where it is, as "."."""
    client = redis.Redis.from_url(module_redis)
    client.flushdb()
    model = load_model(pooling_model(tmp_path / "model.onnx"))
    settings = Settings.from_env({"LOOKALIKE_DATA_DIR": str(tmp_path), "LOOKALIKE_MODEL": str(model.path)})
    identity = ModelIdentity(model.sha256, model.contract.dimension, settings.resize)
    legacy = DurableIndex.open(settings.index_dir, identity, IndexParams(dim=identity.dimension))
    legacy.apply(
        [
            Change(
                op="upsert",
                id="p1",
                metadata={},
                photos=[Photo("i")],
                vectors=np.ones((1, identity.dimension), dtype=np.float32),
            )
        ]
    )
    legacy.close()
    assert not (settings.index_dir / "ALIAS").exists()

    owner = IndexOwner.open(settings, client)
    try:
        assert read_alias(settings.index_dir).serving == ADOPTED
        assert owner.store.directory == settings.index_dir and list(owner.store.index.items) == ["p1"]
        assert owner.store.index_id == legacy.index_id and not (settings.index_dir / "indexes").exists()
    finally:
        owner.close()
