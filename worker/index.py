"""The in-memory catalogue index: hnswlib cosine vectors keyed by product id, with each item's metadata.

Not thread-safe and not durable by itself: exactly one process owns it (see `worker.store`).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from common.errors import LookalikeError
from common.filters import unknown_field

INITIAL_CAPACITY = 1024
EXACT_FILTER_LIMIT = 2048  # a filter that leaves fewer items than this is answered by exact search
EXACT_CHUNK = 4096  # items whose vectors an exact search holds at once
POSTED_FIELDS = 8  # fields with a lookup table (the most recently filtered by); each costs a set per item


@dataclass(frozen=True)
class IndexParams:
    """hnswlib's build and query parameters; kept with the index (M and ef_construction can't change later)."""

    dim: int
    m: int = 16
    ef_construction: int = 100
    ef: int = 128


@dataclass
class Item:
    """One catalogue product as the index keeps it (the vector lives in hnswlib under `label`)."""

    label: int
    metadata: dict[str, Any]
    image_sha256: str | None = None
    metadata_sha256: str | None = None


class UnknownField(LookalikeError):
    """A filter names a metadata field no item has."""


@dataclass
class Hit:
    id: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": round(self.score, 6), "metadata": self.metadata}


class VectorIndex:
    """Upsert, delete, get and search catalogue items by cosine similarity."""

    def __init__(self, params: IndexParams, hnsw: hnswlib.Index | None = None) -> None:
        self.params = params
        self.items: dict[str, Item] = {}
        self.ids_by_label: dict[int, str] = {}
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

    def upsert(self, item_id: str, vector: np.ndarray | None, item: Item) -> None:
        """Insert or replace `item_id`; `vector=None` replaces only the metadata of an existing item."""
        existing = self.items.get(item_id)
        if existing is not None:
            self._index_metadata(existing, add=False)
        if vector is None:
            if existing is None:
                raise KeyError(f"item {item_id!r} has no vector yet")
            item.label = existing.label
            self.items[item_id] = item
            self._index_metadata(item, add=True)
            return
        vector = np.asarray(vector, dtype=np.float32).reshape(1, self.params.dim)
        if existing is not None:
            item.label = existing.label
            self.hnsw.add_items(vector, [item.label])  # same label: hnswlib updates the point in place
        else:
            self._reserve(1)
            item.label = self.next_label
            self.next_label += 1
            self.hnsw.add_items(vector, [item.label], replace_deleted=True)
        self.items[item_id] = item
        self.ids_by_label[item.label] = item_id
        self._index_metadata(item, add=True)

    def delete(self, item_id: str) -> bool:
        item = self.items.pop(item_id, None)
        if item is None:
            return False
        self.hnsw.mark_deleted(item.label)  # the slot is reused by the next new item
        del self.ids_by_label[item.label]
        self._index_metadata(item, add=False)
        return True

    def vector(self, item_id: str) -> np.ndarray:
        """The stored (unit-length) vector of an item."""
        return np.asarray(self.hnsw.get_items([self.items[item_id].label]), dtype=np.float32)[0]

    def search(
        self,
        vector: np.ndarray,
        k: int,
        filters: Mapping[str, str] | None = None,
        exclude: str | None = None,
    ) -> list[Hit]:
        """Top-`k` items by cosine similarity, optionally only those whose metadata equals every filter (of fields
        the catalogue has: else UnknownField)."""
        allowed = self._matching_labels(filters) if filters else None
        wanted = k + (1 if exclude in self.items else 0)
        available = len(self.items) if allowed is None else len(allowed)
        if wanted == 0 or available == 0:
            return []
        count = min(wanted, available)
        query = np.asarray(vector, dtype=np.float32).reshape(1, self.params.dim)
        self.hnsw.set_ef(max(self.params.ef, count))
        if allowed is None:
            labels, distances = self.hnsw.knn_query(query, k=count)
        else:
            labels, distances = self._filtered_query(query, count, allowed)
        hits = []
        for label, distance in zip(labels[0], distances[0], strict=True):
            item_id = self.ids_by_label[int(label)]
            if item_id != exclude:
                hits.append(Hit(item_id, 1.0 - float(distance), self.items[item_id].metadata))
        return hits[:k]

    def _filtered_query(self, query: np.ndarray, count: int, allowed: set[int]) -> tuple[np.ndarray, np.ndarray]:
        """hnswlib's filtered search, or exact search over the allowed items when the filter is selective."""
        if len(allowed) > max(EXACT_FILTER_LIMIT, 4 * count):
            try:
                return self.hnsw.knn_query(query, k=count, filter=lambda label: label in allowed)
            except RuntimeError:  # hnswlib found fewer than `count` matches within its beam
                pass
        unit_query = query[0] / max(float(np.linalg.norm(query)), 1e-12)
        all_labels = np.fromiter(allowed, dtype=np.uint64, count=len(allowed))
        best_labels, best_distances = np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.float32)
        for start in range(0, len(all_labels), EXACT_CHUNK):  # bounded memory: a chunk of vectors at a time
            labels = np.concatenate([best_labels, all_labels[start : start + EXACT_CHUNK]])
            vectors = np.asarray(self.hnsw.get_items(labels[len(best_labels) :]), dtype=np.float32)
            distances = np.concatenate([best_distances, 1.0 - vectors @ unit_query])
            order = np.argsort(distances, kind="stable")[:count]
            best_labels, best_distances = labels[order], distances[order]
        return best_labels[None, :], best_distances[None, :]

    def fields(self) -> list[str]:
        """The metadata fields items have, the ones a filter may name."""
        return sorted(self.field_counts)

    def _matching_labels(self, filters: Mapping[str, str]) -> set[int]:
        """Labels whose metadata equals every filter, from per-field postings built on a field's first use."""
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
            postings.setdefault(str(item.metadata.get(name)), set()).add(item.label)
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
                labels.add(item.label)
            else:
                labels.discard(item.label)

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
            "dimension": self.params.dim,
            "capacity": self.hnsw.get_max_elements(),
            "deleted_slots": self.hnsw.element_count - len(self.items),
            "M": self.params.m,
            "ef_construction": self.params.ef_construction,
            "ef": self.params.ef,
        }

    def save_vectors(self, path: Path) -> None:
        self.hnsw.save_index(str(path))

    def stored_vectors(self) -> tuple[list[str], np.ndarray]:
        """Every item's id and its unit vector as stored, in the same order."""
        ids = list(self.items)
        if not ids:
            return ids, np.zeros((0, self.params.dim), dtype=np.float32)
        labels = [self.items[item_id].label for item_id in ids]
        return ids, np.asarray(self.hnsw.get_items(labels), dtype=np.float32)

    @classmethod
    def build(cls, params: IndexParams, entries: list[tuple[str, Item]], vectors: np.ndarray) -> VectorIndex:
        """A new index of `entries` and their `vectors` (same order), built in one call on every core."""
        hnsw = hnswlib.Index(space="cosine", dim=params.dim)
        hnsw.init_index(
            max_elements=max(INITIAL_CAPACITY, len(entries)),
            M=params.m,
            ef_construction=params.ef_construction,
            allow_replace_deleted=True,
        )
        if entries:
            hnsw.add_items(np.asarray(vectors, dtype=np.float32), np.arange(len(entries)), num_threads=-1)
        for label, (_, item) in enumerate(entries):
            item.label = label
        return cls(params, hnsw)._adopt(entries, next_label=len(entries))

    @classmethod
    def load(cls, params: IndexParams, path: Path, items: Iterable[tuple[str, Item]], next_label: int) -> VectorIndex:
        hnsw = hnswlib.Index(space="cosine", dim=params.dim)
        hnsw.load_index(str(path), allow_replace_deleted=True)
        return cls(params, hnsw)._adopt(items, next_label)

    def _adopt(self, items: Iterable[tuple[str, Item]], next_label: int) -> VectorIndex:
        for item_id, item in items:
            self.items[item_id] = item
            self.ids_by_label[item.label] = item_id
            self.field_counts.update(item.metadata.keys())
        self.next_label = next_label
        return self
