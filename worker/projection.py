"""Optional dimension reduction: a PCA fitted on the catalogue's own unit vectors, applied to every vector after.

2048 float32 dimensions cost 8 KiB per item in the index; 256 cost 1 KiB and make each distance 8x cheaper.
Whether the neighbours stay as good is for `lookalike evaluate --pca` to show on the shop's own catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.vectors import unit_rows


@dataclass(frozen=True)
class Reduction:
    """The configured wish: reduce to `dimension` once the index holds `fit_items` items to fit on."""

    dimension: int
    fit_items: int


@dataclass(frozen=True)
class Projection:
    """A fitted PCA: unit vector -> (vector - mean) @ components."""

    mean: np.ndarray  # (input dimension,)
    components: np.ndarray  # (input dimension, dimension), strongest direction first
    fitted_on: int
    retained_variance: float  # the share of the catalogue's variance the kept directions carry

    @property
    def input_dimension(self) -> int:
        return int(self.components.shape[0])

    @property
    def dimension(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, vectors: np.ndarray, dimension: int) -> Projection:
        """Principal directions of `vectors` (made unit length, as the cosine index sees them)."""
        count, input_dimension = vectors.shape
        if not 0 < dimension < input_dimension or count <= dimension:
            raise ValueError(
                f"a PCA to {dimension} dimensions needs vectors of more than {dimension} dimensions and more than "
                f"{dimension} of them; got {count} x {input_dimension}"
            )
        unit = unit_rows(vectors).astype(np.float64)
        mean = unit.mean(axis=0)
        centred = unit - mean
        variances, directions = np.linalg.eigh(centred.T @ centred)  # ascending; D x D, never N x N
        order = np.argsort(variances)[::-1][:dimension]
        components = directions[:, order]
        # eigh may return either sign of a direction: fix it so that the same catalogue gives the same file
        signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(dimension)])
        components *= np.where(signs == 0, 1.0, signs)
        retained = float(variances[order].sum() / max(float(variances.sum()), 1e-30))
        return cls(mean.astype(np.float32), components.astype(np.float32), count, retained)

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Rows of the input dimension -> rows of the reduced dimension."""
        return (unit_rows(np.asarray(vectors, dtype=np.float32)) - self.mean) @ self.components

    def describe(self) -> dict[str, Any]:
        return {
            "dimension": self.dimension,
            "input_dimension": self.input_dimension,
            "fitted_on": self.fitted_on,
            "retained_variance": round(self.retained_variance, 4),
        }

    def save(self, path: Path) -> None:
        with path.open("wb") as file:
            np.savez(
                file,
                mean=self.mean,
                components=self.components,
                fitted_on=np.int64(self.fitted_on),
                retained_variance=np.float64(self.retained_variance),
            )

    @classmethod
    def load(cls, path: Path) -> Projection:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["mean"], data["components"], int(data["fitted_on"]), float(data["retained_variance"]))
