"""Products with several photos: the index holds a vector per photo and answers products, each once."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lookalike.stack import LOOKALIKE, Stack
from lookalike.up import start_workers
from protocol.client import Client
from protocol.queues import Task
from tests.test_index import DIM, IDENTITY, PARAMS, unit
from tests.test_index_switch import another_model, switched
from tests.test_scale_out import ask
from tests.test_web import API_KEY, AUTH
from web.app import create_app
from worker.aliases import serving_folder
from worker.index import IndexParams, Item, Photo, VectorIndex
from worker.reader import IndexReader
from worker.reprojection import Head, Source
from worker.snapshots import ITEMS, MANIFEST, current_name, read_item, read_snapshot
from worker.state import IndexState
from worker.store import DurableIndex
from worker.wal import JSON_LENGTH, Change, WriteAheadLog


def near(vector: np.ndarray, seed: int, spread: float = 0.05) -> np.ndarray:
    """A photo of the same product: close to `vector`."""
    noisy = vector + spread * np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return noisy / np.linalg.norm(noisy)


def product(seeds: list[int], **metadata: str) -> tuple[Item, np.ndarray]:
    """A product whose photos are named by their seeds (a photo's sha256 stands for its seed)."""
    return Item(dict(metadata), [Photo(f"img{seed}", f"catalog/{seed}.jpg") for seed in seeds]), np.stack(
        [unit(seed) for seed in seeds]
    )


def add(index: VectorIndex, item_id: str, seeds: list[int], **metadata: str) -> None:
    item, vectors = product(seeds, **metadata)
    index.upsert(item_id, vectors, item)


def test_a_search_answers_products_once_with_the_best_photos_score_and_which_photo_matched():
    index = VectorIndex(PARAMS)
    add(index, "jacket", [1, 2, 3])
    add(index, "shirt", [4])
    add(index, "shoe", [5, 6])
    hits = index.search(unit(2), 3)
    assert hits[0].id == "jacket" and len({hit.id for hit in hits}) == 3
    assert hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[0].photo == 1
    assert hits[0].photos == ["catalog/1.jpg", "catalog/2.jpg", "catalog/3.jpg"]
    assert index.stats()["items"] == 3 and index.stats()["photos"] == 6


def test_a_product_with_many_near_identical_photos_cannot_crowd_the_others_out():
    index = VectorIndex(PARAMS)
    crowd = unit(1000)
    index.upsert("crowd", np.stack([near(crowd, seed, 0.01) for seed in range(40)]),
                 Item({}, [Photo(f"c{seed}") for seed in range(40)]))  # fmt: skip
    for seed in range(50):
        index.upsert(f"p{seed}", near(crowd, 100 + seed, 0.6)[None], Item({}, [Photo(f"p{seed}")]))
    hits = index.search(crowd, 5)
    assert hits[0].id == "crowd" and len(hits) == 5 and len({hit.id for hit in hits}) == 5


def test_a_filter_applies_to_the_product_and_more_like_this_uses_every_photo_but_never_the_product_itself():
    index = VectorIndex(PARAMS)
    add(index, "a", [1, 2], colour="red")
    add(index, "b", [3], colour="blue")
    index.upsert("front-match", near(unit(1), 7)[None], Item({"colour": "red"}, [Photo("f")]))
    index.upsert("back-match", near(unit(2), 8)[None], Item({"colour": "blue"}, [Photo("g")]))
    similar = index.search(index.vectors("a"), 2, exclude=("a",))
    assert {hit.id for hit in similar} == {"front-match", "back-match"}  # one found by each photo
    assert [hit.id for hit in index.search(index.vectors("a"), 3, {"colour": "blue"}, exclude=("a",))] == [
        "back-match",
        "b",
    ]
    assert all(hit.id != "a" for hit in index.search(unit(1), 10, exclude=("a",)))


def test_an_upsert_replaces_the_set_of_photos_and_keeps_the_vectors_of_the_photos_it_still_has():
    index = VectorIndex(PARAMS)
    add(index, "p", [1, 2, 3])
    before = {photo.sha256: photo.label for photo in index.items["p"].photos}
    kept = index.vectors("p")[:2]
    item, vectors = product([1, 2, 4])  # photo 3 removed, photo 4 added
    vectors[:2] = [unit(101), unit(102)]  # another embedding of the same photos: the index keeps what it has
    index.upsert("p", vectors, item)
    after = {photo.sha256: photo.label for photo in index.items["p"].photos}
    assert after["img1"] == before["img1"] and after["img2"] == before["img2"] and "img3" not in after
    np.testing.assert_array_equal(index.vectors("p")[:2], kept)
    assert index.photo_count == 3 and before["img3"] not in index.ids_by_label  # no orphan vector
    found = index.search(unit(4), 1)[0]
    assert found.score == pytest.approx(1.0, abs=1e-5) and found.photos[found.photo] == "catalog/4.jpg"
    assert index.search(unit(3), 1)[0].score < 0.99  # the removed photo is found no more
    index.delete("p")
    assert index.photo_count == 0 and index.search(unit(1), 5) == []


def test_new_metadata_for_the_same_photos_moved_elsewhere_keeps_their_vectors_and_takes_their_new_places():
    index = VectorIndex(PARAMS)
    add(index, "p", [1, 2], colour="red")
    labels = index.items["p"].labels
    moved = [Photo(photo.sha256, f"archive/{photo.sha256}.jpg") for photo in index.items["p"].photos]
    index.upsert("p", None, Item({"colour": "blue"}, moved))
    assert index.items["p"].labels == labels and index.items["p"].photos[1].image == "archive/img2.jpg"
    index.upsert("p", None, Item({"colour": "green"}, [Photo("other")]))  # not its photos: it keeps its own
    assert index.items["p"].photos[0].image == "archive/img1.jpg" and index.items["p"].metadata["colour"] == "green"
    assert [hit.id for hit in index.search(unit(1), 1, {"colour": "green"})] == ["p"]


def test_exact_and_hnswlib_search_agree_on_the_products_they_return():
    index = VectorIndex(IndexParams(dim=DIM, m=16, ef_construction=200, ef=400))
    for number in range(300):
        centre = unit(number)
        photos = 1 + number % 3
        index.upsert(f"p{number}", np.stack([near(centre, 10_000 + 10 * number + n, 0.3) for n in range(photos)]),
                     Item({"half": str(number % 2)}, [Photo(f"{number}-{n}") for n in range(photos)]))  # fmt: skip
    for seed in range(20):
        query = unit(5000 + seed)
        everything = np.fromiter(index.ids_by_label, dtype=np.uint64)
        labels, _ = index.exact_query(query[None], len(everything), everything)
        ordered = list(dict.fromkeys(index.ids_by_label[int(label)] for label in labels[0]))  # products, best first
        assert [hit.id for hit in index.search(query, 10)] == ordered[:10]
        halves = [item_id for item_id in ordered if index.items[item_id].metadata["half"] == "1"]
        assert [hit.id for hit in index.search(query, 10, {"half": "1"})] == halves[:10]


def test_a_snapshot_and_the_log_keep_every_photo_and_replay_to_the_same_index(tmp_path):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS, snapshot_every=3)
    for number in range(5):
        item, vectors = product([10 * number + n for n in range(1 + number % 3)], n=str(number))
        store.apply([Change("upsert", f"p{number}", item.metadata, item.photos, "m", vectors)])
    item, vectors = product([1, 40])
    store.apply([Change("upsert", "p4", {"n": "4"}, item.photos, "m2", vectors), Change("delete", "p0")])
    digest = IndexReader(store).digest()
    store.close()
    again = DurableIndex.open(tmp_path, IDENTITY, PARAMS, snapshot_every=3)
    assert IndexReader(again).digest() == digest
    assert [photo.sha256 for photo in again.index.items["p4"].photos] == ["img1", "img40"]
    assert again.index.photo_count == sum(len(item.photos) for item in again.index.items.values())


def test_log_records_and_snapshot_rows_written_before_products_had_photos_are_read_as_one_photo():
    header = json.dumps({"op": "upsert", "id": "p1", "metadata": {"image": "catalog/p1.jpg"}, "image_sha256": "abc",
                         "metadata_sha256": "m"}).encode()  # fmt: skip
    old = Change.decode(JSON_LENGTH.pack(len(header)) + header + unit(1).astype("<f4").tobytes(), seq=7)
    assert [(photo.sha256, photo.image) for photo in old.photos] == [("abc", "catalog/p1.jpg")]
    assert old.vectors.shape == (1, DIM) and old.seq == 7
    item_id, item = read_item(["p1", 5, {"image": "catalog/p1.jpg"}, "abc", "m"])
    assert item_id == "p1" and item.labels == [5] and item.photos[0].image == "catalog/p1.jpg"
    assert item.checksum == "abc:m"


def photo_files(shared_dir: Path, count: int) -> list[Path]:
    return sorted((shared_dir / "data" / "fashion" / "images").glob("*.jpg"))[:count]


def owner_and_replica(client: Client, seq: int) -> tuple[dict, dict]:
    owner = ask(client, "owner", Task.INDEX_STATS, seq, True)["stats"]
    replica = ask(client, "replica", Task.INDEX_STATS, seq, True)["stats"]
    return owner, replica


@pytest.mark.slow
def test_products_load_by_csv_and_folder_and_a_reload_changes_exactly_the_photos_that_changed(
    make_stack, shared_dir, pretrained_model, tmp_path
):
    """Real processes: a Shopify-style CSV (an id repeated on a row per photo) and a folder (`images/<id>/`) load
    products with several photos; a re-load with a photo added, one removed and one changed changes exactly those
    vectors; a search names each product once and says which photo matched; "more like this" never answers the
    product itself; a delete removes every photo; the replica ends with the owner's vectors."""
    stack = make_stack(LOOKALIKE_API_KEY=API_KEY)
    start_workers(stack, stack.settings)
    client = Client(stack.settings)
    photos = photo_files(shared_dir, 12)
    shop = stack.settings.uploads_dir / "shop"
    (shop / "images").mkdir(parents=True)
    for number, photo in enumerate(photos):
        shutil.copy(photo, shop / "images" / f"{number}.jpg")
    (shop / "products.csv").write_text(
        "id,image,name,colour\n"
        "jacket,images/0.jpg,Jacket,Blue\njacket,images/1.jpg,,\njacket,images/2.jpg,,\n"
        "shirt,images/3.jpg,Shirt,White\nshirt,images/4.jpg,,\n"
        "shoe,images/5.jpg,Shoe,Black\n"
    )
    job = client.follow(client.start_load(shop / "products.csv"), timeout=180)
    assert job["state"] == "done" and job["progress"] == {"total": 3, "done": 3, "failed": 0}, job
    jacket = client.get_item("jacket", min_seq=job["seq"])
    assert jacket["metadata"]["name"] == "Jacket" and len(jacket["photos"]) == 3
    owner, replica = owner_and_replica(client, job["seq"])
    assert (owner["items"], owner["photos"]) == (3, 6) and replica["digest"] == owner["digest"]

    found = client.follow(client.search(photos[1].read_bytes(), 3), timeout=120)["result"]["hits"]
    assert found[0]["id"] == "jacket" and len({hit["id"] for hit in found}) == 3
    assert found[0]["photo"] == 1 and found[0]["score"] > 0.99
    searched = subprocess.run([LOOKALIKE, "search", photos[1], "-k", "3"], env=stack.env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    first = searched.stdout.splitlines()[0]
    assert " jacket " in first and first.endswith("(photo uploads/shop/images/1.jpg)")
    web = create_app(stack.settings).test_client()
    stack.wait_for(lambda: web.get("/healthz").get_json()["index"].get("photos") == 6, "/healthz to count photos")
    job_url = f"/api/jobs/{client.search(photos[1].read_bytes(), 3)}"
    stack.wait_for(lambda: web.get(job_url).get_json()["state"] == "done", "the search")
    hit = web.get(job_url).get_json()["result"]["hits"][0]
    assert hit["thumbnail_url"] == "/thumbnails/uploads/shop/images/1.jpg" == hit["photo_urls"][0]  # matched first
    assert len(hit["photo_urls"]) == 3 and hit["photos"][0] == "uploads/shop/images/0.jpg"
    item = web.get("/api/items/jacket").get_json()
    assert item["photos"] == [f"uploads/shop/images/{n}.jpg" for n in range(3)] and len(item["photo_urls"]) == 3
    page = web.get("/items/jacket").get_data(as_text=True)
    assert all(f"/thumbnails/uploads/shop/images/{n}.jpg" in page for n in range(3))
    assert all(hit["id"] != "jacket" for hit in client.similar("jacket", 5, min_seq=job["seq"])["hits"])

    before = {photo.sha256: photo for photo in stored_photos(stack, "jacket")}
    (shop / "images" / "2.jpg").write_bytes(photos[8].read_bytes())  # changed
    (shop / "products.csv").write_text(
        "id,image,name,colour\n"
        "jacket,images/0.jpg,Jacket,Blue\njacket,images/2.jpg,,\njacket,images/6.jpg,,\n"  # 1 removed, 6 added
        "shirt,images/3.jpg,Shirt,White\nshirt,images/4.jpg,,\n"
        "shoe,images/5.jpg,Shoe,Black\n"
    )
    shutil.copy(photos[6], shop / "images" / "6.jpg")
    again = client.follow(client.start_load(shop / "products.csv"), timeout=180)
    assert again["state"] == "done" and again["seq"] == job["seq"] + 1  # the shirt and the shoe did not change
    owner, replica = owner_and_replica(client, again["seq"])
    assert (owner["items"], owner["photos"]) == (3, 6) and replica["digest"] == owner["digest"]
    unchanged = client.follow(client.start_load(shop / "products.csv"), timeout=180)
    assert unchanged["state"] == "done" and client.stats(min_seq=again["seq"])["seq"] == again["seq"]
    after = stored_photos(stack, "jacket")
    assert [photo.image for photo in after] == [f"uploads/shop/images/{n}.jpg" for n in (0, 2, 6)]
    assert after[0].label == before[after[0].sha256].label  # the unchanged photo kept its vector
    assert after[1].sha256 not in before and after[2].sha256 not in before

    folder = stack.settings.uploads_dir / "folder" / "images"
    (folder / "coat").mkdir(parents=True)
    for number in (9, 10):
        shutil.copy(photos[number], folder / "coat" / f"{number}.jpg")
    shutil.copy(photos[11], folder / "hat.jpg")
    loaded = client.follow(client.start_load(folder.parent), timeout=180)
    assert loaded["state"] == "done" and loaded["progress"]["done"] == 2, loaded
    assert len(client.get_item("coat", min_seq=loaded["seq"])["photos"]) == 2

    archive = io.BytesIO()  # through the API: an archive of images/<id>/ folders
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for number in (3, 4):
            tar.add(photos[number], arcname=f"shop/images/scarf/{number}.jpg")
    archive.seek(0)
    answer = web.post("/api/catalog/loads", data={"archive": (archive, "scarf.tar.gz")}, headers=AUTH)
    assert answer.status_code == 202, answer.get_json()
    scarf = client.follow(answer.get_json()["job_id"], timeout=180)
    assert scarf["state"] == "done" and len(client.get_item("scarf", min_seq=scarf["seq"])["photos"]) == 2
    client.delete(["scarf"])

    deleted = client.delete(["jacket"])
    owner, replica = owner_and_replica(client, deleted["seq"])
    assert (owner["items"], owner["photos"]) == (4, 6) and replica["digest"] == owner["digest"]

    # an index of another model embeds every photo of every product again
    coat = [photo.sha256 for photo in stored_photos(stack, "coat")]
    built = client.build_index(str(another_model(pretrained_model, tmp_path)))
    stack.wait_for(lambda: switched(stack, built["index_id"]), "the switch", timeout=300)
    stack.wait_for(lambda: len({stats["digest"] for stats in owner_and_replica(client, 0)}) == 1, "the replica")
    owner, _ = owner_and_replica(client, 0)
    assert (owner["items"], owner["photos"]) == (4, 6) and owner["index_id"] == built["index_id"]
    assert [photo.sha256 for photo in stored_photos(stack, "coat")] == coat


def test_a_reprojection_carries_every_photo_of_a_product(tmp_path):
    weights = np.random.default_rng(0).normal(size=(DIM, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["vectors", "weights"], ["projected"])],
        "head",
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, [None, DIM])],
        [helper.make_tensor_value_info("projected", TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(weights, "weights")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "head.onnx")
    index = VectorIndex(PARAMS)
    add(index, "jacket", [1, 2, 3])
    add(index, "shirt", [4])
    jacket, shirt = Source(Head(tmp_path / "head.onnx"), index, "serving").project(["jacket", "shirt"])
    assert jacket.shape == (3, 4) and shirt.shape == (1, 4)
    np.testing.assert_allclose(jacket, index.vectors("jacket") @ weights, rtol=1e-5, atol=1e-6)


def stored_photos(stack: Stack, item_id: str) -> list[Photo]:
    """A product's photos as the owner holds them, read as a replica would: its snapshot, then its log."""
    folder = serving_folder(stack.settings.index_dir)
    snapshot = read_snapshot(folder / current_name(folder), ef=10)
    state = IndexState(snapshot.identity, snapshot.params)
    state.adopt(snapshot)
    for change in WriteAheadLog(folder).replay(after_seq=state.seq):
        state.apply_change(change)
    return state.index.items[item_id].photos


def test_an_index_written_before_products_had_photos_opens_as_products_of_one_photo(tmp_path):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    for number in range(4):
        image = {"image": f"catalog/{number}.jpg"}
        store.apply(
            [Change("upsert", f"p{number}", image, [Photo(f"img{number}", image["image"])], "m", unit(number)[None])]
        )
    store.snapshot()
    store.close()
    folder = tmp_path / current_name(tmp_path)  # rewritten as the previous version wrote it: [id, label, ...]
    rows = [[item_id, photos[0][2], metadata, photos[0][0], meta] for item_id, photos, metadata, meta in
            json.loads((folder / ITEMS).read_text())]  # fmt: skip
    (folder / ITEMS).write_bytes(old := json.dumps(rows).encode())
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][ITEMS], manifest["sizes"][ITEMS] = hashlib.sha256(old).hexdigest(), len(old)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    adopted = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    assert len(adopted.index) == 4 and adopted.index.photo_count == 4
    assert (
        adopted.index.items["p2"].photos[0].image == "catalog/2.jpg" and adopted.index.search(unit(2), 1)[0].id == "p2"
    )
    item, vectors = product([2, 9])  # a second photo for an adopted product
    adopted.apply([Change("upsert", "p2", item.metadata, [Photo("img2", "catalog/2.jpg"), *item.photos[1:]], "m",
                          vectors)])  # fmt: skip
    assert adopted.index.photo_count == 5 and adopted.index.items["p2"].photos[0].label == 2
