"""The in-memory catalogue index: products, each with its metadata and its photos' hnswlib cosine vectors.

Not thread-safe and not durable by itself: exactly one process owns it (see `worker.store`).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from common.errors import LookalikeError
from common.filters import unknown_field
from common.vectors import AVERAGE_VECTOR, BEST_SCORE, unit_rows

INITIAL_CAPACITY = 1024
EXACT_FILTER_LIMIT = 2048  # a filter that leaves fewer photos than this is answered by exact search
EXACT_CHUNK = 4096  # photos whose vectors an exact search holds at once
POSTED_FIELDS = 8  # fields with a lookup table (the most recently filtered by); each costs a set per photo
BEST_SCORE_CANDIDATES = 2  # x k: the products near the positives that best_score rescores against the negatives


@dataclass(frozen=True)
class IndexParams:
    """hnswlib's build and query parameters; kept with the index (M and ef_construction can't change later)."""

    dim: int
    m: int = 16
    ef_construction: int = 100
    ef: int = 128


@dataclass
class Photo:
    """One photo of a product: its image's sha256, where it is (`area/path`), and its vector's hnswlib label."""

    sha256: str | None
    image: str | None = None
    label: int = -1

    def as_list(self) -> list[Any]:
        return [self.sha256, self.image]


@dataclass
class Item:
    """One catalogue product as the index keeps it: its metadata and its photos, main photo first."""

    metadata: dict[str, Any]
    photos: list[Photo] = field(default_factory=list)
    metadata_sha256: str | None = None

    @property
    def labels(self) -> list[int]:
        return [photo.label for photo in self.photos]

    @property
    def photo_digests(self) -> str:
        """Every photo's sha256, in order: two items with the same have the same photos."""
        return photos_checksum(photo.sha256 for photo in self.photos)

    @property
    def checksum(self) -> str:
        """What a load compares to skip an unchanged product: its photos' sha256 and its metadata's."""
        return f"{self.photo_digests}:{self.metadata_sha256}"


def photos_checksum(digests: Iterable[str | None]) -> str:
    return ",".join(str(digest) for digest in digests)


class UnknownField(LookalikeError):
    """A filter names a metadata field no item has."""


@dataclass
class Hit:
    """A product found: its best photo's score, and which of its photos that is."""

    id: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    photo: int = 0  # the matched photo's place among the product's photos
    photos: list[str | None] = field(default_factory=list)  # each photo's image reference, main photo first

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": round(self.score, 6), "metadata": self.metadata, "photo": self.photo,
                "photos": self.photos}  # fmt: skip


class VectorIndex:
    """Upsert, delete, get and search catalogue products by the cosine similarity of their best photo."""

    def __init__(self, params: IndexParams, hnsw: hnswlib.Index | None = None) -> None:
        self.params = params
        self.items: dict[str, Item] = {}
        self.ids_by_label: dict[int, str] = {}  # each photo's label -> its product's id
        self.next_label = 0
        self.field_counts: Counter[str] = Counter()  # items that have each metadata field
        self._postings: OrderedDict[str, dict[str, set[int]]] = OrderedDict()
        if hnsw is None:
            hnsw = hnswlib.Index(space="cosine", dim=params.dim)
            hnsw.init_index(
                max_elements=INITIAL_CAPACITY,
                M=params.m,
                ef_construction=params.ef_construction,
                allow_replace_deleted=True,
            )
        hnsw.set_ef(params.ef)
        hnsw.set_num_threads(1)  # one owner process; searches come one at a time
        self.hnsw = hnsw

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.items

    @property
    def photo_count(self) -> int:
        return len(self.ids_by_label)

    def upsert(self, item_id: str, vectors: np.ndarray | None, item: Item) -> None:
        """Insert `item_id` or replace its set of photos; `vectors` (a row per photo of `item`) may be None when
        only the metadata changes (the photos are then the ones it has: moved files take their new places). A photo
        the product already has (same sha256) keeps its vector; a photo it no longer has is removed."""
        existing = self.items.get(item_id)
        if vectors is None:
            if existing is None:
                raise KeyError(f"item {item_id!r} has no vector yet")
            if item.photo_digests == existing.photo_digests:
                for photo, same in zip(item.photos, existing.photos, strict=True):
                    photo.label = same.label
            else:  # a change made for other photos than the product's: it keeps its own
                item.photos = existing.photos
            self._index_metadata(existing, add=False)
        else:
            rows = np.asarray(vectors, dtype=np.float32).reshape(len(item.photos), self.params.dim)
            if existing is not None:
                self._index_metadata(existing, add=False)
            self._replace_photos(item_id, item, rows, existing.photos if existing is not None else [])
        self.items[item_id] = item
        self._index_metadata(item, add=True)

    def _replace_photos(self, item_id: str, item: Item, rows: np.ndarray, had: list[Photo]) -> None:
        """Give `item`'s photos labels: a photo it `had` keeps its label (and vector), a new one gets a new label and
        its row; the photos it no longer has are marked deleted."""
        kept: dict[str | None, list[Photo]] = {}
        for photo in had:
            kept.setdefault(photo.sha256, []).append(photo)
        fresh = []
        for photo, row in zip(item.photos, rows, strict=True):
            same = kept.get(photo.sha256)
            if same:
                photo.label = same.pop(0).label
            else:
                fresh.append((photo, row))
        for photo in (photo for left in kept.values() for photo in left):
            self.hnsw.mark_deleted(photo.label)  # the slot is reused by the next new photo
            del self.ids_by_label[photo.label]
        if fresh:
            self._reserve(len(fresh))
            for photo, _ in fresh:
                photo.label = self.next_label
                self.next_label += 1
                self.ids_by_label[photo.label] = item_id
            self.hnsw.add_items(np.stack([row for _, row in fresh]), [photo.label for photo, _ in fresh],
                                replace_deleted=True)  # fmt: skip

    def delete(self, item_id: str) -> bool:
        item = self.items.pop(item_id, None)
        if item is None:
            return False
        for label in item.labels:
            self.hnsw.mark_deleted(label)  # the slot is reused by the next new photo
            del self.ids_by_label[label]
        self._index_metadata(item, add=False)
        return True

    def vectors(self, item_id: str) -> np.ndarray:
        """The stored (unit-length) vectors of a product's photos, a row each, main photo first."""
        return np.asarray(self.hnsw.get_items(self.items[item_id].labels), dtype=np.float32)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        filters: Mapping[str, str] | None = None,
        exclude: Collection[str] = (),
    ) -> list[Hit]:
        """The `k` products whose best photo is most similar to any of the query vectors (one, or a row each),
        each once, none of the `exclude` ones; optionally only products whose metadata equals every filter (of
        fields the catalogue has: else UnknownField). Photos are asked for until `k` products are found or none are
        left, so a product with many near-identical photos can't crowd the others out."""
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.params.dim)
        allowed = self._matching_labels(filters) if filters else None
        exclude = set(exclude)
        excluded = {label for item_id in exclude if item_id in self.items for label in self.items[item_id].labels}
        if allowed is not None:
            allowed -= excluded
        pool = self.photo_count if allowed is None else len(allowed)  # photos a query may return
        if k == 0 or pool - (len(excluded) if allowed is None else 0) <= 0 or len(queries) == 0:
            return []
        per_product = -(-self.photo_count // len(self.items))  # the first ask expects this many photos a product
        count = min(k * per_product + (len(excluded) if allowed is None else 0), pool)
        while True:
            best = self._best_per_product(queries, count, allowed, exclude)
            if min(best.found_per_query) >= k or count == pool:
                break
            count = min(2 * count, pool)
        ranked = sorted(best.hits.values(), key=lambda hit: (-hit.score, hit.id))
        return ranked[:k]

    def _best_per_product(
        self, queries: np.ndarray, count: int, allowed: set[int] | None, exclude: set[str]
    ) -> _Products:
        """Each product's best photo among the `count` nearest photos of each query."""
        if allowed is None:
            labels, distances = self._query(queries, count)
        else:
            labels, distances = self._filtered_query(queries, count, allowed)
        products = _Products()
        for row_labels, row_distances in zip(labels, distances, strict=True):
            found = set()
            for label, distance in zip(row_labels, row_distances, strict=True):
                item_id = self.ids_by_label[int(label)]
                if item_id in exclude:
                    continue
                found.add(item_id)
                score = 1.0 - float(distance)
                hit = products.hits.get(item_id)
                if hit is None or score > hit.score:
                    item = self.items[item_id]
                    products.hits[item_id] = Hit(item_id, score, item.metadata, item.labels.index(int(label)),
                                                 [photo.image for photo in item.photos])  # fmt: skip
            products.found_per_query.append(len(found))
        return products

    def _query(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        self.hnsw.set_ef(max(self.params.ef, count))
        try:
            return self.hnsw.knn_query(queries, k=count)
        except RuntimeError:  # fewer than `count` reachable within the beam: asked for (nearly) every photo
            return self.exact_query(queries, count, np.fromiter(self.ids_by_label, dtype=np.uint64))

    def _filtered_query(self, queries: np.ndarray, count: int, allowed: set[int]) -> tuple[np.ndarray, np.ndarray]:
        """hnswlib's filtered search, or exact search over the allowed photos when the filter is selective."""
        if len(allowed) > max(EXACT_FILTER_LIMIT, 4 * count):
            try:
                self.hnsw.set_ef(max(self.params.ef, count))
                return self.hnsw.knn_query(queries, k=count, filter=lambda label: label in allowed)
            except RuntimeError:  # hnswlib found fewer than `count` matches within its beam
                pass
        return self.exact_query(queries, count, np.fromiter(allowed, dtype=np.uint64, count=len(allowed)))

    def recommend(
        self,
        positives: list[np.ndarray],
        negatives: list[np.ndarray],
        k: int,
        filters: Mapping[str, str] | None = None,
        exclude: Collection[str] = (),
        strategy: str = AVERAGE_VECTOR,
    ) -> list[Hit]:
        """The `k` products most like the positive examples and least like the negative ones (each example a row of
        a vector, or a product's photos as rows), none of `exclude`. AVERAGE_VECTOR searches once, for the positives'
        mean moved away from the negatives' (Qdrant's and Marqo's default); BEST_SCORE scores each candidate by its
        best similarity to any positive, or minus its best to a negative when that is higher, so results may be
        like any one of several different positives."""
        if strategy == AVERAGE_VECTOR:
            query = _centre(positives)
            if negatives:
                query = query + (query - _centre(negatives))
            return self.search(query, k, filters, exclude)
        if strategy != BEST_SCORE:
            raise ValueError(f"no recommendation strategy {strategy!r}")
        liked, disliked = unit_rows(np.vstack(positives)), unit_rows(np.vstack(negatives)) if negatives else None
        # Candidates near each positive's centre: one row an example, however many photos it has (16 x 16 rows
        # would make one recommendation cost the reader as much as hundreds of searches); scored by every photo.
        centres = np.stack([_centre([example]) for example in positives])
        candidates = self.search(centres, BEST_SCORE_CANDIDATES * k, filters, exclude)
        scored = []
        for hit in candidates:
            photos = self.vectors(hit.id)
            likeness = photos @ liked.T  # a row per photo of the candidate, a column per positive
            score, photo = float(likeness.max()), int(likeness.max(axis=1).argmax())
            unlikeness = float((photos @ disliked.T).max()) if disliked is not None else -np.inf
            scored.append(Hit(hit.id, score if score > unlikeness else -unlikeness, hit.metadata, photo, hit.photos))
        return sorted(scored, key=lambda hit: (-hit.score, hit.id))[:k]

    def exact_query(self, queries: np.ndarray, count: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The `count` nearest of `labels` to each query by brute force, in chunks of EXACT_CHUNK vectors."""
        units = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        best_labels = np.empty((len(queries), 0), dtype=np.uint64)
        best_distances = np.empty((len(queries), 0), dtype=np.float32)
        for start in range(0, len(labels), EXACT_CHUNK):  # bounded memory: a chunk of vectors at a time
            chunk = labels[start : start + EXACT_CHUNK]
            vectors = np.asarray(self.hnsw.get_items(chunk), dtype=np.float32)
            candidates = np.concatenate([best_labels, np.broadcast_to(chunk, (len(queries), len(chunk)))], axis=1)
            distances = np.concatenate([best_distances, 1.0 - units @ vectors.T], axis=1)
            order = np.argsort(distances, axis=1, kind="stable")[:, :count]
            best_labels = np.take_along_axis(candidates, order, axis=1)
            best_distances = np.take_along_axis(distances, order, axis=1)
        return best_labels, best_distances

    def fields(self) -> list[str]:
        """The metadata fields items have, the ones a filter may name."""
        return sorted(self.field_counts)

    def _matching_labels(self, filters: Mapping[str, str]) -> set[int]:
        """Labels of the photos of products whose metadata equals every filter, from per-field postings built on
        a field's first use."""
        problem = unknown_field(filters, self.field_counts)
        if problem:
            raise UnknownField(problem)
        matches: set[int] | None = None
        for name, value in filters.items():
            labels = self._posted(name).get(str(value), set())
            matches = set(labels) if matches is None else matches & labels
        return matches or set()

    def _posted(self, name: str) -> dict[str, set[int]]:
        """The lookup table of one field, built on its first use; only the last POSTED_FIELDS fields keep one."""
        if name in self._postings:
            self._postings.move_to_end(name)
            return self._postings[name]
        postings: dict[str, set[int]] = {}
        for item in self.items.values():
            postings.setdefault(str(item.metadata.get(name)), set()).update(item.labels)
        self._postings[name] = postings
        if len(self._postings) > POSTED_FIELDS:
            self._postings.popitem(last=False)
        return postings

    def _index_metadata(self, item: Item, add: bool) -> None:
        for name in item.metadata:
            self.field_counts[name] += 1 if add else -1
            if not self.field_counts[name]:
                del self.field_counts[name]
        for name, postings in self._postings.items():
            labels = postings.setdefault(str(item.metadata.get(name)), set())
            if add:
                labels.update(item.labels)
            else:
                labels.difference_update(item.labels)

    def facets(self, max_values: int) -> dict[str, list[str]]:
        """Metadata fields with 2..`max_values` distinct values (gender, category, ...), values most common first."""
        counts: dict[str, Counter[str]] = {}
        # list() copies in one step under the GIL: the heartbeat thread calls this while the owner writes.
        for item in list(self.items.values()):
            for name, value in item.metadata.items():
                values = counts.setdefault(name, Counter())
                if len(values) <= max_values:
                    values[str(value)] += 1
        return {
            name: [value for value, _ in values.most_common()]
            for name, values in sorted(counts.items())
            if 2 <= len(values) <= max_values
        }

    def _reserve(self, extra: int) -> None:
        """Grow capacity geometrically before hnswlib runs out (`resize_index` is safe only with no reader)."""
        needed = self.hnsw.element_count + extra
        capacity = self.hnsw.get_max_elements()
        if needed > capacity:
            self.hnsw.resize_index(max(needed, capacity * 2))

    def stats(self) -> dict[str, Any]:
        return {
            "items": len(self.items),
            "photos": self.photo_count,
            "dimension": self.params.dim,
            "capacity": self.hnsw.get_max_elements(),
            "deleted_slots": self.hnsw.element_count - self.photo_count,
            "M": self.params.m,
            "ef_construction": self.params.ef_construction,
            "ef": self.params.ef,
        }

    def save_vectors(self, path: Path) -> None:
        self.hnsw.save_index(str(path))

    def stored_vectors(self) -> tuple[list[str], np.ndarray]:
        """Every photo's vector as stored, a row each (products in order, their photos in order), with its
        product's id."""
        labels = [label for item in self.items.values() for label in item.labels]
        ids = [item_id for item_id, item in self.items.items() for _ in item.photos]
        if not labels:
            return ids, np.zeros((0, self.params.dim), dtype=np.float32)
        return ids, np.asarray(self.hnsw.get_items(labels), dtype=np.float32)

    @classmethod
    def build(cls, params: IndexParams, entries: list[tuple[str, Item]], vectors: np.ndarray) -> VectorIndex:
        """A new index of `entries` and their photos' `vectors` (a row per photo, in the same order), built in one
        call on every core."""
        photos = [photo for _, item in entries for photo in item.photos]
        hnsw = hnswlib.Index(space="cosine", dim=params.dim)
        hnsw.init_index(
            max_elements=max(INITIAL_CAPACITY, len(photos)),
            M=params.m,
            ef_construction=params.ef_construction,
            allow_replace_deleted=True,
        )
        if photos:
            hnsw.add_items(np.asarray(vectors, dtype=np.float32), np.arange(len(photos)), num_threads=-1)
        for label, photo in enumerate(photos):
            photo.label = label
        return cls(params, hnsw)._adopt(entries, next_label=len(photos))

    @classmethod
    def load(cls, params: IndexParams, path: Path, items: Iterable[tuple[str, Item]], next_label: int) -> VectorIndex:
        hnsw = hnswlib.Index(space="cosine", dim=params.dim)
        hnsw.load_index(str(path), allow_replace_deleted=True)
        return cls(params, hnsw)._adopt(items, next_label)

    def _adopt(self, items: Iterable[tuple[str, Item]], next_label: int) -> VectorIndex:
        for item_id, item in items:
            self.items[item_id] = item
            self.ids_by_label.update((label, item_id) for label in item.labels)
            self.field_counts.update(item.metadata.keys())
        self.next_label = next_label
        return self


@dataclass
class _Products:
    """Products found by a search so far: the best hit of each, and how many each query found."""

    hits: dict[str, Hit] = field(default_factory=dict)
    found_per_query: list[int] = field(default_factory=list)


def _centre(examples: list[np.ndarray]) -> np.ndarray:
    """The mean of the examples, each first its photos' mean at unit length: a product of many photos counts once."""
    return np.mean([unit_rows(np.mean(unit_rows(np.atleast_2d(example)), axis=0)) for example in examples], axis=0)
