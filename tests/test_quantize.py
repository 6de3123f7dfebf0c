"""Static INT8 on a model with real learned features, calibrated on part of the shared product photos."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from common.files import file_sha256
from common.model import card_path, load_model
from export.errors import ExportError
from export.images import list_images
from export.progress import Progress
from export.quantize import quantize_int8
from tests.conftest import int8_min_cosine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, pretrained_model, sample_images):
    out = tmp_path_factory.mktemp("int8") / "efficientnet_lite0_max_int8.onnx"
    card = quantize_int8(pretrained_model, out, sample_images, 200, 100, Progress())
    return out, card


def test_int8_stays_close_to_fp32_on_held_back_images(int8_export):
    _, card = int8_export
    quality = card["quantization"]
    assert (quality["calibration_images"], quality["holdout_images"]) == (200, 100)
    assert quality["mean_cosine_fp32_int8"] >= int8_min_cosine()
    assert quality["min_cosine_fp32_int8"] <= quality["mean_cosine_fp32_int8"]
    assert quality["neighbours"] == 10
    assert 0.8 <= quality["top_k_agreement"] <= 1.0


def test_the_int8_model_keeps_the_contract_and_its_card_records_the_source(int8_export, pretrained_model):
    out, card = int8_export
    assert json.loads(card_path(out).read_text()) == card
    assert card["sha256"] == file_sha256(out)
    assert card["precision"] == "int8"
    assert card["source_model"] == {"file": pretrained_model.name, "sha256": file_sha256(pretrained_model)}
    assert {key: card["quantization"][key] for key in ("method", "format", "per_channel")} == {
        "method": "static",
        "format": "QOperator",
        "per_channel": True,
    }
    model = load_model(out)
    assert (model.contract.size, model.contract.dimension) == ((224, 224), 1280)
    graph_ops = {node.op_type for node in onnx.load(out).graph.node}
    assert "QLinearConv" in graph_ops  # QOperator format, not QDQ
    assert out.stat().st_size < pretrained_model.stat().st_size / 2


def test_the_int8_model_ranks_a_products_own_photo_first(int8_export, sample_images):
    out, _ = int8_export
    from export.images import load_images

    model = load_model(out)
    images, _ = load_images(list_images(sample_images)[:50], model.contract.size)
    vectors = model.embed(images)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert (np.argmax(vectors @ vectors.T, axis=1) == np.arange(50)).all()


def test_quantising_needs_calibration_images(tmp_path, pretrained_model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no images in"):
        quantize_int8(pretrained_model, tmp_path / "q.onnx", tmp_path / "empty", 10, 5, Progress())
    with pytest.raises(ExportError, match="would overwrite its source"):
        quantize_int8(pretrained_model, pretrained_model, tmp_path / "empty", 10, 5, Progress())


def test_a_folder_of_a_few_images_still_quantises_and_says_what_it_measured(tmp_path, pretrained_model, sample_images):
    few = tmp_path / "few"
    few.mkdir()
    for path in list_images(sample_images)[:12]:
        shutil.copy(path, few)
    (few / "broken.jpg").write_bytes(b"not a jpeg")
    card = quantize_int8(pretrained_model, tmp_path / "few_int8.onnx", few, 200, 100, Progress())
    quality = card["quantization"]
    assert (quality["calibration_images"], quality["holdout_images"]) == (10, 2)
    assert quality["neighbours"] == 1
