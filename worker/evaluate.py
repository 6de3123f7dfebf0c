"""Retrieval quality on a labelled catalogue, measured through the service's own code.

The catalogue is read as a load reads it (`plan_catalog`), embedded as the embed workers embed (`embed_items`:
same decoding, resize policy and model) and searched in the same `VectorIndex`; a neighbour is right when it
shares the query's label (articleType, subCategory, ...). Kept apart from serving: nothing here runs in a worker.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.model import EmbeddingModel
from common.settings import Settings
from common.vectors import decode_vector, unit_rows
from worker.catalog import plan_catalog
from worker.embedding import embed_items
from worker.index import IndexParams, Item, VectorIndex
from worker.projection import Projection

TOP_K = 10
PRECISION_AT = (1, 5, 10)
WORST_SHOWN = 10
MIN_VALUE_QUERIES = 3  # a label value needs this many queries before its precision is worth ranking
EXACT_BLOCK = 1024  # queries per block of the exact similarity matrix (bounded memory, no all-pairs matrix)


@dataclass
class Embeddings:
    """A catalogue's items as the index would hold them: ids, unit vectors, metadata; and what failed."""

    ids: list[str]
    vectors: np.ndarray
    metadata: list[dict[str, Any]]
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: float = 0.0


def embed_catalog(
    settings: Settings,
    model: EmbeddingModel,
    source: str | Path,
    metadata_csv: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Embeddings:
    """Plan and embed a catalogue in batches of `settings.batch`, exactly as a load does."""
    started = time.perf_counter()
    plan = plan_catalog(settings, str(source), str(metadata_csv) if metadata_csv else None)
    ids, vectors, metadata = [], [], []
    errors = dict(plan.errors)
    messages = [item.as_message() for item in plan.items]
    for start in range(0, len(messages), settings.batch):
        outcome = embed_items(messages[start : start + settings.batch], model, settings, known={})
        errors |= outcome.errors
        for change in outcome.changes:
            ids.append(change["id"])
            vectors.append(decode_vector(change["vector"]))
            metadata.append(change["metadata"])
        if progress:
            progress(min(start + settings.batch, len(messages)), len(messages))
    matrix = np.vstack(vectors) if vectors else np.zeros((0, model.contract.dimension), np.float32)
    return Embeddings(ids, unit_rows(matrix), metadata, errors, time.perf_counter() - started)


def reduce(embeddings: Embeddings, projection: Projection) -> Embeddings:
    """The embeddings as an index reduced by `projection` holds and queries them (unit length again)."""
    return dataclasses.replace(embeddings, vectors=unit_rows(projection.apply(embeddings.vectors)))


def exact_neighbours(queries: np.ndarray, catalogue: np.ndarray, k: int, leave_one_out: bool) -> np.ndarray:
    """Indices of the top-`k` catalogue vectors by cosine for each query; with `leave_one_out`, query i is
    catalogue item i and never its own neighbour."""
    k = min(k, len(catalogue) - (1 if leave_one_out else 0))
    result = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), EXACT_BLOCK):
        scores = queries[start : start + EXACT_BLOCK] @ catalogue.T
        if leave_one_out:
            rows = np.arange(len(scores))
            scores[rows, start + rows] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
        result[start : start + len(scores)] = np.take_along_axis(top, order, axis=1)
    return result


def index_mebibytes(index: VectorIndex) -> float:
    """What the index takes on disk, which is what it takes in memory (hnswlib saves its arrays as they are)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vectors.hnsw"
        index.save_vectors(path)
        return path.stat().st_size / 2**20


def build_index(embeddings: Embeddings, params: IndexParams) -> VectorIndex:
    index = VectorIndex(params)
    for item_id, vector, metadata in zip(embeddings.ids, embeddings.vectors, embeddings.metadata, strict=True):
        index.upsert(item_id, vector, Item(label=-1, metadata=metadata))
    return index


def ann_neighbours(
    index: VectorIndex, queries: np.ndarray, query_ids: Sequence[str] | None, positions: dict[str, int], k: int
) -> np.ndarray:
    """The index's top-`k` for each query as catalogue positions (a query with an id leaves itself out)."""
    rows = []
    for number, vector in enumerate(queries):
        exclude = query_ids[number] if query_ids is not None else None
        rows.append([positions[hit.id] for hit in index.search(vector, k, exclude=exclude)])
    width = min(len(row) for row in rows) if rows else 0
    return np.array([row[:width] for row in rows], dtype=np.int64)


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


@dataclass
class Evaluation:
    """One setting's result: its quality per label, and the index's agreement with exact search."""

    setting: dict[str, Any]
    items: int
    failed: int
    embed_seconds: float
    labels: list[LabelQuality]
    ann: list[dict[str, Any]]  # per ef: recall@10 against exact search and queries per second

    @property
    def name(self) -> str:
        return ", ".join(f"{key} {value}" for key, value in self.setting.items())

    def as_dict(self) -> dict[str, Any]:
        return {
            "setting": self.setting,
            "items": self.items,
            "failed": self.failed,
            "embed_seconds": round(self.embed_seconds, 1),
            "labels": [quality.as_dict() for quality in self.labels],
            "ann": self.ann,
        }


def evaluate(
    catalogue: Embeddings,
    labels: Sequence[str],
    queries: Embeddings | None = None,
    index_params: Sequence[IndexParams] = (),
    setting: dict[str, Any] | None = None,
) -> Evaluation:
    """Leave-one-out over the catalogue (or `queries` against it): quality per label, then each index against exact."""
    leave_one_out = queries is None
    asking = catalogue if queries is None else queries
    exact_started = time.perf_counter()
    exact = exact_neighbours(asking.vectors, catalogue.vectors, TOP_K, leave_one_out)
    exact_rate = len(asking.ids) / max(time.perf_counter() - exact_started, 1e-9)
    qualities = [
        label_quality(
            label,
            [metadata.get(label) for metadata in asking.metadata],
            [metadata.get(label) for metadata in catalogue.metadata],
            exact,
            leave_one_out,
        )
        for label in labels
    ]
    positions = {item_id: number for number, item_id in enumerate(catalogue.ids)}
    vectors_mib = catalogue.vectors.nbytes / 2**20
    ann = [{"index": "exact (numpy)", "recall@10": 1.0, "queries/s": round(exact_rate), "MiB": round(vectors_mib, 1)}]
    built: dict[tuple[int, int], VectorIndex] = {}
    for params in index_params:
        # one graph per (M, ef_construction); ef is a query-time setting of the same graph
        graph = (params.m, params.ef_construction)
        if graph not in built:
            built[graph] = build_index(catalogue, params)
        index = built[graph]
        index.params = params
        started = time.perf_counter()
        found = ann_neighbours(index, asking.vectors, asking.ids if leave_one_out else None, positions, TOP_K)
        rate = len(asking.ids) / max(time.perf_counter() - started, 1e-9)
        overlap = [len(set(a) & set(e)) / max(len(e), 1) for a, e in zip(found, exact, strict=True)]
        name = f"hnswlib M={params.m} ef_construction={params.ef_construction} ef={params.ef}"
        recall = round(float(np.mean(overlap)), 4)
        ann.append(
            {"index": name, "recall@10": recall, "queries/s": round(rate), "MiB": round(index_mebibytes(index), 1)}
        )
    return Evaluation(
        setting or {},
        len(catalogue.ids),
        len(catalogue.errors),
        catalogue.seconds,
        qualities,
        ann,
    )


def markdown(evaluations: Sequence[Evaluation]) -> str:
    """Quality per setting and label, then the index against exact search, as Markdown tables."""
    lines = [
        "| setting | label | queries | P@1 | P@5 | P@10 | mAP@10 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for evaluation in evaluations:
        for quality in evaluation.labels:
            p = quality.precision
            lines.append(
                f"| {evaluation.name} | {quality.label} | {quality.queries:,} | {p.get(1, 0):.3f} | "
                f"{p.get(5, 0):.3f} | {p.get(10, 0):.3f} | {quality.map_at_10:.3f} |"
            )
    lines += ["", "| setting | index | recall@10 | queries/s | MiB |", "| --- | --- | ---: | ---: | ---: |"]
    for evaluation in evaluations:
        lines += [
            f"| {evaluation.name} | {row['index']} | {row['recall@10']:.3f} | {row['queries/s']:,} | "
            f"{row['MiB']:,.1f} |"
            for row in evaluation.ann
        ]
    return "\n".join(lines) + "\n"
