"""`lookalike export` end to end with random weights: real Keras, real tf2onnx, real onnxruntime."""

from __future__ import annotations

import json
from datetime import datetime

import h5py
import numpy as np
import onnx
import pytest

from common.files import file_sha256
from common.model import card_path, load_model
from export.errors import ExportError
from export.exporter import export_resnet50
from export.keras_model import build_embedding_model
from export.parity import PARITY_BOUND, max_relative_difference
from export.progress import Progress
from export.weights import resolve_weights

pytestmark = pytest.mark.slow


def random_images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 224, 224, 3), dtype=np.uint8)


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_matches_keras_for_any_batch_size(resnet_export, batch):
    images = random_images(batch)
    expected = resnet_export.keras_model.predict(images, verbose=0)
    embedded = load_model(resnet_export.path, providers=["cpu"]).embed(images)
    assert embedded.shape == (batch, 2048)
    assert max_relative_difference(expected, embedded) <= PARITY_BOUND


def test_the_onnx_graph_has_stable_names_a_dynamic_batch_and_opset_17(resnet_export):
    graph = onnx.load(resnet_export.path)
    (image,), (embedding,) = graph.graph.input, graph.graph.output
    assert (image.name, embedding.name) == ("image", "embedding")
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["batch", 224, 224, 3]
    assert [d.dim_param or d.dim_value for d in embedding.type.tensor_type.shape.dim] == ["batch", 2048]
    assert {opset.domain: opset.version for opset in graph.opset_import}[""] == 17


def test_the_card_is_complete_and_its_sha256_is_the_files(resnet_export):
    card = resnet_export.card
    assert card == json.loads(card_path(resnet_export.path).read_text())
    assert card["sha256"] == file_sha256(resnet_export.path)
    assert card["bytes"] == resnet_export.path.stat().st_size
    assert (card["backbone"], card["pooling"], card["precision"], card["opset"]) == ("ResNet50", "max", "fp32", 17)
    assert card["input"] == {
        "name": "image",
        "dtype": "uint8",
        "shape": ["batch", 224, 224, 3],
        "layout": "NHWC",
        "color": "RGB",
        "range": [0, 255],
    }
    assert card["output"] == {"name": "embedding", "dtype": "float32", "dimension": 2048}
    assert card["weights"] == {"source": "none", "path": None, "sha256": None}
    assert set(card["versions"]) >= {"tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"}
    assert 0 <= card["parity"]["max_relative_difference"] <= card["parity"]["bound"] == PARITY_BOUND
    assert card["parity"]["checked_on"] == "8 random images"
    assert datetime.fromisoformat(card["created"]).tzinfo is not None
    assert set(card["timings_s"]) == {
        "build Keras model",
        "convert to ONNX with tf2onnx",
        "parity check, Keras vs onnxruntime",
    }


def test_export_from_a_local_weights_file_gives_the_in_memory_models_outputs(tmp_path, sample_images):
    in_memory = build_embedding_model("avg")
    weights = tmp_path / "resnet50_random.weights.h5"
    in_memory.get_layer("resnet50").save_weights(weights)

    exported = export_resnet50(tmp_path / "from_file.onnx", "avg", str(weights), sample=sample_images)

    assert exported.card["weights"] == {"source": "file", "path": str(weights), "sha256": file_sha256(weights)}
    assert exported.card["pooling"] == "avg"
    assert exported.card["parity"]["checked_on"] == f"8 images from {sample_images}"
    images = random_images(3, seed=2)
    onnx_embeddings = load_model(exported.path).embed(images)
    assert max_relative_difference(in_memory.predict(images, verbose=0), onnx_embeddings) <= PARITY_BOUND


def test_the_keras_released_notop_h5_layout_loads_too(tmp_path):
    from keras.src.legacy.saving import legacy_h5_format  # writes the layout of Keras's downloadable files

    in_memory = build_embedding_model("max")
    weights = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(weights, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, in_memory.get_layer("resnet50"))

    reloaded = build_embedding_model("max", resolve_weights(str(weights)))
    images = random_images(2, seed=3)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), in_memory.predict(images, verbose=0), rtol=1e-6)


def test_weights_of_another_network_are_refused_in_one_line(tmp_path):
    weights = tmp_path / "other.weights.h5"
    with h5py.File(weights, "w") as file:
        file["vars/0"] = np.zeros(3)
    with pytest.raises(ExportError, match="don't fit ResNet50 without its top") as refused:
        build_embedding_model("max", resolve_weights(str(weights)))
    assert "\n" not in str(refused.value)


def test_a_failed_parity_check_keeps_the_previous_model_and_says_why(tmp_path, monkeypatch):
    import export.exporter

    def skewed(expected, candidate):
        return export.parity.check_parity(expected, candidate * 1.001)

    monkeypatch.setattr(export.exporter, "check_parity", skewed)
    out = tmp_path / "skewed.onnx"
    out.write_bytes(b"the model a worker uses today")
    with pytest.raises(ExportError, match=r"parity check failed: ONNX differs from Keras by 1.00e-03 \(relative\)"):
        export_resnet50(out, weights="none", progress=Progress())
    assert out.read_bytes() == b"the model a worker uses today"  # the failed export replaced nothing
    assert not card_path(out).exists() and [path.name for path in tmp_path.iterdir()] == ["skewed.onnx"]
