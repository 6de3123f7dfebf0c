"""Reads of an index: nearest neighbours of vectors, "more like this", items, facets and figures.

The same answers from the owner and from every replica: an `IndexReader` serves one `IndexState`, under the lock
that whatever changes the state holds, and waits (a little) for a change a read asks for.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from common.errors import ErrorCode, LookalikeError
from common.vectors import decode_vector
from protocol.jobs import item_error
from worker.evaluation.calibration import Calibration
from worker.index import Hit, UnknownField
from worker.state import IndexState

FACET_VALUES = 20  # a metadata field with at most this many distinct values is offered as a search filter
FACET_SECONDS = 30  # a count of facets walks every item; most changes barely move them


class UnknownExample(LookalikeError):
    """A recommendation names a product the index does not hold."""


class IndexReader:
    """`owns`: the state is the owner's, which makes every change, so a change it doesn't hold was never made; a
    replica's may still come, and the replica says `behind` at once rather than wait for it with the reads queued
    behind this one held up. `usable()` names why the state can't answer (another model's index, say), or is None.
    With a `calibration` (the serving index's, `lookalike evaluate --calibrate`), every hit carries its confidence
    and every answer whether it is a close match."""

    def __init__(
        self,
        state: IndexState,
        lock: AbstractContextManager | None = None,
        owns: bool = True,
        usable: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.state = state
        self.owns = owns
        self.lock = lock or nullcontext()
        self.usable = usable
        self.calibration: Calibration | None = None
        self._facets: tuple[int, float, int, dict[str, list[str]]] = (-1, 0.0, 0, {})  # seq, when, items, facets
        self._facets_lock = threading.Lock()

    def nearest(self, model_sha256: str, resize: str, queries: list[dict[str, Any]], min_seq: int) -> dict[str, Any]:
        """Top-k of each query (`vector` of the model, base64; `k`; `filters`), if the vectors are this index's."""
        refused = self.refusal(min_seq)
        if refused:
            return refused
        identity = self.state.identity
        if (model_sha256, resize) != (identity.sha256, identity.resize):
            message = (
                f"the query was embedded with model {model_sha256[:12]} / resize {resize}; the index holds model "
                f"{identity.sha256[:12]} / resize {identity.resize}"
            )
            # A replica may not have followed a switch to the query's model yet: the owner, which made the switch,
            # answers it instead (or says model_mismatch).
            code = ErrorCode.MODEL_MISMATCH if self.owns else ErrorCode.BEHIND
            return {"error": item_error(code, message)}
        with self.lock:
            answers, verdicts = [], []
            for query in queries:
                try:
                    hits = self._hits(query)
                except UnknownField as error:  # this search only: the others of the batch are answered
                    answers.append({"error": item_error(ErrorCode.UNKNOWN_FIELD, str(error))})
                    verdicts.append(None)
                    continue
                except UnknownExample as error:
                    answers.append({"error": item_error(ErrorCode.NOT_FOUND, str(error))})
                    verdicts.append(None)
                    continue
                found, verdict = self.judged(hits)
                answers.append(found)
                verdicts.append(verdict)
            calibrated = {"verdicts": verdicts} if self.calibration else {}
            return {"answers": answers, "seq": self.state.seq, **calibrated}

    def _hits(self, query: dict[str, Any]) -> list[Hit]:
        """A search's hits: of its `vector`; or a recommendation's, of its `positive` and `negative` examples (each
        a `vector`, or a product's `id`: its photos), none of the products it names."""
        index, filters = self.state.index, query.get("filters") or {}
        if "vector" in query:
            return index.search(self.state.to_index_space(decode_vector(query["vector"])), query["k"], filters)
        positives, negatives = (
            [self._example(example) for example in query[side]] for side in ("positive", "negative")
        )
        named = [example["id"] for example in query["positive"] + query["negative"] if "id" in example]
        return index.recommend(positives, negatives, query["k"], filters, named, query["strategy"])

    def _example(self, example: dict[str, str]) -> np.ndarray:
        if "vector" in example:
            return self.state.to_index_space(decode_vector(example["vector"]))
        if example["id"] not in self.state.index:
            raise UnknownExample(f"no item with id {example['id']!r} (an example of the recommendation)")
        return self.state.index.vectors(example["id"])

    def similar(self, item_id: str, k: int, filters: dict[str, str], min_seq: int) -> dict[str, Any]:
        """'More like this': every photo of the product as a query, the product itself left out."""
        refused = self.refusal(min_seq)
        if refused:
            return refused
        with self.lock:
            index = self.state.index
            if item_id not in index:
                return {"error": item_error(ErrorCode.NOT_FOUND, f"no item with id {item_id!r}")}
            try:
                hits = index.search(index.vectors(item_id), k, filters, exclude=(item_id,))
            except UnknownField as error:
                return {"error": item_error(ErrorCode.UNKNOWN_FIELD, str(error))}
            found, verdict = self.judged(hits)
            return {"hits": found, "seq": self.state.seq, **(verdict or {})}

    def judged(self, hits: list[Hit]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """The hits as an answer gives them, each with its confidence when calibrated; and the verdict (`close_match`,
        `threshold`), None when uncalibrated."""
        found = [hit.as_dict() for hit in hits]
        calibration = self.calibration
        return found, calibration.annotate(found) if calibration else None

    def get(self, item_id: str, min_seq: int) -> dict[str, Any]:
        refused = self.refusal(min_seq)
        if refused:
            return refused
        item = self.state.index.items.get(item_id)
        if item is None:
            return {"error": item_error(ErrorCode.NOT_FOUND, f"no item with id {item_id!r}")}
        photos = [photo.image for photo in item.photos]
        return {"item": {"id": item_id, "metadata": item.metadata, "photos": photos}, "seq": self.state.seq}

    def figures(self) -> dict[str, Any]:
        """What the index holds: items, dimension, hnswlib's parameters, the model, the sequence number, the PCA."""
        state = self.state
        return {
            **state.index.stats(),
            "model_sha256": state.identity.sha256,
            "resize": state.identity.resize,
            "seq": state.seq,
            "pca": state.projection.describe() if state.projection else None,
        }

    def digest(self) -> str:
        """A sha256 of every product: its id, metadata, photos and checksums, and its photos' vectors as stored.
        Two readers with the same digest hold the same catalogue (replicas are compared with the owner this way)."""
        digest = hashlib.sha256()
        with self.lock:
            index = self.state.index
            ids, vectors = index.stored_vectors()  # one read of every vector: a photo a row, a product's together
            rows = {item_id: row for row, item_id in reversed(list(enumerate(ids)))}  # each product's first row
            for item_id in sorted(index.items):
                item = index.items[item_id]
                fields = [item_id, item.metadata, [photo.as_list() for photo in item.photos], item.metadata_sha256]
                photos = vectors[rows[item_id] : rows[item_id] + len(item.photos)]
                digest.update(json.dumps(fields, sort_keys=True).encode() + photos.astype("<f4").tobytes())
        return digest.hexdigest()

    def filterable(self) -> dict[str, Any]:
        """What a filter may name, for heartbeats: every metadata field, and the facets the search form offers."""
        return {"fields": self.state.index.fields(), "facets": self.facets()}

    def facets(self) -> dict[str, list[str]]:
        """Recounted when the index changed, at most every FACET_SECONDS unless it grew or shrank by a tenth."""
        with self._facets_lock:
            seq, counted_at, counted_items, facets = self._facets
            items = len(self.state.index)
            grown = abs(items - counted_items) > counted_items / 10
            if seq != self.state.seq and (grown or time.monotonic() - counted_at > FACET_SECONDS):
                facets = self.state.index.facets(FACET_VALUES)
                self._facets = (self.state.seq, time.monotonic(), items, facets)
            return facets

    def refusal(self, min_seq: int) -> dict[str, Any] | None:
        """Why this read can't be answered here: the index is unusable, or behind the change asked for."""
        problem = self.usable()
        if problem:
            return {"error": item_error(ErrorCode.INDEX_UNAVAILABLE, problem)}
        if min_seq <= self.state.seq:
            return None
        if self.owns:
            message = f"min_seq {min_seq} is no change the index has made: it is at change {self.state.seq}"
            return {"error": item_error(ErrorCode.BAD_PARAMETER, message)}
        message = f"this index reader is at change {self.state.seq}, not yet at {min_seq}"
        return {"error": item_error(ErrorCode.BEHIND, message)}
