"""Vector helpers: unit length, as the cosine index sees vectors, and the form vectors travel in between tasks."""

from __future__ import annotations

import base64

import numpy as np

# How a recommendation weighs its examples (worker.index.VectorIndex.recommend); the first is the default.
AVERAGE_VECTOR, BEST_SCORE = "average_vector", "best_score"
STRATEGIES = (AVERAGE_VECTOR, BEST_SCORE)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def encode_vector(vector: np.ndarray) -> str:
    """float32 little-endian, base64: how vectors travel between tasks (JSON only on the broker)."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").copy()
