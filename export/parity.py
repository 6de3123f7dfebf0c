"""The parity check of every export: Keras and the ONNX file must embed the same images the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.errors import ExportError
from export.images import list_images, load_images

PARITY_BOUND = 1e-4
PARITY_IMAGES = 8
PARITY_SEED = 0


def parity_images(
    size: tuple[int, int], sample: Path | None = None, count: int = PARITY_IMAGES
) -> tuple[np.ndarray, str]:
    """`count` images from `sample` (real ones) or seeded random pixels; returns them and where they came from."""
    width, height = size
    if sample is None:
        rng = np.random.default_rng(PARITY_SEED)
        return rng.integers(0, 256, size=(count, height, width, 3), dtype=np.uint8), f"{count} random images"
    images, used = load_images(list_images(sample)[:count], size)
    return images, f"{len(used)} images from {sample}"


def max_relative_difference(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Largest element difference of each embedding, relative to that embedding's largest magnitude.

    Relative to the vector's scale rather than element by element: pooled ReLU features are often exactly
    zero, where an element-wise ratio would be meaningless.
    """
    scale = np.maximum(np.abs(reference).max(axis=1), np.finfo(np.float32).tiny)
    return float((np.abs(reference - candidate).max(axis=1) / scale).max())


def check_parity(reference: np.ndarray, candidate: np.ndarray, bound: float = PARITY_BOUND) -> float:
    """The relative difference of two embeddings of the same images; an ExportError when over `bound`."""
    if reference.shape != candidate.shape:
        raise ExportError(f"parity check failed: Keras gives {reference.shape}, ONNX gives {candidate.shape}")
    difference = max_relative_difference(reference, candidate)
    if not difference <= bound:
        raise ExportError(
            f"parity check failed: ONNX differs from Keras by {difference:.2e} (relative), over the bound {bound:.0e}"
        )
    return difference
