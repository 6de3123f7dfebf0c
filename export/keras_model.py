"""The tutorial's network as one functional Keras model: uint8 RGB in, pooled ResNet50 features out."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from export.errors import ExportError
from export.weights import WeightsSource

if TYPE_CHECKING:
    import keras

INPUT_SIZE = 224
INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
POOLINGS = ("max", "avg")


def build_embedding_model(pooling: str = "max", weights: WeightsSource | None = None) -> keras.Model:
    """uint8 `[batch, 224, 224, 3]` RGB -> float -> `preprocess_input` -> ResNet50 (no top) -> global pooling.

    Functional, not Sequential: tf2onnx 1.17 can't convert a Sequential model. Preprocessing sits inside the
    graph so that every consumer of the ONNX file feeds plain RGB pixels.
    """
    check_pooling(pooling)
    import keras  # seconds to import: only once the arguments are known to be good

    weights = weights or WeightsSource("none")
    shape = (INPUT_SIZE, INPUT_SIZE, 3)
    image = keras.Input(shape=shape, dtype="uint8", name=INPUT_NAME)
    pixels = keras.applications.resnet50.preprocess_input(keras.ops.cast(image, "float32"))
    try:
        with warnings.catch_warnings():
            # Keras only warns when a weights file leaves layers at their random initial values; an export
            # that quietly ships random layers must fail instead.
            warnings.filterwarnings("error", message=".*(Skipping|freshly-initialized)", category=UserWarning)
            backbone = keras.applications.ResNet50(
                include_top=False, weights=str(weights.path) if weights.path else None, input_shape=shape
            )
    except (ValueError, OSError, KeyError, UserWarning) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"weights {weights.describe()} don't fit ResNet50 without its top: {reason}") from error
    pool = keras.layers.GlobalMaxPooling2D if pooling == "max" else keras.layers.GlobalAveragePooling2D
    embedding = pool(name=OUTPUT_NAME)(backbone(pixels))
    return keras.Model(image, embedding, name=f"resnet50_{pooling}")


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ExportError(f"unknown pooling {pooling!r} (choose {' or '.join(POOLINGS)})")
