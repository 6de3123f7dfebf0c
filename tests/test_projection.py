"""The optional PCA: fitted once the index holds enough items, stored with the index, applied to every vector."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from lookalike.up import start_workers
from protocol.client import Client
from tests.test_worker import SAMPLE_SIZE, image_bytes, search
from worker.index import IndexParams, Photo
from worker.projection import Projection, Reduction
from worker.snapshots import IndexStoreError, ModelIdentity
from worker.store import DurableIndex
from worker.wal import Change

DIM = 32
IDENTITY = ModelIdentity("b" * 64, DIM, "stretch")
PARAMS = IndexParams(dim=DIM, m=8, ef_construction=50, ef=32)
REDUCTION = Reduction(dimension=6, fit_items=60)


def clustered(count: int, seed: int = 3) -> np.ndarray:
    """Vectors around 10 centres that differ in only 6 directions: what a PCA to 6 dimensions keeps."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(DIM, 6)))[0].T
    centres = rng.normal(size=(10, 6)) * 3
    points = centres[np.arange(count) % 10] + 0.2 * rng.normal(size=(count, 6))
    return (points @ basis + 0.01 * rng.normal(size=(count, DIM)) + 1.0).astype(np.float32)


def upserts(vectors: np.ndarray, first: int = 0) -> list[Change]:
    return [
        Change("upsert", f"p{first + number}", {"cluster": str((first + number) % 10)}, [Photo("i")], "m", vector[None])
        for number, vector in enumerate(vectors)
    ]


def test_a_fit_keeps_the_directions_that_carry_the_variance():
    vectors = clustered(200)
    projection = Projection.fit(vectors, 6)
    assert projection.apply(vectors).shape == (200, 6)
    assert projection.retained_variance > 0.99
    assert projection.describe() == {"dimension": 6, "input_dimension": DIM, "fitted_on": 200,
                                     "retained_variance": round(projection.retained_variance, 4)}  # fmt: skip
    again = Projection.fit(vectors, 6)
    assert np.array_equal(again.components, projection.components)  # signs fixed: same catalogue, same file


@pytest.mark.parametrize(("count", "dimension"), [(6, 6), (100, 0), (100, DIM)])
def test_a_fit_that_cannot_work_says_why(count, dimension):
    with pytest.raises(ValueError, match="needs vectors of more than"):
        Projection.fit(clustered(count), dimension)


def test_the_store_reduces_once_it_holds_enough_items_and_keeps_the_neighbours(tmp_path):
    vectors = clustered(100)
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS, reduction=REDUCTION)
    store.apply(upserts(vectors[:59]))
    assert store.projection is None and store.stats()["dimension"] == DIM  # not enough items to fit on yet
    store.apply(upserts(vectors[59:], first=59))
    stats = store.stats()
    assert stats["dimension"] == 6 and stats["pca"]["fitted_on"] == 100 and stats["items"] == 100
    assert stats["changes_since_snapshot"] == 0  # the projection went to disk with the reduced vectors at once
    snapshot = tmp_path / store.snapshot_name()
    assert sorted(path.name for path in snapshot.iterdir()) == [
        "items.json", "manifest.json", "projection.npz", "vectors.hnsw"]  # fmt: skip
    hits = store.index.search(store.to_index_space(vectors[7] * 5), k=10)
    assert hits[0].id == "p7" and hits[0].score > 0.99
    assert {hit.metadata["cluster"] for hit in hits} == {"7"}


def test_changes_after_the_fit_are_logged_as_model_vectors_and_replay_reduced(tmp_path):
    vectors = clustered(120)
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS, reduction=REDUCTION)
    store.apply(upserts(vectors[:100]))
    store.apply(upserts(vectors[100:], first=100))  # in the log only: the process "crashes" without close()
    store.wal.close()
    store._lock_file.close()
    reopened = DurableIndex.open(tmp_path, IDENTITY, PARAMS, reduction=REDUCTION)
    assert reopened.projection is not None and reopened.changes_since_snapshot == 20 and len(reopened.index) == 120
    assert reopened.index.search(reopened.to_index_space(vectors[113]), k=1)[0].id == "p113"
    reopened.close()


def test_a_crash_before_the_first_snapshot_fits_again_on_replay(tmp_path, monkeypatch):
    vectors = clustered(80)
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS, reduction=REDUCTION)

    def disk_full(self: DurableIndex) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(DurableIndex, "snapshot", disk_full)
    store.apply(upserts(vectors))  # reduced in memory, snapshot failed: the log holds the model's vectors
    monkeypatch.undo()
    store.wal.close()
    store._lock_file.close()
    reopened = DurableIndex.open(tmp_path, IDENTITY, PARAMS, reduction=REDUCTION)
    assert reopened.projection.fitted_on == 80 and reopened.changes_since_snapshot == 0
    assert reopened.index.search(reopened.to_index_space(vectors[3]), k=1)[0].id == "p3"


def test_a_reduced_index_stays_reduced_when_the_setting_changes(tmp_path, caplog):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS, reduction=REDUCTION)
    store.apply(upserts(clustered(60)))
    store.close()
    with caplog.at_level(logging.WARNING, logger="worker.store"):
        reopened = DurableIndex.open(tmp_path, IDENTITY, PARAMS)  # LOOKALIKE_PCA_DIM back to 0
    assert reopened.stats()["dimension"] == 6 and "reduced by PCA to 6 dimensions (configured: off)" in caplog.text
    reopened.close()


def test_a_damaged_projection_is_refused_at_start(tmp_path):
    store = DurableIndex.open(tmp_path, IDENTITY, PARAMS, reduction=REDUCTION)
    store.apply(upserts(clustered(60)))
    store.close()
    projection = tmp_path / store.snapshot_name() / "projection.npz"
    data = bytearray(projection.read_bytes())
    data[-40] ^= 0xFF
    projection.write_bytes(bytes(data))
    with pytest.raises(IndexStoreError, match=r"projection\.npz is damaged"):
        DurableIndex.open(tmp_path, IDENTITY, PARAMS, reduction=REDUCTION)


@pytest.mark.slow
def test_a_service_with_pca_fits_at_load_searches_and_survives_a_kill(make_stack, shared_dir):
    """Real workers: the sample loads, the owner reduces at 300 items and the replica follows it to the reduced
    index, searches find the photo; after kill -9 the restarted owner has the same projection and every item."""
    stack = make_stack(LOOKALIKE_PCA_DIM="64", LOOKALIKE_PCA_FIT_ITEMS="300")
    start_workers(stack, stack.settings)
    client = Client(stack.settings)
    job = client.follow(client.start_load(shared_dir / "data" / "fashion"), timeout=600)
    assert job["progress"]["done"] == SAMPLE_SIZE
    stats = client.stats(min_seq=job["seq"])
    assert stats["role"] == "replica" and stats["items"] == SAMPLE_SIZE
    assert stats["dimension"] == 64 and 300 <= stats["pca"]["fitted_on"] < SAMPLE_SIZE
    assert stats["pca"]["input_dimension"] == 1280 and stack.heartbeat("index")[0]["pca"] == stats["pca"]
    hits = search(client, image_bytes(shared_dir, "10186"))["result"]["hits"]
    assert hits[0]["id"] == "10186" and hits[0]["score"] > 0.99
    similar = client.similar("10186", 5)["hits"]
    assert "10186" not in [hit["id"] for hit in similar] and len(similar) == 5

    stack.kill("index")
    stack.start("index")
    assert client.stats()["pca"] == stats["pca"] and client.stats()["items"] == SAMPLE_SIZE
    assert search(client, image_bytes(shared_dir, "10186"))["result"]["hits"] == hits
