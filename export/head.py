"""How a projection head is trained and what its card says of it (no TensorFlow here: `tune --help` needs none)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TrainingSettings:
    """How the head is trained; the card records all of it."""

    dim: int = 256
    epochs: int = 30
    batch: int = 256
    learning_rate: float = 1e-3
    scale: float = 16.0  # the cosine classifiers' logit scale (softmax temperature 1/scale)
    seed: int = 0


def training_fields(settings: TrainingSettings, labels: Sequence[str], weights: Mapping[str, float]) -> dict[str, Any]:
    """What the card says about the head and how it was trained."""
    return {
        "head": {"kind": "linear", "input": "unit backbone embedding", "output": "unit vector", "dim": settings.dim},
        "training": {**asdict(settings), "loss": "cosine softmax per label, weighted sum"},
        "labels": [{"label": label, "weight": weights[label]} for label in labels],
    }
