"""Calibration, for "no close match": how often a neighbour at a given similarity is right, fitted from a labelled
catalogue's own neighbours, and the threshold below which it is more often wrong than right.

`fit_calibration` is pure numpy (a monotone fit: pool-adjacent-violators over bins of equal count), fed by
`lookalike evaluate --calibrate`; a `Calibration` is stored with the serving index (`calibration.json` in its
folder) by the owner, and every index reader uses it to give each hit a `confidence` and each answer a verdict.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UsageError
from common.files import atomic_write_bytes
from worker.evaluation.metrics import EXACT_BLOCK, one_photo_each, product_similarities

FILE = "calibration.json"  # in the index's own folder: it travels with that index (a switch, a rollback)
FORMAT = "lookalike-calibration/1"
MIN_VALUE_ITEMS = 50  # a label value with fewer catalogue items uses the overall fit
MIN_QUERIES = 50  # fewer labelled photos fit a threshold of noise (20 pairs each: 1,000 pairs for the 64 bins)
BINS = 64  # the fitted curve has at most this many knots
RANDOM_PAIRS = 10  # per query, catalogue items drawn at random beside its nearest: what far-off similarities mean
RIGHT_MORE_OFTEN = 0.5  # the threshold: where P(right) reaches this
NOTHING_CLOSE = 1.0  # the threshold of a curve that never reaches RIGHT_MORE_OFTEN: only an identical photo is close


@dataclass(frozen=True)
class Curve:
    """P(right | similarity), monotone, as knots to interpolate between; `threshold` is where it reaches 0.5."""

    similarities: list[float]
    probabilities: list[float]
    threshold: float
    pairs: int  # the (query, neighbour) pairs it was fitted on

    def confidence(self, similarity: float) -> float:
        return float(np.interp(similarity, self.similarities, self.probabilities))


def fit_curve(similarities: np.ndarray, right: np.ndarray) -> Curve:
    """A monotone fit of `right` (booleans) against `similarities`: the pairs sorted and put in BINS bins of equal
    count, then pool-adjacent-violators (isotonic regression) over the bins' means, weighted by their counts."""
    order = np.argsort(similarities, kind="stable")
    x, y = np.asarray(similarities, dtype=np.float64)[order], np.asarray(right, dtype=np.float64)[order]
    bins = [part for part in np.array_split(np.arange(len(x)), min(BINS, len(x))) if len(part)]
    blocks: list[list[float]] = []  # [weight, mean similarity, mean right] per pooled block
    for part in bins:
        blocks.append([float(len(part)), float(x[part].mean()), float(y[part].mean())])
        while len(blocks) > 1 and blocks[-2][2] > blocks[-1][2]:  # a violation: pool the two last blocks
            (w1, x1, y1), (w2, x2, y2) = blocks.pop(-2), blocks.pop()
            blocks.append([w1 + w2, (w1 * x1 + w2 * x2) / (w1 + w2), (w1 * y1 + w2 * y2) / (w1 + w2)])
    knots_x = [round(block[1], 6) for block in blocks]
    knots_y = [round(block[2], 6) for block in blocks]
    return Curve(knots_x, knots_y, round(crossing(knots_x, knots_y), 6), len(x))


def crossing(similarities: Sequence[float], probabilities: Sequence[float]) -> float:
    """The least similarity where the (non-decreasing, interpolated) curve reaches RIGHT_MORE_OFTEN."""
    if probabilities[0] >= RIGHT_MORE_OFTEN:
        return -1.0  # right more often than not at every similarity seen, and below (the curve is flat there)
    for number in range(1, len(probabilities)):
        low, high = probabilities[number - 1], probabilities[number]
        if high >= RIGHT_MORE_OFTEN:
            share = (RIGHT_MORE_OFTEN - low) / (high - low)
            return similarities[number - 1] + share * (similarities[number] - similarities[number - 1])
    return NOTHING_CLOSE


@dataclass(frozen=True)
class Calibration:
    """What makes the similarities comparable (the model, resize policy and PCA dimension the fit's vectors had),
    the labels a neighbour must share to be right, and the fits: overall, and per value of the first label."""

    model_sha256: str
    resize: str
    pca: int  # the dimension the vectors were reduced to; 0: none
    labels: list[str]
    overall: Curve
    values: dict[str, Curve] = field(default_factory=dict)
    items: int = 0  # the catalogue items whose neighbours were fitted
    no_close_match: float = 0.0  # the share of those items whose best neighbour is below its threshold

    def curve_for(self, metadata: dict[str, Any]) -> Curve:
        """The fit for a hit's value of the first label when there is one, else the overall fit."""
        return self.values.get(str(metadata.get(self.labels[0])), self.overall)

    def annotate(self, hits: list[dict[str, Any]]) -> dict[str, Any]:
        """Give each hit its `confidence` (in place); the verdict on the answer: whether the best hit is a close
        match, and the threshold that said so."""
        for hit in hits:
            hit["confidence"] = round(self.curve_for(hit.get("metadata") or {}).confidence(hit["score"]), 4)
        if not hits:
            return {"close_match": False, "threshold": self.overall.threshold}
        threshold = self.curve_for(hits[0].get("metadata") or {}).threshold
        return {"close_match": hits[0]["score"] >= threshold, "threshold": threshold}

    def mismatch(self, model_sha256: str, resize: str, pca: int) -> str | None:
        """Why this calibration does not fit an index of that model, resize policy and PCA dimension, or None."""
        fitted = (self.model_sha256, self.resize, self.pca)
        if fitted == (model_sha256, resize, pca):
            return None
        return (
            f"the calibration was fitted with model {self.model_sha256[:12]} / resize {self.resize} / PCA "
            f"{self.pca or 'none'}, but the serving index holds model {model_sha256[:12]} / resize {resize} / PCA "
            f"{pca or 'none'}; run `lookalike evaluate --calibrate` with the serving index's model and settings"
        )

    def summary(self) -> dict[str, Any]:
        """What /healthz and `lookalike evaluate` show: the labels, the thresholds, the catalogue's share below."""
        return {
            "labels": self.labels,
            "threshold": self.overall.threshold,
            "values": {value: curve.threshold for value, curve in sorted(self.values.items())},
            "items": self.items,
            "no_close_match": self.no_close_match,
        }

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        """A calibration as `as_dict` wrote it; ValueError when it is not one."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"not a calibration ({FORMAT})")
        try:
            return cls(
                str(raw["model_sha256"]),
                str(raw["resize"]),
                int(raw["pca"]),
                [str(label) for label in raw["labels"]],
                Curve(**raw["overall"]),
                {str(value): Curve(**curve) for value, curve in raw.get("values", {}).items()},
                int(raw.get("items", 0)),
                float(raw.get("no_close_match", 0.0)),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"a damaged calibration: {error}") from None


def fit_calibration(
    labels: Sequence[str],
    query_metadata: Sequence[dict[str, Any]],
    catalogue_metadata: Sequence[dict[str, Any]],
    neighbours: np.ndarray,
    similarities: np.ndarray,
    identity: tuple[str, str, int],
) -> Calibration:
    """Fit from each query's `neighbours` (catalogue positions, best first) and their `similarities`: a neighbour is
    right when it shares the query's value of every label. A query without a value of each label is left out.
    Per value of the first label (the neighbour's, which is what a hit shows) when the catalogue has at least
    MIN_VALUE_ITEMS items with it and both right and wrong neighbours. `identity`: the model sha256, resize policy
    and PCA dimension of the vectors. UsageError when every neighbour is right, or none is: no threshold to find."""
    if not labels:
        raise ValueError("a calibration needs at least one label")
    catalogue = [values_of(labels, metadata) for metadata in catalogue_metadata]
    kept = [row for row, metadata in enumerate(query_metadata) if values_of(labels, metadata) is not None]
    right = np.array([[catalogue[position] == values_of(labels, query_metadata[row]) for position in neighbours[row]]
                      for row in kept], dtype=bool)  # fmt: skip
    what = " and ".join(labels)
    pairs = f"{right.size:,} neighbours (nearest and drawn at random) of the {len(kept):,} queries"
    if not right.any():
        raise UsageError(f"none of the {pairs} shares their {what}: with no right neighbour there is no threshold "
                         f"to find; a calibration needs more items of each {what}")  # fmt: skip
    if right.all():
        raise UsageError(f"every one of the {pairs} shares their {what}: with no wrong neighbour there is no "
                         f"threshold to find; a calibration needs items of more than one {what}")  # fmt: skip
    scores = np.asarray(similarities, dtype=np.float64)[np.array(kept)]
    first_value = np.array([[str(catalogue_metadata[position].get(labels[0])) for position in neighbours[row]]
                            for row in kept])  # fmt: skip
    overall = fit_curve(scores.ravel(), right.ravel())
    counts = Counter(str(metadata.get(labels[0])) for metadata in catalogue_metadata if values_of(labels, metadata))
    per_value = {}
    for value, count in counts.items():
        chosen = first_value == value
        # a value no query met, or met only right or only wrong, has no threshold of its own: the overall one serves
        if count >= MIN_VALUE_ITEMS and right[chosen].any() and not right[chosen].all():
            per_value[value] = fit_curve(scores[chosen], right[chosen])
    model_sha256, resize, pca = identity
    calibration = Calibration(model_sha256, resize, pca, list(labels), overall, per_value, len(kept))
    best_below = [
        scores[number, 0] < calibration.curve_for(catalogue_metadata[neighbours[row][0]]).threshold
        for number, row in enumerate(kept)
    ]
    return replace(calibration, no_close_match=round(float(np.mean(best_below)), 4))


def values_of(labels: Sequence[str], metadata: dict[str, Any]) -> tuple[str, ...] | None:
    """An item's values of `labels`, or None when it lacks one."""
    found = tuple(str(metadata.get(label, "")) for label in labels)
    return None if "" in found or "None" in found else found


def require_queries(
    labels: Sequence[str], query_metadata: Sequence[dict[str, Any]], catalogue_items: int, leave_one_out: bool
) -> None:
    """UsageError unless MIN_QUERIES queries have a value of every label and a catalogue item to be compared with."""
    compared = catalogue_items > (1 if leave_one_out else 0)
    labelled = sum(values_of(labels, metadata) is not None for metadata in query_metadata) if compared else 0
    if labelled >= MIN_QUERIES:
        return
    if not compared:
        found = f"the catalogue has {catalogue_items} item{'' if catalogue_items == 1 else 's'}"
    elif leave_one_out:
        found = f"{labelled:,} of the catalogue's {catalogue_items:,} items have a value"
    else:
        found = f"{labelled:,} of the {len(query_metadata):,} queries have a value"
    remedy = "give more labelled queries" if compared and not leave_one_out else "load more labelled items"
    raise UsageError(f"a calibration needs at least {MIN_QUERIES} queries with a value of {' and '.join(labels)} and "
                     f"a neighbour ({found}): {remedy}")  # fmt: skip


def with_random_pairs(neighbours: np.ndarray, catalogue_size: int, leave_one_out: bool, seed: int = 0) -> np.ndarray:
    """Each query's neighbours followed by RANDOM_PAIRS catalogue positions drawn at random (never the query itself
    when it is a catalogue item). Nearest neighbours alone say nothing of similarities below theirs, where a photo of
    something the catalogue lacks lands: the random pairs show how rarely a neighbour that far off is right."""
    drawn = np.random.default_rng(seed).integers(0, catalogue_size, size=(len(neighbours), RANDOM_PAIRS))
    if leave_one_out and catalogue_size > 1:
        rows = np.arange(len(neighbours))[:, None]
        drawn = np.where(drawn == rows, (drawn + 1) % catalogue_size, drawn)
    return np.hstack([neighbours, drawn])


def neighbour_similarities(
    queries: np.ndarray,
    catalogue: np.ndarray,
    neighbours: np.ndarray,
    query_starts: np.ndarray | None = None,
    catalogue_starts: np.ndarray | None = None,
) -> np.ndarray:
    """The cosine of each query product with each of its neighbours (products: as similar as their most similar
    photos; by default a vector is a product), a block of queries at a time."""
    query_starts = one_photo_each(len(queries)) if query_starts is None else query_starts
    catalogue_starts = one_photo_each(len(catalogue)) if catalogue_starts is None else catalogue_starts
    result = np.empty(neighbours.shape, dtype=np.float32)
    if len(query_starts) == len(queries) and len(catalogue_starts) == len(catalogue):  # a photo each: no matrix
        for start in range(0, len(queries), EXACT_BLOCK):
            block = neighbours[start : start + EXACT_BLOCK]
            result[start : start + len(block)] = np.einsum("qd,qkd->qk", queries[start : start + len(block)],
                                                           catalogue[block])  # fmt: skip
        return result
    for start, scores in product_similarities(queries, query_starts, catalogue, catalogue_starts):
        result[start : start + len(scores)] = np.take_along_axis(scores, neighbours[start : start + len(scores)], 1)
    return result


def read_calibration(folder: Path) -> Calibration | None:
    """The calibration stored with the index in `folder`, or None where it has none (ValueError: a damaged one)."""
    try:
        raw = json.loads((folder / FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder / FILE} can't be read: {error}") from None
    return Calibration.from_dict(raw)


def write_calibration(folder: Path, calibration: Calibration) -> None:
    """Store a calibration with the index in `folder`, durably (the whole file, or the one it replaces)."""
    atomic_write_bytes(folder / FILE, json.dumps(calibration.as_dict(), indent=1).encode())
