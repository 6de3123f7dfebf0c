"""How a projection head is trained and what its card says of it (no TensorFlow here: `tune --help` needs none)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

HEAD_KINDS = ("linear", "mlp")


@dataclass(frozen=True)
class TrainingSettings:
    """How the head is trained; the card records all of it."""

    head: str = "mlp"  # "linear": one map; "mlp": the same map plus a hidden layer's correction added to it
    dim: int = 256
    hidden: int = 1024  # the MLP's hidden units (the linear head has none)
    dropout: float = 0.3  # on the MLP's hidden layer, while training
    epochs: int = 20
    batch: int = 256
    learning_rate: float = 1e-3
    scale: float = 30.0  # the cosine classifiers' logit scale (softmax temperature 1/scale)
    margin: float = 0.35  # subtracted from the cosine of an item's own class while training (CosFace)
    seed: int = 0


def training_fields(settings: TrainingSettings, labels: Sequence[str], weights: Mapping[str, float]) -> dict[str, Any]:
    """What the card says about the head and how it was trained."""
    head: dict[str, Any] = {"kind": settings.head, "input": "unit backbone embedding", "output": "unit vector",
                            "dim": settings.dim}  # fmt: skip
    training = asdict(settings)
    if settings.head == "mlp":
        head["hidden"] = settings.hidden
    else:
        del training["hidden"], training["dropout"]
    return {
        "head": head,
        "training": {**training, "loss": "additive-margin cosine softmax per label, weighted sum"},
        "labels": [{"label": label, "weight": weights[label]} for label in labels],
    }
