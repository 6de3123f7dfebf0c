"""The in-memory index and its durable store: upserts, deletes, filters, the log, snapshots, crashes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import worker.wal
from common.vectors import encode_vector
from worker.index import POSTED_FIELDS, IndexParams, Item, Photo, UnknownField, VectorIndex
from worker.reader import IndexReader
from worker.snapshots import IndexStoreError, ModelIdentity
from worker.store import DurableIndex
from worker.wal import Change

DIM = 8
IDENTITY = ModelIdentity("a" * 64, DIM, "stretch")
PARAMS = IndexParams(dim=DIM, m=8, ef_construction=50, ef=20)


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def upsert(item_id: str, seed: int, **metadata: str) -> Change:
    return Change("upsert", item_id, metadata, [Photo(f"img{seed}")], f"meta{seed}", unit(seed)[None])


def one_photo(metadata: dict[str, str], vector: np.ndarray) -> Item:
    """A product of one photo, whose sha256 stands for its vector (a new vector is a new photo)."""
    return Item(metadata, [Photo(hashlib.sha256(np.asarray(vector).tobytes()).hexdigest())])


def test_upsert_replaces_by_id_and_search_ranks_by_cosine():
    index = VectorIndex(PARAMS)
    for seed in range(20):
        index.upsert(f"p{seed}", unit(seed), one_photo({"n": str(seed)}, unit(seed)))
    index.upsert("p3", unit(100), one_photo({"n": "new"}, unit(100)))
    assert len(index) == 20
    (top,) = index.search(unit(100), 1)
    assert (top.id, top.metadata) == ("p3", {"n": "new"})
    assert top.score == pytest.approx(1.0, abs=1e-5)
    scores = [hit.score for hit in index.search(unit(5), 10)]
    assert scores == sorted(scores, reverse=True)


def test_delete_frees_a_slot_that_the_next_item_reuses():
    index = VectorIndex(PARAMS)
    for seed in range(5):
        index.upsert(f"p{seed}", unit(seed), one_photo({}, unit(seed)))
    assert index.delete("p2") and not index.delete("p2")
    assert "p2" not in [hit.id for hit in index.search(unit(2), 5)]
    index.upsert("p9", unit(9), one_photo({}, unit(9)))
    assert index.hnsw.element_count == 5  # the deleted slot was reused, not a new one taken
    assert index.stats()["deleted_slots"] == 0


def test_capacity_grows_by_itself():
    index = VectorIndex(PARAMS)
    for seed in range(3000):
        index.upsert(str(seed), unit(seed), one_photo({}, unit(seed)))
    assert len(index) == 3000 <= index.hnsw.get_max_elements()


def test_filters_and_more_like_this_exclude_the_item_itself():
    index = VectorIndex(PARAMS)
    for seed in range(3000):
        index.upsert(
            str(seed), unit(seed), one_photo({"gender": "Men" if seed % 3 else "Women", "rare": str(seed)}, unit(seed))
        )
    women = index.search(unit(7), 10, {"gender": "Women"})
    assert len(women) == 10 and all(hit.metadata["gender"] == "Women" for hit in women)
    assert [hit.id for hit in index.search(unit(7), 5, {"rare": "42"})] == ["42"]
    assert index.search(unit(7), 5, {"gender": "Other"}) == []
    similar = index.search(index.vectors("7"), 5, exclude=("7",))
    assert len(similar) == 5 and "7" not in [hit.id for hit in similar]
    index.upsert("9", unit(9), one_photo({"gender": "Women"}, unit(9)))  # postings follow metadata changes
    assert "9" in [hit.id for hit in index.search(unit(9), 3, {"gender": "Women"})]


def test_a_filter_on_a_field_no_item_has_is_refused_and_keeps_nothing():
    index = VectorIndex(PARAMS)
    for seed in range(50):
        index.upsert(str(seed), unit(seed), one_photo({"gender": "Men", "colour": str(seed % 5)}, unit(seed)))
    for name in range(2000):  # what 100 requests of 20 made-up names asked of the owner before
        with pytest.raises(UnknownField, match="filter by one of: colour, gender"):
            index.search(unit(1), 5, {f"made-up-{name}": "x"})
    assert index._postings == {}
    index.delete("7")
    assert index.fields() == ["colour", "gender"]
    for item_id in [str(seed) for seed in range(50) if seed != 7]:
        index.upsert(item_id, None, Item({"gender": "Men"}))
    assert index.fields() == ["gender"]  # no item has a colour any more: filtering by one is refused
    with pytest.raises(UnknownField):
        index.search(unit(1), 5, {"colour": "1"})


def test_lookup_tables_are_kept_for_the_last_few_fields_filtered_by():
    index = VectorIndex(PARAMS)
    fields = {f"field{number}": "same" for number in range(3 * POSTED_FIELDS)}
    for seed in range(20):
        index.upsert(str(seed), unit(seed), one_photo(dict(fields), unit(seed)))
    for name in fields:
        assert len(index.search(unit(1), 3, {name: "same"})) == 3
    assert list(index._postings) == list(fields)[-POSTED_FIELDS:]
    index.upsert(
        "0", unit(0), one_photo({**fields, "field0": "other"}, unit(0))
    )  # a field without a table: built again
    assert [hit.id for hit in index.search(unit(0), 3, {"field0": "other"})] == ["0"]


def test_an_exact_search_over_many_allowed_items_reads_their_vectors_a_chunk_at_a_time(monkeypatch):
    import worker.index

    monkeypatch.setattr(worker.index, "EXACT_CHUNK", 64)
    index = VectorIndex(PARAMS)
    vectors = {str(seed): unit(seed) for seed in range(300)}
    for item_id, vector in vectors.items():
        index.upsert(item_id, vector, one_photo({"half": str(int(item_id) % 2)}, vector))
    query = unit(1000)
    allowed = {index.items[item_id].labels[0] for item_id in vectors if int(item_id) % 2 == 0}
    labels, distances = index._filtered_query(query[None, :], 7, allowed)
    expected = sorted((item_id for item_id in vectors if int(item_id) % 2 == 0), key=lambda i: -vectors[i] @ query)
    assert [index.ids_by_label[int(label)] for label in labels[0]] == expected[:7]
    assert distances[0] == pytest.approx([1 - vectors[i] @ query for i in expected[:7]], abs=1e-5)


def test_a_search_of_a_batch_naming_an_unknown_field_fails_alone(tmp_path):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    store.apply([upsert(f"p{seed}", seed, colour="red") for seed in range(10)])
    queries = [{"vector": encode_vector(unit(seed)), "k": 2, "filters": filters}
               for seed, filters in ((3, {"colour": "red"}), (4, {"size": "L"}))]  # fmt: skip
    first, second = IndexReader(store).nearest(IDENTITY.sha256, IDENTITY.resize, queries, 0)["answers"]
    assert len(first) == 2 and first[0]["id"] == "p3"
    assert second["error"]["code"] == "unknown_field" and "filter by one of: colour" in second["error"]["message"]
    store.close()


def test_the_owner_answers_a_read_waiting_for_a_change_it_never_made_as_a_bad_parameter(tmp_path):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    store.apply([upsert("p1", 1)])
    assert IndexReader(store).get("p1", store.seq)["item"]["id"] == "p1"
    refused = IndexReader(store).get("p1", store.seq + 1)["error"]
    assert refused["code"] == "bad_parameter" and f"it is at change {store.seq}" in refused["message"]
    following = IndexReader(store, owns=False)  # a replica: the change may still come
    assert following.get("p1", store.seq + 1)["error"]["code"] == "behind"
    store.close()


def test_the_store_replays_its_log_after_a_crash(tmp_path):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    store.apply([upsert(f"p{seed}", seed, colour="red") for seed in range(10)])
    store.apply([Change("delete", "p4"), upsert("p5", 55, colour="blue")])
    # no close(): as after kill -9, only the log has these changes
    store.wal.close()
    store._lock_file.close()

    reopened = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    assert len(reopened.index) == 9 and "p4" not in reopened.index
    assert reopened.index.items["p5"].metadata == {"colour": "blue"}
    assert reopened.index.search(unit(55), 1)[0].id == "p5"


def test_a_torn_last_record_is_dropped_and_the_rest_kept(tmp_path):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    store.apply([upsert("a", 1)])
    store.apply([upsert("b", 2)])
    store.wal.close()
    store._lock_file.close()
    log = store.wal.files()[-1]
    log.write_bytes(log.read_bytes()[:-10])  # the process died in the middle of writing "b"
    reopened = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    assert list(reopened.index.items) == ["a"]
    reopened.apply([upsert("c", 3)])
    reopened.close()
    assert sorted(DurableIndex.open(tmp_path, IDENTITY, PARAMS).index.items) == ["a", "c"]


def test_snapshots_cut_the_log_and_load_verified(tmp_path):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS, snapshot_every=5)
    store.apply([upsert(str(seed), seed) for seed in range(7)])  # 7 >= 5: snapshot, then an empty log
    assert store.changes_since_snapshot == 0
    assert [path.name for path in tmp_path.glob("wal-*")] == ["wal-00000000000000000008.log"]
    store.apply([upsert("x", 99)])
    store.close()  # a clean stop snapshots the rest
    reopened = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    assert len(reopened.index) == 8 and reopened.changes_since_snapshot == 0
    reopened.close()

    vectors = next(tmp_path.glob("snapshot-*")) / "vectors.hnsw"
    data = bytearray(vectors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    vectors.write_bytes(bytes(data))
    with pytest.raises(IndexStoreError, match="is damaged"):
        DurableIndex.open(tmp_path, IDENTITY, PARAMS)


def test_one_owner_per_index_folder(tmp_path):
    owner = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    with pytest.raises(IndexStoreError, match="another index worker owns"):
        DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    owner.close()
    DurableIndex.open(tmp_path, IDENTITY, PARAMS).close()


def test_vectors_of_another_model_are_refused(tmp_path):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    store.apply([upsert("a", 1)])
    store.close()
    other = ModelIdentity("b" * 64, DIM, "stretch")
    refused = DurableIndex.open(tmp_path, other, PARAMS)
    assert "`lookalike index build --model NEW.onnx` builds an index of the new model" in refused.mismatch
    with pytest.raises(IndexStoreError, match="holds 1 vectors of model aaaaaaaaaaaa"):
        refused.apply([upsert("b", 2)])


def test_a_crash_in_the_middle_of_a_snapshot_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    import worker.snapshots

    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    store.apply([upsert(str(seed), seed) for seed in range(3)])
    real_write = worker.snapshots.atomic_write_bytes

    def die_before_switching(path, data):
        if path.name == "CURRENT":
            raise KeyboardInterrupt("killed")  # the process dies between writing the snapshot and switching
        real_write(path, data)

    monkeypatch.setattr(worker.snapshots, "atomic_write_bytes", die_before_switching)
    with pytest.raises(KeyboardInterrupt):
        store.snapshot()
    monkeypatch.undo()
    store.wal.close()
    store._lock_file.close()

    reopened = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    assert sorted(reopened.index.items) == ["0", "1", "2"]
    assert [path.name for path in tmp_path.glob("snapshot-*")] == [reopened.snapshot_name()]


def test_new_metadata_for_the_same_photo_keeps_the_vector():
    index = VectorIndex(PARAMS)
    index.upsert("p1", unit(1), one_photo({"colour": "red"}, unit(1)))
    index.upsert("p1", None, Item({"colour": "blue"}))
    (hit,) = index.search(unit(1), 1, {"colour": "blue"})
    assert (hit.id, hit.score) == ("p1", pytest.approx(1.0, abs=1e-5))
    with pytest.raises(KeyError, match="has no vector yet"):
        index.upsert("p2", None, Item({}))


def test_a_failed_log_write_is_undone_before_the_next_change(tmp_path, monkeypatch):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS)
    store.apply([upsert("a", 1)])
    real_fsync = worker.wal.os.fsync
    calls = {"n": 0}

    def disk_full_once(descriptor):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(worker.wal.os, "fsync", disk_full_once)
    with pytest.raises(OSError, match="No space left"):
        store.apply([upsert("lost", 2)])
    monkeypatch.undo()
    store.apply([upsert("c", 3)])  # acknowledged after the failure: must survive a crash
    store.wal.close()
    store._lock_file.close()
    assert sorted(DurableIndex.open(tmp_path, IDENTITY, PARAMS).index.items) == ["a", "c"]


def test_changes_still_in_the_log_keep_an_index_from_adopting_another_model(tmp_path):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS)  # snapshot of the empty index, then only the log
    store.apply([upsert("a", 1)])
    store.wal.close()
    store._lock_file.close()  # killed before any further snapshot
    other = ModelIdentity("b" * 64, DIM, "stretch")
    assert "holds 0 vectors" in DurableIndex.open(tmp_path, other, PARAMS).mismatch
