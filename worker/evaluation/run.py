"""An evaluation run, through the service's own code: read, embed and index a labelled catalogue, then measure.

The catalogue is read as a load reads it (`plan_catalog`), embedded as the embed workers embed (`embed_items`:
same decoding, resize policy and model) and searched in the same `VectorIndex`; a neighbour is right when it
shares the query's label (articleType, subCategory, ...). Kept apart from serving: nothing here runs in a worker.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import LookalikeError
from common.model import EmbeddingModel, load_model
from common.settings import CORES, Settings
from common.vectors import decode_vector, unit_rows
from worker.catalog import CatalogPlan, batches, plan_catalog
from worker.embedding import embed_items
from worker.evaluation.cache import EmbeddingCache
from worker.evaluation.calibration import (
    Calibration,
    fit_calibration,
    neighbour_similarities,
    require_queries,
    with_random_pairs,
)
from worker.evaluation.labels import require_label
from worker.evaluation.metrics import TOP_K, LabelQuality, exact_neighbours, label_quality, recall
from worker.index import IndexParams, Item, Photo, VectorIndex
from worker.projection import Projection


@dataclass
class Embeddings:
    """A catalogue's photos as the index would hold them, a row each (a product's photos in consecutive rows, each
    with its product's id and metadata): ids, unit vectors, metadata; and what failed."""

    ids: list[str]
    vectors: np.ndarray
    metadata: list[dict[str, Any]]
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: float = 0.0
    embedded: int = 0  # images the model ran on (the rest came from the cache)

    @cached_property
    def starts(self) -> np.ndarray:
        """The row where each product begins."""
        return np.array([row for row, item_id in enumerate(self.ids) if row == 0 or self.ids[row - 1] != item_id],
                        dtype=np.int64)  # fmt: skip

    @property
    def products(self) -> list[str]:
        return [self.ids[row] for row in self.starts]

    @property
    def product_metadata(self) -> list[dict[str, Any]]:
        return [self.metadata[row] for row in self.starts]


@dataclass
class Evaluation:
    """One setting's result: its quality per label, and the index's agreement with exact search."""

    setting: dict[str, Any]
    items: int
    failed: int
    embed_seconds: float
    labels: list[LabelQuality]
    ann: list[dict[str, Any]]  # per index: recall@10 against exact search, queries per second, size
    calibration: Calibration | None = None  # "no close match", when asked for (`--calibrate`)

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
            **({"calibration": self.calibration.summary()} if self.calibration else {}),
        }


@dataclass(frozen=True)
class Plan:
    """What `lookalike evaluate` compares: every model x resize policy x PCA, each index at every M x ef."""

    models: Sequence[Path]
    catalog: Path
    labels: Sequence[str]
    metadata: Path | None = None
    queries: Path | None = None
    resizes: Sequence[str] = ()  # empty: the configured one (and likewise below)
    pca_dims: Sequence[int] = ()
    ms: Sequence[int] = ()
    efs: Sequence[int] = ()
    calibrate: bool = False  # fit "no close match" from the labels too (one model, resize and PCA)


def run_plan(settings: Settings, plan: Plan, say: Callable[[str], None] = print) -> Iterator[Evaluation]:
    """Each setting of `plan`, embedded once per model and resize policy and evaluated at each PCA dimension."""
    catalogue_plan = plan_catalog(settings, str(plan.catalog), str(plan.metadata) if plan.metadata else None)
    queries_plan = plan_catalog(settings, str(plan.queries)) if plan.queries else None
    if plan.calibrate:
        require_calibration_inputs(plan.labels, catalogue_plan, queries_plan)
    for model_path in plan.models:
        model = load_model(model_path, settings.providers, intra_op_threads=CORES)
        for resize in plan.resizes or [settings.resize]:
            configured = dataclasses.replace(settings, resize=resize)
            say(f"{model_path.name}, resize {resize}: embedding {plan.catalog} ...")
            catalogue = embed_plan(configured, model, catalogue_plan)
            if not catalogue.ids:
                raise LookalikeError(f"no image of {plan.catalog} could be embedded")
            queries = embed_plan(configured, model, queries_plan) if queries_plan else None
            for dimension in plan.pca_dims or [settings.pca_dim]:
                setting: dict[str, Any] = {"model": model_path.name, "resize": resize}
                indexed, asked = catalogue, queries
                if dimension:
                    try:
                        projection = Projection.fit(catalogue.vectors, dimension)
                    except ValueError as error:
                        raise LookalikeError(f"--pca {dimension}: {error}") from None
                    indexed = reduce(catalogue, projection)
                    asked = reduce(queries, projection) if queries else None
                    setting["pca"] = f"{dimension} ({projection.retained_variance:.0%} of variance)"
                index_params = [
                    IndexParams(indexed.vectors.shape[1], m, settings.hnsw_ef_construction, ef)
                    for m in plan.ms or [settings.hnsw_m]
                    for ef in plan.efs or [settings.hnsw_ef]
                ]
                identity = (model.sha256, resize, dimension) if plan.calibrate else None
                yield evaluate(indexed, plan.labels, asked, index_params, setting, identity)


def require_calibration_inputs(labels: Sequence[str], catalogue: CatalogPlan, queries: CatalogPlan | None) -> None:
    """UsageError when the planned catalogue and queries can't calibrate `labels`, before anything is embedded."""
    catalogue_metadata = [item.metadata for item in catalogue.items]
    query_metadata = [item.metadata for item in queries.items] if queries else catalogue_metadata
    for label in labels:
        require_label(label, catalogue_metadata, "the catalogue")
        if queries:
            require_label(label, query_metadata, "the queries")
    require_queries(labels, query_metadata, len(catalogue.items), leave_one_out=queries is None)


def embed_catalog(
    settings: Settings,
    model: EmbeddingModel,
    source: str | Path,
    metadata_csv: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    cache: EmbeddingCache | None = None,
) -> Embeddings:
    """Plan and embed a catalogue (`embed_plan`)."""
    plan = plan_catalog(settings, str(source), str(metadata_csv) if metadata_csv else None)
    return embed_plan(settings, model, plan, progress, cache)


def embed_plan(
    settings: Settings,
    model: EmbeddingModel,
    plan: CatalogPlan,
    progress: Callable[[int, int], None] | None = None,
    cache: EmbeddingCache | None = None,
) -> Embeddings:
    """Embed a planned catalogue in batches of about `settings.batch` photos, exactly as a load does; with `cache`,
    only the images it lacks are decoded and embedded, and their vectors are added to it."""
    started = time.perf_counter()
    ids, vectors, metadata = [], [], []
    errors = dict(plan.errors)
    messages = [item.as_message() for item in plan.items]
    # A cached product is `known` with an empty metadata checksum: embed_items then reads and hashes its photos, and
    # when they are the same answers a change without vectors (as for new metadata), which the cache's fill.
    known = {item_id: (photos, "") for item_id, photos in cache.known_photos().items()} if cache else {}
    embedded, read = 0, 0
    for batch in batches(messages, settings.batch):
        outcome = embed_items(batch, model, settings, known=known)
        read += len(batch)
        errors |= outcome.errors
        for change in outcome.changes:
            digests = [photo["sha256"] for photo in change["photos"]]
            if "vectors" in change:
                photo_vectors = [decode_vector(vector) for vector in change["vectors"]]
                embedded += len(photo_vectors)
                if cache is not None:
                    cache.add(change["id"], digests, photo_vectors)
            else:
                photo_vectors = [cache.vector(digest) for digest in digests]
            for vector in photo_vectors:  # a row per photo, each with its product's id and metadata
                ids.append(change["id"])
                vectors.append(vector)
                metadata.append(change["metadata"])
        if progress:
            progress(read, len(messages))
    if cache is not None:
        cache.save()
    matrix = np.vstack(vectors) if vectors else np.zeros((0, model.contract.dimension), np.float32)
    return Embeddings(ids, unit_rows(matrix), metadata, errors, time.perf_counter() - started, embedded)


def reduce(embeddings: Embeddings, projection: Projection) -> Embeddings:
    """The embeddings as an index reduced by `projection` holds and queries them (unit length again)."""
    return dataclasses.replace(embeddings, vectors=unit_rows(projection.apply(embeddings.vectors)))


def build_index(embeddings: Embeddings, params: IndexParams) -> VectorIndex:
    """One product at a time, as a load builds the service's index."""
    index = VectorIndex(params)
    for first, last in product_rows(embeddings):
        photos = [Photo(None) for _ in range(first, last)]
        index.upsert(embeddings.ids[first], embeddings.vectors[first:last], Item(embeddings.metadata[first], photos))
    return index


def product_rows(embeddings: Embeddings) -> list[tuple[int, int]]:
    """Each product's rows, as (first, past the last)."""
    starts = embeddings.starts.tolist()
    return list(zip(starts, [*starts[1:], len(embeddings.ids)], strict=True))


def index_mebibytes(index: VectorIndex) -> float:
    """What the index takes on disk, which is what it takes in memory (hnswlib saves its arrays as they are)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vectors.hnsw"
        index.save_vectors(path)
        return path.stat().st_size / 2**20


def ann_neighbours(
    index: VectorIndex, queries: Embeddings, leave_one_out: bool, positions: dict[str, int], k: int
) -> np.ndarray:
    """The index's top-`k` products for each query product (searched with all its photos) as catalogue positions;
    `leave_one_out`: a query is a catalogue product, which leaves itself out."""
    rows = []
    for first, last in product_rows(queries):
        exclude = (queries.ids[first],) if leave_one_out else ()
        rows.append([positions[hit.id] for hit in index.search(queries.vectors[first:last], k, exclude=exclude)])
    width = min(len(row) for row in rows) if rows else 0
    return np.array([row[:width] for row in rows], dtype=np.int64)


def evaluate(
    catalogue: Embeddings,
    labels: Sequence[str],
    queries: Embeddings | None = None,
    index_params: Sequence[IndexParams] = (),
    setting: dict[str, Any] | None = None,
    calibrate_for: tuple[str, str, int] | None = None,
) -> Evaluation:
    """Leave-one-out over the catalogue (or `queries` against it): quality per label, then each index against exact;
    with `calibrate_for` (the vectors' model sha256, resize policy and PCA dimension), "no close match" is fitted
    from the same neighbours."""
    leave_one_out = queries is None
    asking = catalogue if queries is None else queries
    exact_started = time.perf_counter()
    asking_starts, catalogue_starts = asking.starts, catalogue.starts
    exact = exact_neighbours(asking.vectors, catalogue.vectors, TOP_K, leave_one_out, asking_starts, catalogue_starts)
    exact_rate = len(asking_starts) / max(time.perf_counter() - exact_started, 1e-9)
    asking_metadata, catalogue_metadata = asking.product_metadata, catalogue.product_metadata
    qualities = [
        label_quality(
            label,
            [metadata.get(label) for metadata in asking_metadata],
            [metadata.get(label) for metadata in catalogue_metadata],
            exact,
            leave_one_out,
        )
        for label in labels
    ]
    positions = {item_id: number for number, item_id in enumerate(catalogue.products)}
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
        found = ann_neighbours(index, asking, leave_one_out, positions, TOP_K)
        rate = len(asking_starts) / max(time.perf_counter() - started, 1e-9)
        name = f"hnswlib M={params.m} ef_construction={params.ef_construction} ef={params.ef}"
        ann.append(
            {
                "index": name,
                "recall@10": round(recall(found, exact), 4),
                "queries/s": round(rate),
                "MiB": round(index_mebibytes(index), 1),
            }
        )
    calibration = None
    if calibrate_for is not None:
        pairs = with_random_pairs(exact, len(catalogue_starts), leave_one_out)
        similarities = neighbour_similarities(asking.vectors, catalogue.vectors, pairs, asking_starts, catalogue_starts)
        calibration = fit_calibration(labels, asking_metadata, catalogue_metadata, pairs, similarities, calibrate_for)
    return Evaluation(
        setting or {}, len(catalogue_starts), len(catalogue.errors), catalogue.seconds, qualities, ann, calibration
    )
