"""Keras model -> ONNX with tf2onnx: opset 17, dynamic batch, stable input and output names."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import onnx
import tensorflow as tf
import tf2onnx

from common.files import atomic_write_bytes
from export.keras_model import INPUT_NAME, OUTPUT_NAME

OPSET = 17
BATCH_DIM = "batch"


def convert_to_onnx(model: keras.Model, out: Path, opset: int = OPSET) -> onnx.ModelProto:
    """Convert `model` and write it to `out` atomically; returns the ONNX graph that was written."""
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    signature = (tf.TensorSpec((None, *model.input_shape[1:]), tf.uint8, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    _name_batch_dimension(proto)
    onnx.checker.check_model(proto)
    atomic_write_bytes(out, proto.SerializeToString())
    return proto


def _name_batch_dimension(proto: onnx.ModelProto) -> None:
    """tf2onnx calls the dynamic batch `unk__123`; call it `batch` and check the names the contract promises."""
    inputs, outputs = list(proto.graph.input), list(proto.graph.output)
    names = ([value.name for value in inputs], [value.name for value in outputs])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise RuntimeError(f"tf2onnx produced inputs/outputs {names}, expected ([{INPUT_NAME!r}], [{OUTPUT_NAME!r}])")
    for value in (*inputs, *outputs):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
