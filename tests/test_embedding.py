"""One embedding batch: unchanged items skipped, new metadata without re-embedding, bad files as item errors."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from common.model import load_model
from common.settings import Settings
from common.vectors import decode_vector, encode_vector
from tests.onnx_models import pooling_model
from worker.embedding import embed_items, metadata_checksum


def test_vectors_survive_the_trip_through_json():
    vector = np.random.default_rng(0).normal(size=2048).astype(np.float32)
    np.testing.assert_array_equal(decode_vector(encode_vector(vector)), vector)


def test_a_batch_embeds_new_items_and_skips_what_the_index_already_has(tmp_path):
    settings = Settings.from_env({"LOOKALIKE_CATALOG_ROOT": str(tmp_path), "LOOKALIKE_DATA_DIR": str(tmp_path / "d")})
    model = load_model(pooling_model(tmp_path / "model.onnx"))
    for name, colour in (("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(buffer, "PNG")
        (tmp_path / f"{name}.png").write_bytes(buffer.getvalue())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    def item(name: str, **metadata: str) -> dict:
        return {"id": name, "area": "catalog", "path": f"{name}.png", "metadata": metadata}

    def image_sha(name: str) -> str:
        return hashlib.sha256((tmp_path / f"{name}.png").read_bytes()).hexdigest()

    known = {
        "red": (image_sha("red"), metadata_checksum({"colour": "red"})),  # unchanged
        "green": (image_sha("green"), metadata_checksum({"colour": "old"})),  # same photo, new metadata
    }
    items = [item("red", colour="red"), item("green", colour="green"), item("blue", colour="blue"),
             item("broken"), {"id": "gone", "area": "catalog", "path": "gone.png"},
             {"id": "escape", "area": "catalog", "path": "../outside.png"}]  # fmt: skip
    outcome = embed_items(items, model, settings, known)

    assert outcome.unchanged == ["red"]
    changes = {change["id"]: change for change in outcome.changes}
    assert set(changes) == {"green", "blue"}
    assert "vectors" not in changes["green"] and changes["green"]["metadata"]["colour"] == "green"
    np.testing.assert_allclose(decode_vector(changes["blue"]["vectors"][0]), [0, 0, 255])
    assert changes["blue"]["photos"] == [{"sha256": image_sha("blue"), "image": "catalog/blue.png"}]
    assert changes["blue"]["metadata"] == {"colour": "blue", "image": "catalog/blue.png"}
    assert {key: error["code"] for key, error in outcome.errors.items()} == {
        "broken": "not_an_image",  # a PNG signature and no header after it
        "gone": "missing_file",
        "escape": "outside_root",
    }


def test_an_image_over_the_byte_cap_is_a_too_large_item_error_and_is_never_read(tmp_path):
    settings = Settings.from_env({"LOOKALIKE_CATALOG_ROOT": str(tmp_path), "LOOKALIKE_DATA_DIR": str(tmp_path / "d"),
                                  "LOOKALIKE_MAX_IMAGE_BYTES": "3000"})  # fmt: skip
    model = load_model(pooling_model(tmp_path / "model.onnx"))
    Image.effect_noise((64, 64), 64).save(tmp_path / "noisy.png")  # about 4 KB: over the cap
    Image.new("RGB", (40, 30), (0, 0, 255)).save(tmp_path / "small.png")
    with (tmp_path / "huge.png").open("wb") as file:
        file.truncate(2**28)  # 256 MiB of holes: nothing on disk, but reading it takes 256 MiB
    items = [{"id": name, "area": "catalog", "path": f"{name}.png"} for name in ("noisy", "small", "huge")]
    outcome = embed_items(items, model, settings, {})
    assert [change["id"] for change in outcome.changes] == ["small"]
    assert outcome.errors["huge"] == {"code": "too_large", "message": "the file is 268,435,456 bytes, over "
                                      "LOOKALIKE_MAX_IMAGE_BYTES (3,000); raise it to read larger files"}  # fmt: skip
    assert outcome.errors["noisy"]["code"] == "too_large"
