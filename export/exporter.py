"""`lookalike export`: build the Keras model, convert it, prove parity, write the model and its card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.files import atomic_replace, ensure_writable_file
from common.model import load_model
from export.card import contract_fields, write_card
from export.keras_model import build_embedding_model, check_pooling
from export.parity import PARITY_BOUND, check_parity, parity_images
from export.progress import Progress
from export.weights import WeightsSource, resolve_weights

if TYPE_CHECKING:
    import keras

BACKBONE = "ResNet50"


@dataclass
class ExportedModel:
    """What an export produced: the ONNX file, its card, and the Keras model it was converted from."""

    path: Path
    card: dict[str, Any]
    keras_model: keras.Model


def export_resnet50(
    out: Path,
    pooling: str = "max",
    weights: str = "imagenet",
    sample: Path | None = None,
    progress: Progress | None = None,
) -> ExportedModel:
    """Export ResNet50 + global `pooling` with `weights` to `out`, with its card beside it."""
    progress = progress or Progress()
    check_pooling(pooling)
    ensure_writable_file(out)
    source = _weights(weights, progress)

    # TensorFlow takes seconds to import: only after every argument has been checked.
    from export.convert import OPSET, convert_to_onnx

    progress.say(f"Exporting {BACKBONE} with {pooling} pooling, weights: {source.describe()}")
    with progress.step("build Keras model") as note:
        keras_model = build_embedding_model(pooling, source)
        note["detail"] = f"{keras_model.count_params():,} parameters"
    # Until it passes the parity check the new model sits beside the old one, which stays usable.
    staged = out.with_name(f".{out.name}.partial")
    try:
        with progress.step("convert to ONNX with tf2onnx") as note:
            convert_to_onnx(keras_model, staged)
            note["detail"] = f"opset {OPSET}, {staged.stat().st_size / 1e6:.1f} MB"
        with progress.step("parity check, Keras vs onnxruntime") as note:
            onnx_model = load_model(staged, providers=["cpu"])
            images, origin = parity_images(onnx_model.contract.size, sample)
            expected = keras_model.predict(images, batch_size=len(images), verbose=0)
            difference = check_parity(expected, onnx_model.embed(images))
            note["detail"] = f"max relative difference {difference:.1e} on {origin}"
        atomic_replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)

    card = write_card(
        out,
        {
            "backbone": BACKBONE,
            "pooling": pooling,
            "precision": "fp32",
            **contract_fields(onnx_model.contract),
            "preprocessing": "inside the graph: cast to float32, keras.applications.resnet50.preprocess_input "
            "(RGB to BGR, ImageNet mean subtracted)",
            "weights": source.as_card(),
            "opset": OPSET,
            "parity": {"max_relative_difference": difference, "bound": PARITY_BOUND, "checked_on": origin},
            "timings_s": progress.timings,
        },
    )
    progress.say(f"wrote {out} (sha256 {card['sha256'][:16]}...) and its card {out.with_suffix('.json')}")
    return ExportedModel(out, card, keras_model)


def _weights(spec: str, progress: Progress) -> WeightsSource:
    if spec.lower() != "imagenet":
        return resolve_weights(spec)
    with progress.step("ImageNet weights (Keras download, cached after the first run)"):
        return resolve_weights(spec)
