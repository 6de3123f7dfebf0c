"""The one function that opens a model: it accepts any ONNX file with the contract and names what breaks it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto

from common.files import file_sha256
from common.model import ContractError, ModelError, card_path, load_model, resolve_providers
from tests.onnx_models import pooling_model


def test_a_contract_model_loads_and_embeds(tmp_path):
    path = pooling_model(tmp_path / "good.onnx")
    model = load_model(path)
    assert (model.contract.input_name, model.contract.output_name) == ("image", "embedding")
    assert model.contract.size == (32, 32)
    assert model.contract.dimension == 3
    assert model.sha256 == file_sha256(path)
    assert model.provider == "CPUExecutionProvider"
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    images[1, 5, 7] = (10, 20, 30)
    np.testing.assert_array_equal(model.embed(images), [[0, 0, 0], [10, 20, 30]])


def test_the_shared_pretrained_model_has_the_contract(pretrained_model):
    model = load_model(pretrained_model)
    assert model.contract.size == (224, 224)
    assert model.contract.dimension == 1280


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_type": TensorProto.FLOAT}, "tensor(float); expected tensor(uint8)"),
        ({"outputs": 2}, "2 outputs ('embedding', 'embedding1')"),
        ({"input_shape": ("batch", 3, 32, 32), "spatial_axes": (2, 3)}, "channels first, NCHW"),
        ({"input_shape": ("batch", 32, 32)}, "expected [batch, height, width, 3]"),
        ({"keep_dims": True}, "expected [batch, dimension]"),
        ({"input_shape": ("batch", "height", "width", 3)}, "spatial size is not fixed and no model card gives it"),
    ],
    ids=["float-input", "two-outputs", "nchw", "rank-3-input", "rank-4-output", "dynamic-size"],
)
def test_models_that_break_the_contract_are_refused_with_the_reason(tmp_path, kwargs, message):
    path = pooling_model(tmp_path / "bad.onnx", **kwargs)
    with pytest.raises(ContractError) as refused:
        load_model(path)
    assert message in str(refused.value)


def test_the_card_gives_the_size_of_a_model_with_dynamic_spatial_dimensions(tmp_path):
    path = pooling_model(tmp_path / "dynamic.onnx", input_shape=("batch", "height", "width", 3))
    card_path(path).write_text(json.dumps({"input": {"shape": ["batch", 48, 40, 3]}}))
    model = load_model(path)
    assert (model.contract.height, model.contract.width) == (48, 40)
    assert model.embed(np.ones((1, 48, 40, 3), dtype=np.uint8)).shape == (1, 3)


def test_embed_refuses_images_of_the_wrong_shape_or_type(tmp_path):
    model = load_model(pooling_model(tmp_path / "good.onnx"))
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \[n, 32, 32, 3\]"):
        model.embed(np.zeros((1, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="got uint8"):
        model.embed(np.zeros((1, 16, 16, 3), dtype=np.uint8))


def test_missing_and_unreadable_files_are_refused(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nowhere.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        load_model(junk)


def test_providers_default_to_the_best_available_and_explicit_ones_must_exist():
    assert resolve_providers(None)[-1] == "CPUExecutionProvider"
    assert resolve_providers(["auto"]) == resolve_providers(None)
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in resolve_providers(None):
        with pytest.raises(ModelError, match="CUDAExecutionProvider is not in this onnxruntime build"):
            resolve_providers(["cuda", "cpu"])
