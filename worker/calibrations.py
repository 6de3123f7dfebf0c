"""The serving side of "no close match": a calibration is stored with the index it was fitted for (its folder), is
refused for any other index, and is published in Redis (`keys.CALIBRATION`) for the replicas to use too.

The fit itself is `worker.evaluation.calibration`; the readers apply it (`worker.reader`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import redis

from common.errors import ErrorCode, LookalikeError
from protocol import keys
from worker.evaluation.calibration import Calibration, read_calibration, write_calibration
from worker.state import IndexState
from worker.store import DurableIndex

log = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0  # how often a replica looks for a new calibration


class CalibrationRefused(LookalikeError):
    """A calibration that is not one (`bad_parameter`), or was fitted for other vectors than the index's
    (`model_mismatch`)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def identity_of(state: IndexState) -> tuple[str, str, int]:
    """What a calibration must have been fitted with: the index's model sha256, resize policy and PCA dimension."""
    return state.identity.sha256, state.identity.resize, state.projection.dimension if state.projection else 0


def stored_with(store: DurableIndex) -> Calibration | None:
    """The calibration stored with `store`, when it still fits it (a PCA fitted since makes it another index's)."""
    try:
        calibration = read_calibration(store.directory)
    except ValueError as error:
        log.error("index %s is served uncalibrated: %s", store.index_id, error)
        return None
    problem = calibration.mismatch(*identity_of(store)) if calibration else None
    if problem:
        log.warning("index %s is served uncalibrated: %s", store.index_id, problem)
        return None
    return calibration


def store_with(store: DurableIndex, raw: dict[str, Any]) -> Calibration:
    """Check a calibration against `store` and write it in its folder; CalibrationRefused says why not."""
    try:
        calibration = Calibration.from_dict(raw)
    except ValueError as error:
        message = f"that is no calibration `lookalike evaluate --calibrate` made: {error}"
        raise CalibrationRefused(ErrorCode.BAD_PARAMETER, message) from None
    problem = calibration.mismatch(*identity_of(store))
    if problem:
        raise CalibrationRefused(ErrorCode.MODEL_MISMATCH, problem)
    write_calibration(store.directory, calibration)
    return calibration


def publish(client: redis.Redis, index_id: str, calibration: Calibration | None) -> None:
    """Tell the replicas the serving index's calibration (none: they serve uncalibrated answers)."""
    if calibration is None:
        client.delete(keys.CALIBRATION)
        return
    body = json.dumps(calibration.as_dict())
    digest = hashlib.sha256(f"{index_id}:{body}".encode()).hexdigest()
    client.hset(keys.CALIBRATION, mapping={"index_id": index_id, "sha256": digest, "calibration": body})


class PublishedCalibration:
    """A replica's view of the published calibration: read again when it changed, at most every REFRESH_SECONDS,
    and used only while the replica holds the index it belongs to."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.digest: bytes | None = None
        self.index_id = ""
        self.calibration: Calibration | None = None
        self._looked = 0.0

    def for_index(self, index_id: str) -> Calibration | None:
        if time.monotonic() - self._looked >= REFRESH_SECONDS:
            self._looked = time.monotonic()
            self._refresh()
        return self.calibration if self.index_id == index_id else None

    def _refresh(self) -> None:
        digest = self.redis.hget(keys.CALIBRATION, "sha256")
        if digest == self.digest:
            return
        index_id, body = self.redis.hmget(keys.CALIBRATION, ["index_id", "calibration"])
        try:
            self.calibration = Calibration.from_dict(json.loads(body)) if body else None
        except ValueError as error:
            log.error("replica: the published calibration can't be used: %s", error)
            self.calibration = None
        self.digest, self.index_id = digest, index_id.decode() if index_id else ""
