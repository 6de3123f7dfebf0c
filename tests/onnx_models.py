"""Tiny ONNX graphs made on the fly, each keeping or breaking one rule of the model contract."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper


def pooling_model(
    path: Path,
    input_type: int = TensorProto.UINT8,
    input_shape: tuple = ("batch", 32, 32, 3),
    spatial_axes: tuple[int, int] = (1, 2),
    outputs: int = 1,
    keep_dims: bool = False,
) -> Path:
    """image -> float -> global max pool over `spatial_axes`: [batch, 3] (or rank 4 with `keep_dims`)."""
    image = helper.make_tensor_value_info("image", input_type, list(input_shape))
    nodes = [helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT)]
    names = [f"embedding{index}" if index else "embedding" for index in range(outputs)]
    values = []
    for name in names:
        nodes.append(
            helper.make_node("ReduceMax", ["pixels"], [name], axes=list(spatial_axes), keepdims=int(keep_dims))
        )
        values.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "pooling", [image], values)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = onnx.shape_inference.infer_shapes(model)
    onnx.save(model, path)
    return path
