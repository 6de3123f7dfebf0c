"""Open an ONNX embedding model, check it against lookalike's model contract, and run it."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from common.errors import LookalikeError
from common.files import file_sha256

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class ModelError(LookalikeError):
    """The model can't be opened as configured; the message says why."""


class ContractError(ModelError):
    """The ONNX file is not a model lookalike can use; the message names what breaks the contract."""


@dataclass(frozen=True)
class ModelContract:
    """What the worker needs to know about a model: uint8 NHWC RGB in, float32 [batch, dimension] out."""

    input_name: str
    output_name: str
    height: int
    width: int
    dimension: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), the order Pillow uses."""
        return self.width, self.height


@dataclass
class EmbeddingModel:
    """An onnxruntime session that honours the contract, with the facts the service reports about it."""

    path: Path
    sha256: str
    contract: ModelContract
    session: ort.InferenceSession
    requested_providers: list[str]
    card: dict[str, Any] | None

    @property
    def provider(self) -> str:
        """The execution provider the session really runs on (onnxruntime falls back silently otherwise)."""
        return self.session.get_providers()[0]

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed a uint8 batch `[n, height, width, 3]`; returns float32 `[n, dimension]`."""
        expected = (self.contract.height, self.contract.width, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(
                f"expected uint8 images of shape [n, {', '.join(map(str, expected))}], "
                f"got {images.dtype} {list(images.shape)}"
            )
        (vectors,) = self.session.run([self.contract.output_name], {self.contract.input_name: images})
        return np.asarray(vectors, dtype=np.float32)


def card_path(model_path: str | Path) -> Path:
    """The model card that sits beside a model: `resnet50_max.onnx` -> `resnet50_max.json`."""
    return Path(model_path).with_suffix(".json")


def read_card(model_path: str | Path) -> dict[str, Any] | None:
    path = card_path(model_path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"model card {path} can't be read: {error}") from error


def resolve_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Execution providers to ask for, best first: CUDA when this onnxruntime has it, then CPU.

    `requested` names providers explicitly (`cuda`, `cpu`, or full onnxruntime names); `None` or `["auto"]`
    means the best available.
    """
    available = ort.get_available_providers()
    if not requested or list(requested) == ["auto"]:
        preferred = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return [name for name in preferred if name in available]
    names = [PROVIDER_ALIASES.get(name.strip().lower(), name.strip()) for name in requested]
    missing = [name for name in names if name not in available]
    if missing:
        raise ModelError(
            f"execution provider {', '.join(missing)} is not in this onnxruntime build "
            f"(available: {', '.join(available)}); install lookalike[gpu] for CUDA"
        )
    return names


def check_contract(session: ort.InferenceSession, card: dict[str, Any] | None = None) -> ModelContract:
    """Check the model's inputs and outputs against the contract, naming what is wrong."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ContractError(f"the model has {len(inputs)} inputs ({_names(inputs)}); expected exactly one image input")
    if len(outputs) != 1:
        raise ContractError(
            f"the model has {len(outputs)} outputs ({_names(outputs)}); expected exactly one embedding output"
        )
    image, embedding = inputs[0], outputs[0]
    if image.type != "tensor(uint8)":
        raise ContractError(f"input {image.name!r} is {image.type}; expected tensor(uint8) pixels 0..255")
    if len(image.shape) != 4:
        raise ContractError(f"input {image.name!r} has shape {image.shape}; expected [batch, height, width, 3]")
    if image.shape[3] != 3:
        layout = " (channels first, NCHW?)" if image.shape[1] == 3 else ""
        raise ContractError(
            f"input {image.name!r} has shape {image.shape}{layout}; expected channels last [batch, height, width, 3]"
        )
    if embedding.type != "tensor(float)":
        raise ContractError(f"output {embedding.name!r} is {embedding.type}; expected tensor(float)")
    if len(embedding.shape) != 2:
        raise ContractError(f"output {embedding.name!r} has shape {embedding.shape}; expected [batch, dimension]")
    height, width = _spatial_size(image.name, image.shape, card)
    dimension = embedding.shape[1]
    if not isinstance(dimension, int):
        dimension = ((card or {}).get("output") or {}).get("dimension")
        if not isinstance(dimension, int):
            raise ContractError(f"output {embedding.name!r} has no fixed dimension and no model card gives it")
    return ModelContract(image.name, embedding.name, height, width, dimension)


def load_model(
    path: str | Path,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
) -> EmbeddingModel:
    """Open any ONNX file that has the contract; refuse anything else with a message naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    options = ort.SessionOptions()
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    # Threads that spin while they wait for work burn cores that other processes on the machine need (the web,
    # the other workers); a process that shares the machine waits for work asleep.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    wanted = resolve_providers(providers)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
    except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
        raise ContractError(f"{path} is not a loadable ONNX model: {error}") from error
    card = read_card(path)
    model = EmbeddingModel(
        path=path,
        sha256=file_sha256(path),
        contract=check_contract(session, card),
        session=session,
        requested_providers=wanted,
        card=card,
    )
    if model.provider != wanted[0]:
        log.warning("%s was requested but is unavailable: model %s runs on %s", wanted[0], path.name, model.provider)
    log.info("model %s (%s) runs on %s", path.name, model.sha256[:12], model.provider)
    return model


def _names(values: Sequence[ort.NodeArg]) -> str:
    return ", ".join(repr(value.name) for value in values)


def _spatial_size(name: str, shape: list[Any], card: dict[str, Any] | None) -> tuple[int, int]:
    height, width = shape[1], shape[2]
    if isinstance(height, int) and isinstance(width, int):
        return height, width
    card_shape = ((card or {}).get("input") or {}).get("shape") or []
    if len(card_shape) == 4 and all(isinstance(side, int) for side in card_shape[1:3]):
        return card_shape[1], card_shape[2]
    raise ContractError(f"input {name!r} has shape {shape}: the spatial size is not fixed and no model card gives it")
