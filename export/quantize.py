"""Static INT8 quantisation of any contract model, calibrated on the user's own catalogue images.

QOperator, per-channel, after onnxruntime's pre-processing: the fast CPU path. Dynamic quantisation is not
offered: on convolutional networks it is many times slower than fp32 on the CPU.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from common.files import atomic_replace, ensure_writable_file
from common.model import EmbeddingModel, load_model
from common.vectors import unit_rows
from export.card import contract_fields, write_card
from export.errors import ExportError
from export.images import list_images, load_images
from export.progress import Progress

CALIBRATION_BATCH = 16
NEIGHBOURS = 10
SPLIT_SEED = 0
# Copied from the source model's card: they describe the network, which quantisation doesn't change.
CARRIED_FIELDS = ("backbone", "pooling", "preprocessing", "weights", "opset")


class _BatchReader(CalibrationDataReader):
    """Feeds the calibration images to onnxruntime's calibrator in small batches."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        starts = range(0, len(images), CALIBRATION_BATCH)
        self._batches = iter([{input_name: images[start : start + CALIBRATION_BATCH]} for start in starts])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(
    source: Path,
    out: Path,
    calibration: Path,
    calibration_images: int,
    holdout_images: int,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Quantise `source` to `out` (+ card) and measure it on held-back images; returns the card."""
    progress = progress or Progress()
    if out.resolve() == source.resolve():
        raise ExportError(f"the INT8 model would overwrite its source {source}; choose another --out")
    ensure_writable_file(out)
    paths = list_images(calibration)
    fp32 = load_model(source, providers=["cpu"])
    progress.say(f"Quantising {source} to INT8 (static, QOperator, per-channel)")
    reduce_range = not has_vnni()
    if reduce_range:
        progress.say("this CPU has no VNNI: weights get 7 bits (reduce_range), or its INT8 kernels would saturate")

    with progress.step("decode calibration images") as note:
        calibration_set, holdout_set = _split(paths, calibration_images, holdout_images)
        calibration_batch, _ = load_images(calibration_set, fp32.contract.size)
        holdout_batch, holdout_used = load_images(holdout_set, fp32.contract.size) if holdout_set else (None, [])
        note["detail"] = f"{len(calibration_batch)} to calibrate, {len(holdout_used)} held back"

    with progress.step("quantise") as note, tempfile.TemporaryDirectory(dir=out.parent) as work:
        prepared = Path(work) / "prepared.onnx"
        quantized = Path(work) / "int8.onnx"
        quant_pre_process(str(source), str(prepared))
        with _ignoring_uint8_input_warning(fp32.contract.input_name):
            quantize_static(
                str(prepared),
                str(quantized),
                _BatchReader(fp32.contract.input_name, calibration_batch),
                quant_format=QuantFormat.QOperator,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        atomic_replace(quantized, out)
        note["detail"] = f"{out.stat().st_size / 1e6:.1f} MB, was {source.stat().st_size / 1e6:.1f} MB"

    with progress.step("compare fp32 and INT8 on held-back images") as note:
        int8 = load_model(out, providers=["cpu"])
        if holdout_batch is None:
            quality: dict[str, Any] = {}
            note["detail"] = "too few images to hold any back: quality not measured"
        else:
            quality = _quality(fp32, int8, holdout_batch)
            note["detail"] = ", ".join(f"{key} {value}" for key, value in quality.items())

    carried = {key: fp32.card[key] for key in CARRIED_FIELDS if fp32.card and key in fp32.card}
    card = write_card(
        out,
        {
            **carried,
            "precision": "int8",
            **contract_fields(int8.contract),
            "source_model": {"file": source.name, "sha256": fp32.sha256},
            "quantization": {
                "method": "static",
                "format": "QOperator",
                "per_channel": True,
                "reduce_range": reduce_range,
                "activation_type": "uint8",
                "weight_type": "int8",
                "calibration_method": "MinMax",
                "calibration_folder": str(calibration),
                "calibration_images": len(calibration_batch),
                "holdout_images": len(holdout_used),
                **quality,
            },
            "timings_s": progress.timings,
        },
    )
    progress.say(f"wrote {out} (sha256 {card['sha256'][:16]}...) and its card {out.with_suffix('.json')}")
    return card


def has_vnni() -> bool:
    """Whether this x86 CPU multiplies uint8 by int8 without saturating (VNNI). Without it (AVX2 alone) onnxruntime's
    INT8 kernels saturate on full 8-bit weights: the mean cosine to fp32 fell to 0.81 on a 2-core AMD EPYC, and 7-bit
    weights (`reduce_range`) bring it back to 0.96; with VNNI, full 8 bits keep it above 0.98."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume a current CPU
        return True
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


@contextmanager
def _ignoring_uint8_input_warning(input_name: str) -> Iterator[None]:
    """The quantiser warns that it can't quantise the contract's uint8 image input, which is already integer."""
    expected = f"Inference failed or unsupported type to quantize for tensor {input_name!r}"

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(expected)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _split(paths: list[Path], calibration_images: int, holdout_images: int) -> tuple[list[Path], list[Path]]:
    """A seeded shuffle; a fifth at most is held back so that small folders still calibrate on most images."""
    if calibration_images < 1:
        raise ExportError("--calibration-images must be at least 1")
    shuffled = list(paths)
    np.random.default_rng(SPLIT_SEED).shuffle(shuffled)
    held = min(holdout_images, len(shuffled) // 5)
    return shuffled[held : held + calibration_images], shuffled[:held]


def _quality(fp32: EmbeddingModel, int8: EmbeddingModel, images: np.ndarray) -> dict[str, Any]:
    """Mean and minimum cosine between fp32 and INT8 embeddings, and how many top-10 neighbours agree."""
    reference, candidate = unit_rows(fp32.embed(images)), unit_rows(int8.embed(images))
    cosine = np.sum(reference * candidate, axis=1)
    neighbours = min(NEIGHBOURS, len(images) - 1)
    agreement = None
    if neighbours >= 1:
        expected, found = _top_k(reference, neighbours), _top_k(candidate, neighbours)
        agreement = float(np.mean([len(set(a) & set(b)) / neighbours for a, b in zip(expected, found, strict=True)]))
    return {
        "mean_cosine_fp32_int8": round(float(cosine.mean()), 5),
        "min_cosine_fp32_int8": round(float(cosine.min()), 5),
        "neighbours": neighbours,
        "top_k_agreement": None if agreement is None else round(agreement, 4),
    }


def _top_k(unit_vectors: np.ndarray, k: int) -> np.ndarray:
    """Each image's k nearest others by cosine (itself excluded) among the held-back images."""
    similarity = unit_vectors @ unit_vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]
