"""What the web asks of the rest of lookalike, through Redis and the queues only (never a model or an index)."""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import celery.exceptions
import redis
from flask import current_app

from common.areas import CatalogError, resolve_reference, shown
from common.errors import ErrorCode
from common.filters import unknown_field
from common.images import IMAGE_SUFFIXES, Crop, ImageError, check_size, read_image_file, thumbnail_jpeg
from common.products import ProductError, check_photo
from common.settings import Settings
from common.vectors import STRATEGIES
from protocol import keys
from protocol.client import MAX_EXAMPLES, Client, ReadError
from protocol.connection import redis_client, redis_memory
from protocol.heartbeats import RECENT_SECONDS, Role, alive
from protocol.jobs import FINISHED, Jobs
from protocol.queues import queue_depths
from protocol.readers import NoReaderAnswered, keeping_up
from web.errors import ApiError, bad_parameter, busy, not_found, unavailable
from web.params import MAX_WAIT_SECONDS, check_item_id

BUSY_RETRY_SECONDS = 2  # a full search queue drains in about this long (70 searches/s on 2 cores)
DECODE_WAIT_SECONDS = 2  # how long an image waits for one of this process's LOOKALIKE_WEB_DECODES before a 503
REDIS_MEMORY_SECONDS = 1  # how long the web trusts its last reading of Redis's memory
PREVIEW_SIDE = 320  # query previews and gallery thumbnails, CSS pixels (served at this size, shown smaller)
LOADS_SHOWN = 20


def current_service() -> Service:
    return current_app.extensions["lookalike"]


class Service:
    def __init__(self, settings: Settings, client: Client) -> None:
        self.settings = settings
        self.client = client
        self.jobs = self.client.jobs
        self.redis = self.jobs.redis
        self._form_secret: bytes | None = None
        self._decodes = threading.BoundedSemaphore(settings.web_decodes)
        # Waitress has a thread for each of these beside LOOKALIKE_WEB_THREADS: those are always left to answer.
        self._waiting = threading.BoundedSemaphore(settings.web_waiting) if settings.web_waiting else None
        # A wait blocks on Redis for up to MAX_WAIT_SECONDS: its client's socket must outlast it.
        self._waiter = Jobs(redis_client(settings, MAX_WAIT_SECONDS + settings.call_timeout))
        self._memory: tuple[float, dict[str, Any]] = (-float("inf"), {})

    def form_secret(self, refresh: bool = False) -> bytes:
        """A random secret made once per Redis and shared by every web process (see web.csrf); `refresh` reads it
        again (another process may have made a new one after Redis lost it)."""
        if self._form_secret is None or refresh:
            mine = secrets.token_bytes(32)
            self.redis.set(keys.FORM_SECRET, mine, nx=True)
            self._form_secret = self.redis.get(keys.FORM_SECRET) or mine
        return self._form_secret

    # searches ------------------------------------------------------------------------------------------------

    def submit_search(
        self, image: bytes, k: int, filters: dict[str, str], min_seq: int = 0, crop: Crop | None = None
    ) -> str:
        """Check the upload is an image we can read (and the crop box fits it), then queue it; the preview, with the
        box drawn on it, is made from the same decode."""
        self._check_search(filters, min_seq)
        try:
            check_size(image, self.settings.max_upload)
            with self.decoding():
                preview = thumbnail_jpeg(image, PREVIEW_SIDE, self.settings.max_search_pixels, outline=crop)
        except ImageError as error:
            raise ApiError.from_image_error(error) from error
        self.searchable()
        return self.client.search(image, k, filters, preview, min_seq, crop)

    def submit_search_of_photos(self, photos: list[bytes], k: int, filters: dict[str, str], min_seq: int = 0) -> str:
        """Queue one search of each photo, in one job; a photo that can't be read gets its own error in the result
        (the query process finds it), the others are answered. The preview is the first readable photo's."""
        self._check_search(filters, min_seq)  # their size together: the request's cap (LOOKALIKE_MAX_UPLOAD)
        for place, photo in enumerate(photos, start=1):
            try:
                check_size(photo, self.settings.max_upload)
            except ImageError as error:
                raise ApiError(413, error.code, f"photo {place}: {error.message}") from error
        preview = None
        for photo in photos:
            try:
                with self.decoding():
                    preview = thumbnail_jpeg(photo, PREVIEW_SIDE, self.settings.max_search_pixels)
                break
            except ImageError:
                continue
        self.searchable()
        return self.client.search(photos, k, filters, preview, min_seq)

    def submit_recommendation(
        self,
        positive: list[str | bytes],
        negative: list[str | bytes],
        k: int,
        filters: dict[str, str],
        strategy: str,
        min_seq: int = 0,
    ) -> str:
        """Check the examples (product ids by the id rule, photos as a search's photo is checked), then queue the
        recommendation; its preview is its first positive photo's, when it has one."""
        self._check_search(filters, min_seq)
        if strategy not in STRATEGIES:
            raise bad_parameter(f"`strategy` must be one of {', '.join(STRATEGIES)}, not {strategy[:40]!r}")
        if not positive:
            raise bad_parameter("give at least one positive example: a product id (`positive`) or a photo")
        if len(positive) + len(negative) > MAX_EXAMPLES:
            raise bad_parameter(f"a recommendation takes at most {MAX_EXAMPLES} examples, ids and photos together")
        previews = []
        for example in [*positive, *negative]:
            if isinstance(example, str):
                check_item_id(example)
                continue
            try:
                check_size(example, self.settings.max_upload)
                with self.decoding():
                    previews.append(thumbnail_jpeg(example, PREVIEW_SIDE, self.settings.max_search_pixels))
            except ImageError as error:
                raise ApiError.from_image_error(error) from error
        self.searchable()
        preview = previews[0] if any(isinstance(example, bytes) for example in positive) else None
        return self.client.recommend(positive, negative, k, filters, strategy, preview, min_seq)

    def _check_search(self, filters: dict[str, str], min_seq: int) -> None:
        """What a search must pass before any photo of it is decoded."""
        self.refuse_when_busy()  # before the decoding: an overloaded service should spend nothing on a refusal
        self.check_fields(filters)
        try:
            self.client.check_min_seq(min_seq)
        except ReadError as error:
            raise bad_parameter(str(error)) from error

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """One of this process's LOOKALIKE_WEB_DECODES decodes (each holds a decoded image); 503 busy when none is
        free within DECODE_WAIT_SECONDS."""
        if not self._decodes.acquire(timeout=DECODE_WAIT_SECONDS):
            decodes = self.settings.web_decodes
            raise busy(
                f"this web process is decoding {decodes} images already; try again in a few seconds", BUSY_RETRY_SECONDS
            )
        try:
            yield
        finally:
            self._decodes.release()

    def refuse_when_busy(self) -> None:
        """Back-pressure: a search behind a queue this long would be answered after its shopper gave up; and what
        anonymous searches keep in Redis is bounded, by count and by Redis's memory cap."""
        waiting, live, oldest_expires_in = self.jobs.search_load()
        if waiting >= self.settings.max_queued_searches:
            raise busy(f"{waiting} searches are waiting already; try again in a few seconds", BUSY_RETRY_SECONDS)
        if live >= self.settings.max_live_searches:
            message = f"{live} search results are kept already (LOOKALIKE_MAX_LIVE_SEARCHES); try again later"
            raise busy(message, max(BUSY_RETRY_SECONDS, math.ceil(oldest_expires_in)))
        if self._redis_memory()["full"]:
            message = "Redis is nearly full (80% of its maxmemory): searches wait, loads go on; try again later"
            raise busy(message, REDIS_MEMORY_SECONDS)

    def _redis_memory(self) -> dict[str, Any]:
        """Redis's memory figures, read at most every REDIS_MEMORY_SECONDS by this process."""
        read_at, memory = self._memory
        if time.monotonic() - read_at > REDIS_MEMORY_SECONDS:
            self._memory = (time.monotonic(), memory := redis_memory(self.redis))
        return memory

    def job(self, job_id: str, error_offset: int = 0, error_limit: int = 50) -> dict[str, Any]:
        job = self.jobs.get(job_id, error_offset, error_limit)
        if job is None:
            raise not_found(f"no job with id {job_id} (search results are kept {self.settings.search_ttl} s)")
        return job

    def job_made_here(self, job_id: str) -> dict[str, Any]:
        """A job this very request created: gone means Redis lost it with the last writes before a failover (its
        replica never had them): 503, to be sent again, not a 404 for an id the client was just given."""
        job = self.jobs.get(job_id)
        if job is None:
            raise unavailable(ErrorCode.BROKER_UNAVAILABLE, "Redis lost the job as it failed over: send it again")
        return job

    def finished_job(self, job_id: str, seconds: int, error_offset: int = 0, error_limit: int = 50) -> dict[str, Any]:
        """The job once it finished, waiting up to `seconds` for it (woken by its finish, not by polling); as it is
        when it did not finish in time, or when LOOKALIKE_WEB_WAITING requests of this process wait already."""
        job = self.job(job_id, error_offset, error_limit)
        if not seconds or job["state"] in FINISHED:
            return job
        self.wait_for(job_id, seconds)
        return self.job(job_id, error_offset, error_limit)  # as it is now, finished or not (a load's progress)

    def wait_for(self, job_id: str, seconds: int) -> bool:
        """Wait up to `seconds` for the job to finish (woken by its finish, not by polling): whether it did; False at
        once when LOOKALIKE_WEB_WAITING requests of this process wait already."""
        waiting = self._waiting
        if waiting is None or not waiting.acquire(blocking=False):
            return False
        try:
            return self._waiter.wait_until_finished(job_id, seconds)
        finally:
            waiting.release()

    def preview(self, job_id: str) -> bytes:
        data = self.jobs.preview(job_id)
        if data is None:
            raise not_found(f"job {job_id} has no query image")
        return data

    # catalogue -----------------------------------------------------------------------------------------------

    def submit_load(self, source: Path, metadata: Path | None) -> str:
        return self.client.start_load(source, metadata)

    def submit_product(self, item_id: str, photos: list[tuple[str, bytes]], metadata: dict[str, str]) -> str:
        """Check each photo (name, bytes) as an upload is, decoding it whole (refused naming which photo), then keep
        them and queue the load of this one product."""
        for number, (name, data) in enumerate(photos, start=1):
            try:
                with self.decoding():
                    check_photo(data, self.settings.max_upload, self.settings.max_pixels)
            except ImageError as error:
                which = f"photo {number}" + (f" ({name[:80]})" if name else "")
                raise ApiError.from_image_error(ImageError(error.code, f"{which}: {error.message}")) from error
        try:
            return self.client.put_item(item_id, [data for _, data in photos], metadata)
        except ProductError as error:
            raise bad_parameter(str(error)) from error

    def catalog_path(self, relative: str) -> Path:
        """A file or folder named relative to the catalogue root (a leading / is the root); nothing outside it."""
        try:
            path = resolve_reference(self.settings, "catalog", relative.strip().strip("/") or ".")
        except CatalogError as error:
            raise bad_parameter(str(error)) from error
        if not path.exists():
            raise bad_parameter(f"{relative!r} does not exist under the catalogue root")
        return path

    def reference(self, path: str | None) -> str | None:
        """A server path as `area/relative`, the way clients see catalogue files (never the server's folders)."""
        return shown(self.settings, path) if path else path

    def loads(self, limit: int = LOADS_SHOWN) -> list[dict[str, Any]]:
        return self.jobs.list_loads(limit)

    def catalog_image(self, reference: str) -> Path:
        """The file an item's image reference (`area/path`, as its metadata records it) names; 404 outside."""
        area, _, relative = reference.partition("/")
        try:
            path = resolve_reference(self.settings, area, relative)
        except CatalogError as error:
            raise not_found(f"no image {reference!r}: {error}") from error
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            raise not_found(f"no image {reference!r}")
        return path

    def thumbnail(self, path: Path, side: int) -> bytes:
        try:
            with self.decoding():
                return thumbnail_jpeg(
                    read_image_file(path, self.settings.max_image_bytes), side, self.settings.max_pixels
                )
        except ImageError as error:
            raise not_found(f"{path.name} can't be shown: {error.message}") from error
        except OSError as error:  # removed or unreadable since it was found
            raise not_found(f"{path.name} can't be read: {error.strerror}") from error

    # items: read from any index reader, deleted by the owner ----------------------------------------------------

    def item(self, item_id: str, min_seq: int = 0) -> dict[str, Any]:
        item = self._read(self.client.get_item, item_id, min_seq)
        if item is None:
            raise not_found(f"no item with id {item_id!r}")
        return item

    def similar(self, item_id: str, k: int, filters: dict[str, str], min_seq: int = 0) -> dict[str, Any]:
        """`hits`, and `close_match` and `threshold` when the index is calibrated."""
        self.check_fields(filters)
        answer = self._read(self.client.similar, item_id, k, filters, min_seq)
        if answer is None:
            raise not_found(f"no item with id {item_id!r}")
        return answer

    def delete(self, item_id: str) -> dict[str, int] | None:
        """The owner's answer (`deleted`, `seq`); None when it did not answer in time (the delete stays queued: no
        expiry)."""
        self.index_owner()
        try:
            answer = self.client.delete([item_id])
        except celery.exceptions.TimeoutError:
            return None
        if not answer["deleted"]:
            raise not_found(f"no item with id {item_id!r}")
        return answer

    def _read(self, question: Callable[..., Any], *args: Any) -> Any:
        """A read, its failures as 503s with the reason (at once when no reader is alive)."""
        self.readers()
        try:
            return question(*args)
        except NoReaderAnswered:
            message = f"no index reader answered within {self.settings.call_timeout} s (busy or stopped)"
            raise unavailable(ErrorCode.NO_WORKER, message) from None
        except ReadError as error:  # behind the change asked for, or an index that can't be used: its reason
            if error.code in (ErrorCode.UNKNOWN_FIELD, ErrorCode.BAD_PARAMETER):  # the request's fault, not ours
                raise ApiError(400, error.code, str(error)) from error
            raise unavailable(error.code, str(error)) from error

    # health --------------------------------------------------------------------------------------------------

    def index_owner(self) -> dict[str, Any]:
        """The live index owner's heartbeat; 503 when none reported in lately."""
        owners = self._alive(Role.INDEX)
        if not owners:
            raise unavailable(ErrorCode.NO_WORKER, "no index worker is running (start `lookalike worker index`)")
        return owners[0]

    def searchable(self) -> None:
        """503 unless a query process and an index reader (a replica, or the owner) are alive."""
        if not self._alive(Role.QUERY):
            raise unavailable(ErrorCode.NO_WORKER, "no query worker is running (start `lookalike worker query`)")
        self.readers()

    def readers(self) -> None:
        """503 unless an index reader (a replica, or the owner) is alive."""
        if not (self._alive(Role.REPLICA) or self._alive(Role.INDEX)):
            raise unavailable(ErrorCode.NO_WORKER, "no index worker is running (start `lookalike worker index`)")

    def facets(self) -> dict[str, list[str]]:
        """Metadata fields to filter by, with their values, from an index reader's heartbeat ({} without one)."""
        try:
            return self._filterable().get("facets", {})
        except redis.RedisError:
            return {}

    def check_fields(self, filters: dict[str, str]) -> None:
        """400 `unknown_field` for a filter on a field no item has, as an index reader's heartbeat lists them (the
        reader checks again: a heartbeat may be a few seconds old)."""
        fields = self._filterable().get("fields") if filters else None
        problem = unknown_field(filters, fields) if fields is not None else None
        if problem:
            raise ApiError(400, ErrorCode.UNKNOWN_FIELD, problem)

    def _filterable(self) -> dict[str, Any]:
        """An index reader's heartbeat, which lists the fields and facets a filter may name ({} without one)."""
        readers = self._alive(Role.INDEX) + self._alive(Role.REPLICA)
        return readers[0] if readers else {}

    def _alive(self, role: Role) -> list[dict[str, Any]]:
        """Processes of `role` alive, as this process read the heartbeats at most RECENT_SECONDS ago: for the checks
        every request makes (/healthz reads them afresh)."""
        return alive(self.redis, role, fresh=RECENT_SECONDS)

    def health(self) -> dict[str, Any]:
        """Every part, as /healthz shows it: `ok` when all are there, `degraded` when searches are answered but
        something else is missing (the owner: writes wait; embed workers: loads wait), else `unavailable`."""
        try:
            self.redis.ping()
        except redis.RedisError as error:
            return {"status": "unavailable", "broker": {"reachable": False, "error": str(error)}}
        owners, replicas = alive(self.redis, Role.INDEX), alive(self.redis, Role.REPLICA)
        embedders, queriers = alive(self.redis, Role.EMBED), alive(self.redis, Role.QUERY)
        owner = owners[0] if owners else None
        index: dict[str, Any] = {"alive": owner is not None}
        if owner:
            fields = ("index_id", "items", "photos", "model", "model_sha256", "resize", "pca", "seq", "snapshot",
                      "building", "calibration")  # fmt: skip
            index |= {key: owner.get(key) for key in fields}
            index["seconds_since_heartbeat"] = round(time.time() - owner["seen"], 1)
            if owner.get("mismatch"):
                index["problem"] = owner["mismatch"]
        readable = bool(keeping_up(self.redis, self.settings.max_lag)) or (
            owner is not None and not owner.get("mismatch")
        )
        if not (readable and queriers):
            status = "unavailable"
        else:
            status = "ok" if owner is not None and not owner.get("mismatch") and embedders else "degraded"
        return {
            "status": status,
            "broker": {
                "reachable": True,
                "queues": queue_depths(self.redis),
                "memory": redis_memory(self.redis),
                "live_searches": self.jobs.live_searches()[0],
            },
            "index": index,
            "replicas": [{key: beat.get(key) for key in REPLICA_FIELDS} for beat in sorted(replicas, key=_worker_name)],
            "query_workers": {**_workers(queriers), **_batching(queriers)},
            "embed_workers": _workers(embedders),
        }


REPLICA_FIELDS = ("host", "pid", "items", "seq", "lag_changes", "lag_seconds", "taking_reads")


def _worker_name(beat: dict[str, Any]) -> str:
    return f"{beat['host']}:{beat['pid']}"


def _workers(beats: list[dict[str, Any]]) -> dict[str, Any]:
    return {"alive": len(beats), "providers": sorted({beat.get("provider", "?") for beat in beats})}


def _batching(beats: list[dict[str, Any]]) -> dict[str, Any]:
    """How full the query processes' batches have been, since they started."""
    batches, searches = sum(beat.get("batches", 0) for beat in beats), sum(beat.get("searches", 0) for beat in beats)
    return {"batches": batches, "searches": searches, "mean_batch": round(searches / batches, 2) if batches else None}
