"""A projection head learned from the shop's labels on a model's frozen embeddings, and the tuned model it makes.

The head is unit length -> a linear map (started at the training vectors' principal axes, so that it begins where
the model is) -> unit length; the MLP head adds to the map a hidden layer's output (relu, dropout while training),
started at zero so that it begins where the linear head does. It is trained with one cosine-softmax classifier per
label with an additive margin (CosFace), their losses summed with the labels' weights, then converted with tf2onnx
and merged after the backbone into one graph with the contract.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx
import tensorflow as tf
import tf2onnx

from common.files import atomic_write_bytes, file_sha256
from common.model import EmbeddingModel, load_model
from common.vectors import unit_rows
from export.card import contract_fields, write_card
from export.errors import ExportError
from export.head import TrainingSettings

HEAD_INPUT = "backbone_embedding"
HEAD_PREFIX = "head/"
BACKBONE_OUTPUT = "backbone/embedding"
PARITY_BOUND = 1e-4  # largest difference between the tuned model and backbone + head, on unit vectors
CARRIED_FIELDS = ("backbone", "pooling", "preprocessing", "weights", "opset")


def train_head(
    vectors: np.ndarray,
    targets: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    settings: TrainingSettings,
) -> keras.Model:
    """Train a head on `vectors` (raw model outputs); `targets[label]` holds class numbers, -1 where unknown."""
    keras.utils.set_random_seed(settings.seed)
    inputs = unit_rows(vectors.astype(np.float32))
    if not 1 <= settings.dim <= inputs.shape[1]:
        raise ExportError(f"--dim {settings.dim} must be between 1 and the model's {inputs.shape[1]} dimensions")
    head = build_head(inputs, settings)
    embedding = head.output

    outputs, losses, sample_weights = {}, {}, {}
    for number, (label, classes) in enumerate(targets.items()):
        count = int(classes.max()) + 1
        outputs[label] = CosineClassifier(count, settings.scale, name=f"classifier_{number}")(embedding)
        losses[label] = AdditiveMarginLoss(count, settings.scale, settings.margin, name=f"loss_{number}")
        sample_weights[label] = (classes >= 0).astype(np.float32)
    trainer = keras.Model(head.input, outputs)
    trainer.compile(optimizer=keras.optimizers.Adam(settings.learning_rate), loss=losses, loss_weights=dict(weights))
    trainer.fit(
        inputs,
        {label: np.maximum(classes, 0) for label, classes in targets.items()},
        sample_weight=sample_weights,
        batch_size=settings.batch,
        epochs=settings.epochs,
        shuffle=True,
        verbose=0,
    )
    return head


def build_head(unit_vectors: np.ndarray, settings: TrainingSettings) -> keras.Model:
    """The untrained head of `settings.head`'s kind, its map started at `unit_vectors`' principal axes."""
    backbone = keras.Input(shape=(unit_vectors.shape[1],), dtype="float32", name=HEAD_INPUT)
    unit_input = keras.layers.UnitNormalization(name="unit_input")(backbone)
    projected = keras.layers.Dense(
        settings.dim,
        use_bias=False,
        kernel_initializer=keras.initializers.Constant(_principal_axes(unit_vectors, settings.dim)),
        name="projection",
    )(unit_input)
    if settings.head == "mlp":
        hidden = keras.layers.Dense(settings.hidden, activation="relu", name="hidden")(unit_input)
        hidden = keras.layers.Dropout(settings.dropout, name="dropout")(hidden)
        correction = keras.layers.Dense(settings.dim, kernel_initializer="zeros", name="correction")(hidden)
        projected = keras.layers.Add(name="corrected")([projected, correction])
    embedding = keras.layers.UnitNormalization(name="embedding")(projected)
    return keras.Model(backbone, embedding, name="head")


def project(head: keras.Model, vectors: np.ndarray) -> np.ndarray:
    """The head's unit vectors for raw model outputs, as the tuned model gives them."""
    return np.asarray(head.predict(vectors.astype(np.float32), batch_size=4096, verbose=0), dtype=np.float32)


def write_tuned_model(
    source: EmbeddingModel,
    head: keras.Model,
    out: Path,
    parity_images: np.ndarray,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """Merge `head` after `source`'s graph into `out`, check it against the two run apart, and write its card."""
    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    backbone = onnx.load(str(source.path))
    opset = next(entry.version for entry in backbone.opset_import if entry.domain in ("", "ai.onnx"))
    signature = (tf.TensorSpec((None, source.contract.dimension), tf.float32, name=HEAD_INPUT),)
    head_proto, _ = tf2onnx.convert.from_keras(head, input_signature=signature, opset=opset)
    head_proto.ir_version = backbone.ir_version
    # tf2onnx declares domains the head never uses (ai.onnx.ml 2), which merging refuses beside another version of
    # them (an INT8 backbone declares ai.onnx.ml 5): keep only those its nodes use.
    used = {node.domain or "" for node in head_proto.graph.node} | {""}
    kept = [entry for entry in head_proto.opset_import if (entry.domain or "") in used]
    del head_proto.opset_import[:]
    head_proto.opset_import.extend(kept)
    # The head alone as well: an index of the source model becomes one of the tuned model by running it on the
    # vectors the index holds (`worker.reprojection`), without embedding the catalogue again.
    head_file = head_path(out)
    atomic_write_bytes(head_file, head_proto.SerializeToString())
    head_proto = onnx.compose.add_prefix(head_proto, HEAD_PREFIX)
    _rename_output(backbone, BACKBONE_OUTPUT)  # the merged model's output takes the backbone's output name
    merged = onnx.compose.merge_models(backbone, head_proto, io_map=[(BACKBONE_OUTPUT, HEAD_PREFIX + HEAD_INPUT)])
    _rename_output(merged, source.contract.output_name)
    onnx.checker.check_model(merged)
    atomic_write_bytes(out, merged.SerializeToString())

    tuned = load_model(out, providers=["cpu"])
    expected = project(head, source.embed(parity_images))
    difference = float(np.abs(tuned.embed(parity_images) - expected).max())
    if difference > PARITY_BOUND:
        out.unlink()
        head_file.unlink()
        raise ExportError(f"the tuned model differs from backbone + head by {difference:.2g} (bound {PARITY_BOUND})")
    carried = {key: source.card[key] for key in CARRIED_FIELDS if source.card and key in source.card}
    return write_card(
        out,
        {
            **carried,
            "precision": "fp32",
            **contract_fields(tuned.contract),
            "source_model": {"file": source.path.name, "sha256": source.sha256},
            "head_model": {"file": head_file.name, "sha256": file_sha256(head_file)},
            **fields,
            "parity": {"max_abs_difference": difference, "bound": PARITY_BOUND, "images": len(parity_images)},
        },
    )


def head_path(tuned: Path) -> Path:
    """Where the tuned model's head is written alone, beside it."""
    return tuned.with_name(f"{tuned.stem}.head.onnx")


def _principal_axes(unit_vectors: np.ndarray, dim: int) -> np.ndarray:
    """The `dim` directions of most variance, as a `[features, dim]` kernel (PCA without centring the index)."""
    centred = unit_vectors - unit_vectors.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    kernel = np.zeros((unit_vectors.shape[1], dim), dtype=np.float32)
    kernel[:, : min(dim, len(axes))] = axes[:dim].T
    return kernel


def _rename_output(model: onnx.ModelProto, name: str) -> None:
    """Give the graph's one output another name, wherever its nodes write or read it."""
    (output,) = model.graph.output
    for node in model.graph.node:
        node.output[:] = [name if value == output.name else value for value in node.output]
        node.input[:] = [name if value == output.name else value for value in node.input]
    output.name = name


class CosineClassifier(keras.layers.Layer):
    """Logits = scale x the cosine between the embedding and each class's learned direction."""

    def __init__(self, classes: int, scale: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classes, self.scale = classes, scale

    def build(self, input_shape: Any) -> None:
        self.directions = self.add_weight(shape=(input_shape[-1], self.classes), initializer="glorot_uniform")

    def call(self, embedding: Any) -> Any:
        return self.scale * keras.ops.matmul(embedding, keras.ops.normalize(self.directions, axis=0))


class AdditiveMarginLoss(keras.losses.Loss):
    """Softmax cross-entropy after taking `scale` x `margin` off each item's own class logit (CosFace): an item must
    be nearer its class than the others by the margin, which keeps the classes apart in the embedding."""

    def __init__(self, classes: int, scale: float, margin: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classes, self.offset = classes, scale * margin

    def call(self, classes: Any, logits: Any) -> Any:
        own = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(classes, (-1,)), "int32"), self.classes)
        return keras.losses.categorical_crossentropy(own, logits - self.offset * own, from_logits=True)
