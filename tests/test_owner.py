"""The index owner accepts only vectors of its index's model and counts every item of a batch."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from common.model import load_model
from common.settings import Settings
from common.vectors import encode_vector
from protocol.jobs import Jobs
from tests.onnx_models import pooling_model
from worker.index import IndexParams
from worker.owner import IndexOwner
from worker.snapshots import ModelIdentity
from worker.store import DurableIndex


@pytest.fixture
def owner(tmp_path, module_redis) -> IndexOwner:
    client = redis.Redis.from_url(module_redis)
    client.flushdb()
    model = load_model(pooling_model(tmp_path / "model.onnx"))
    store = DurableIndex.open(tmp_path / "index", ModelIdentity(model.sha256, 3, "stretch"), IndexParams(dim=3))
    settings = Settings.from_env({"LOOKALIKE_DATA_DIR": str(tmp_path)})
    yield IndexOwner(settings, model, store, client)
    store.close()


def test_vectors_of_another_model_or_resize_policy_are_per_item_errors(owner):
    jobs = Jobs(owner.redis)
    job_id = jobs.create("load", {})
    jobs.start(job_id)
    jobs.set_total(job_id, 3)

    def upsert(item_id: str, model_sha256: str, resize: str = "stretch") -> dict:
        vector = encode_vector(np.array([1.0, 2.0, 3.0], dtype=np.float32))
        return {"op": "upsert", "id": item_id, "vector": vector, "metadata": {}, "model_sha256": model_sha256,
                "resize": resize, "image_sha256": "i", "metadata_sha256": "m"}  # fmt: skip

    result = owner.apply(
        job_id,
        [upsert("ok", owner.model.sha256), upsert("other", "f" * 64), upsert("padded", owner.model.sha256, "pad")],
    )
    assert result == {"applied": 1, "failed": 2}
    job = jobs.get(job_id)
    assert (job["state"], job["errors_by_code"]) == ("partial", {"model_mismatch": 2})
    assert "item" in owner.reader.get("ok", 0) and owner.reader.get("other", 0)["error"]["code"] == "not_found"


def test_a_batch_the_index_cannot_take_is_counted_failed_not_lost(owner):
    jobs = Jobs(owner.redis)
    job_id = jobs.create("load", {})
    jobs.start(job_id)
    jobs.set_total(job_id, 1)
    bad = {"op": "upsert", "id": "x", "vector": "not base64!", "model_sha256": owner.model.sha256, "resize": "stretch"}
    assert owner.apply(job_id, [bad]) == {"applied": 0, "failed": 1}
    assert jobs.get(job_id)["errors"][0]["code"] == "index_error"


def test_facets_are_the_few_valued_fields_and_follow_the_catalogue(owner):
    vector = encode_vector(np.array([1.0, 2.0, 3.0], dtype=np.float32))

    def upsert(item_id: str, **metadata: str) -> dict:
        return {"op": "upsert", "id": item_id, "vector": vector, "metadata": metadata, "resize": "stretch",
                "model_sha256": owner.model.sha256, "image_sha256": item_id, "metadata_sha256": item_id}  # fmt: skip

    owner.apply(None, [upsert(str(n), gender="Women" if n % 3 else "Men", name=f"product {n}") for n in range(30)])
    assert owner.reader.facets() == {"gender": ["Women", "Men"]}  # every name differs: not a filter
    owner.apply(None, [upsert(str(n), gender="Unisex", name="x") for n in range(30, 41)])
    assert owner.reader.facets()["gender"] == ["Women", "Unisex", "Men"]  # grew by a third: counted again
    assert owner.heartbeat()["items"] == 41


def test_a_batch_of_only_another_models_vectors_is_model_mismatch_and_leaves_no_gap(owner):
    jobs = Jobs(owner.redis)
    job_id = jobs.create("load", {})
    jobs.start(job_id)
    jobs.set_total(job_id, 2)
    vector = encode_vector(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    foreign = [
        {"op": "upsert", "id": item_id, "vector": vector, "metadata": {}, "model_sha256": "f" * 64,
         "resize": "stretch", "image_sha256": "i", "metadata_sha256": "m"}
        for item_id in ("a", "b")
    ]  # fmt: skip
    seq = owner.store.seq
    assert owner.apply(job_id, foreign) == {"applied": 0, "failed": 2}
    assert jobs.get(job_id)["errors_by_code"] == {"model_mismatch": 2} and owner.store.seq == seq
    wrong_shape = {**foreign[0], "model_sha256": owner.model.sha256, "vector": encode_vector(np.ones(4, np.float32))}
    assert owner.apply(None, [wrong_shape]) == {"applied": 0, "failed": 1}
    assert owner.store.seq == seq  # a batch the log did not take leaves no hole in the sequence numbers


def test_a_metadata_change_to_an_item_deleted_meanwhile_is_not_counted_as_indexed(owner):
    jobs = Jobs(owner.redis)
    vector = encode_vector(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    upsert = {"op": "upsert", "id": "a", "vector": vector, "metadata": {"colour": "red"}, "resize": "stretch",
              "model_sha256": owner.model.sha256, "image_sha256": "i", "metadata_sha256": "red"}  # fmt: skip
    owner.apply(None, [upsert])
    owner.delete(["a"])  # while a load that saw "a" indexed sends only its new metadata
    job_id = jobs.create("load", {})
    jobs.start(job_id)
    jobs.set_total(job_id, 1)
    seq = owner.store.seq
    metadata_only = {**upsert, "vector": None, "metadata": {"colour": "blue"}, "metadata_sha256": "blue"}
    assert owner.apply(job_id, [metadata_only]) == {"applied": 0, "failed": 1}
    job = jobs.get(job_id)
    assert (job["state"], job["errors_by_code"]) == ("failed", {"not_found": 1}) and owner.store.seq == seq
    assert owner.redis.hget("lookalike:index:checksums", "a") is None  # the next load embeds it again
