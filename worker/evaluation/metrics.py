"""Retrieval quality as pure functions: neighbours by exact cosine, precision@k and mAP@10 per label, recall.

No model, index or file here; `worker.evaluation.run` feeds them, `worker.evaluation.report` shows them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TOP_K = 10
PRECISION_AT = (1, 5, 10)
WORST_SHOWN = 10
MIN_VALUE_QUERIES = 3  # a label value needs this many queries before its precision is worth ranking
EXACT_BLOCK = 1024  # query photos per block of the exact similarity matrix (bounded memory, no all-pairs matrix)


def one_photo_each(count: int) -> np.ndarray:
    """The product starts of vectors that are a product each."""
    return np.arange(count)


def product_similarities(
    queries: np.ndarray, query_starts: np.ndarray, catalogue: np.ndarray, catalogue_starts: np.ndarray
) -> Iterator[tuple[int, np.ndarray]]:
    """The product-by-product cosine matrix a block of query products at a time (about EXACT_BLOCK photos), as
    (first product, block): two products are as similar as their most similar photos. A product's photos are
    consecutive rows; `*_starts` are the rows where each product begins."""
    ends = np.append(query_starts, len(queries))
    first = 0
    while first < len(query_starts):
        last = int(np.searchsorted(ends, ends[first] + EXACT_BLOCK, side="right")) - 1
        last = min(max(last, first + 1), len(query_starts))
        scores = queries[ends[first] : ends[last]] @ catalogue.T
        if len(catalogue_starts) < len(catalogue):  # some product has several photos
            scores = np.maximum.reduceat(scores, catalogue_starts, axis=1)
        if last - first < ends[last] - ends[first]:
            scores = np.maximum.reduceat(scores, query_starts[first:last] - ends[first], axis=0)
        yield first, scores
        first = last


def exact_neighbours(
    queries: np.ndarray,
    catalogue: np.ndarray,
    k: int,
    leave_one_out: bool,
    query_starts: np.ndarray | None = None,
    catalogue_starts: np.ndarray | None = None,
) -> np.ndarray:
    """Positions of the top-`k` catalogue products by cosine for each query product (by default a vector is a
    product); with `leave_one_out`, query i is catalogue product i and never its own neighbour."""
    query_starts = one_photo_each(len(queries)) if query_starts is None else query_starts
    catalogue_starts = one_photo_each(len(catalogue)) if catalogue_starts is None else catalogue_starts
    k = min(k, len(catalogue_starts) - (1 if leave_one_out else 0))
    result = np.empty((len(query_starts), k), dtype=np.int64)
    for start, scores in product_similarities(queries, query_starts, catalogue, catalogue_starts):
        if leave_one_out:
            rows = np.arange(len(scores))
            scores[rows, start + rows] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        result[start : start + len(scores)] = np.take_along_axis(top, order, axis=1)
    return result


@dataclass
class LabelQuality:
    """Retrieval quality for one label column."""

    label: str
    queries: int
    precision: dict[int, float]
    map_at_10: float
    worst: list[dict[str, Any]]  # the label values with the lowest precision@5
    skipped: int  # queries without this label, or whose label no other catalogue item has

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "queries": self.queries,
            **{f"precision@{k}": round(value, 4) for k, value in self.precision.items()},
            "mAP@10": round(self.map_at_10, 4),
            "worst": self.worst,
            "skipped": self.skipped,
        }


def label_quality(
    label: str,
    query_labels: Sequence[Any],
    catalogue_labels: Sequence[Any],
    neighbours: np.ndarray,
    leave_one_out: bool,
) -> LabelQuality:
    """precision@1/5/10 and mAP@10 of `neighbours` (catalogue positions per query) for one label column.

    mAP@10: for each query, the sum of precision@i over the ranks i <= 10 that are right, divided by
    min(10, the number of other catalogue items with the query's label); averaged over queries.
    """
    catalogue = np.array([str(value) if value not in (None, "") else "\0" for value in catalogue_labels])
    counts = Counter(catalogue.tolist())
    kept, right, relevant = [], [], []
    for row, value in enumerate(query_labels):
        value = str(value) if value not in (None, "") else None
        available = counts.get(value, 0) - (1 if leave_one_out else 0) if value is not None else 0
        if available <= 0:
            continue
        kept.append((row, value))
        right.append(catalogue[neighbours[row]] == value)
        relevant.append(available)
    if not kept:
        return LabelQuality(label, 0, dict.fromkeys(PRECISION_AT, 0.0), 0.0, [], len(query_labels))
    hits = np.array(right, dtype=np.float64)
    ranks = np.arange(1, hits.shape[1] + 1)
    precision = {k: float(hits[:, :k].mean()) for k in PRECISION_AT if k <= hits.shape[1]}
    precision_at_rank = np.cumsum(hits, axis=1) / ranks
    depth = min(TOP_K, hits.shape[1])
    average_precision = (precision_at_rank[:, :depth] * hits[:, :depth]).sum(axis=1) / np.minimum(depth, relevant)
    by_value: dict[str, list[float]] = defaultdict(list)
    for (_, value), row_hits in zip(kept, hits, strict=True):
        by_value[value].append(float(row_hits[:5].mean()))
    ranked = sorted(
        ({"value": value, "queries": len(scores), "precision@5": round(float(np.mean(scores)), 4)}
         for value, scores in by_value.items() if len(scores) >= MIN_VALUE_QUERIES),
        key=lambda entry: (entry["precision@5"], entry["value"]),
    )  # fmt: skip
    return LabelQuality(
        label,
        len(kept),
        precision,
        float(average_precision.mean()),
        ranked[:WORST_SHOWN],
        len(query_labels) - len(kept),
    )


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """The mean share of each query's exact neighbours that `found` has too (rows of positions per query)."""
    overlap = [len(set(a) & set(e)) / max(len(e), 1) for a, e in zip(found, exact, strict=True)]
    return float(np.mean(overlap)) if overlap else 0.0
