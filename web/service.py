"""What the web asks of the rest of lookalike, through Redis and the queues only (never a model or an index)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import celery.exceptions
import redis
from flask import current_app
from kombu.exceptions import OperationalError

from common.areas import CatalogError, locate, resolve_reference
from common.errors import ErrorCode
from common.images import IMAGE_SUFFIXES, ImageError, check_size, thumbnail_jpeg
from common.settings import Settings
from protocol import keys
from protocol.client import Client
from protocol.heartbeats import alive
from protocol.queues import Queue, queue_depths
from web.errors import ApiError, bad_parameter, not_found, unavailable

BUSY_RETRY_SECONDS = 2  # a full search queue drains in about this long (70 searches/s on 2 cores)
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

    def form_secret(self, refresh: bool = False) -> bytes:
        """A random secret made once per Redis and shared by every web process (see web.csrf); `refresh` reads it
        again (another process may have made a new one after Redis lost it)."""
        if self._form_secret is None or refresh:
            mine = secrets.token_bytes(32)
            self.redis.set(keys.FORM_SECRET, mine, nx=True)
            self._form_secret = self.redis.get(keys.FORM_SECRET) or mine
        return self._form_secret

    # searches ------------------------------------------------------------------------------------------------

    def submit_search(self, image: bytes, k: int, filters: dict[str, str]) -> str:
        """Check the upload is an image we can read, then queue it; the preview is made from the same decode."""
        self.refuse_when_busy()  # before the decoding: an overloaded service should spend nothing on a refusal
        try:
            preview = thumbnail_jpeg(
                check_size(image, self.settings.max_upload), PREVIEW_SIDE, self.settings.max_pixels
            )
        except ImageError as error:
            raise ApiError.from_image_error(error) from error
        self.index_owner()
        return self.client.search(image, k, filters, preview)

    def refuse_when_busy(self) -> None:
        """Back-pressure: a search behind a queue this long would be answered after its shopper gave up."""
        waiting = self.redis.llen(Queue.SEARCH)
        if waiting >= self.settings.max_queued_searches:
            raise ApiError(
                503,
                ErrorCode.BUSY,
                f"{waiting} searches are waiting already; try again in a few seconds",
                {"Retry-After": str(BUSY_RETRY_SECONDS)},
            )

    def job(self, job_id: str, error_offset: int = 0, error_limit: int = 50) -> dict[str, Any]:
        job = self.jobs.get(job_id, error_offset, error_limit)
        if job is None:
            raise not_found(f"no job with id {job_id} (search results are kept {self.settings.search_ttl} s)")
        return job

    def preview(self, job_id: str) -> bytes:
        data = self.jobs.preview(job_id)
        if data is None:
            raise not_found(f"job {job_id} has no query image")
        return data

    # catalogue -----------------------------------------------------------------------------------------------

    def submit_load(self, source: Path, metadata: Path | None) -> str:
        return self.client.start_load(source, metadata)

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
        if not path:
            return path
        try:
            area, relative = locate(self.settings, Path(path))
        except CatalogError:
            return Path(path).name
        return f"{area}/{relative.as_posix()}"

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
            return thumbnail_jpeg(path.read_bytes(), side, self.settings.max_pixels)
        except ImageError as error:
            raise not_found(f"{path.name} can't be shown: {error.message}") from error
        except OSError as error:  # removed or unreadable since it was found
            raise not_found(f"{path.name} can't be read: {error.strerror}") from error

    # items (answered by the index owner) ---------------------------------------------------------------------

    def item(self, item_id: str) -> dict[str, Any]:
        item = self._ask(self.client.get_item, item_id)
        if item is None:
            raise not_found(f"no item with id {item_id!r}")
        return item

    def similar(self, item_id: str, k: int, filters: dict[str, str]) -> list[dict[str, Any]]:
        hits = self._ask(self.client.similar, item_id, k, filters)
        if hits is None:
            raise not_found(f"no item with id {item_id!r}")
        return hits

    def delete(self, item_id: str) -> bool:
        """True when deleted; False when the owner did not answer in time (the delete stays queued: no expiry)."""
        try:
            deleted = self._ask(self.client.delete, [item_id])
        except celery.exceptions.TimeoutError:
            return False
        if not deleted:
            raise not_found(f"no item with id {item_id!r}")
        return True

    def _ask(self, question: Callable[..., Any], *args: Any) -> Any:
        """A question for the index owner, its failures as 503s; a delete's time-out stays celery's TimeoutError
        (the delete doesn't expire: it is still queued)."""
        self.index_owner()
        try:
            return question(*args)
        except celery.exceptions.TimeoutError:
            if question == self.client.delete:
                raise
            raise unavailable(
                ErrorCode.NO_WORKER,
                f"the index worker did not answer within {self.settings.call_timeout} s (busy or stopped)",
            ) from None
        except (redis.RedisError, OperationalError):
            raise  # the broker: answered as broker_unavailable
        except Exception as error:  # the owner raised (an unusable index): its reason, not a 500
            raise unavailable(ErrorCode.INDEX_UNAVAILABLE, f"the index can't answer: {error}") from error

    # health --------------------------------------------------------------------------------------------------

    def index_owner(self) -> dict[str, Any]:
        """The live index owner's heartbeat; 503 when none reported in lately."""
        owners = alive(self.redis, "index")
        if not owners:
            raise unavailable(ErrorCode.NO_WORKER, "no index worker is running (start `lookalike worker index`)")
        return owners[0]

    def facets(self) -> dict[str, list[str]]:
        """Metadata fields to filter by, with their values, from the index owner's heartbeat ({} without one)."""
        try:
            owners = alive(self.redis, "index")
        except redis.RedisError:
            return {}
        return owners[0].get("facets", {}) if owners else {}

    def health(self) -> dict[str, Any]:
        """Broker, index owner and embed workers, as /healthz shows them; `ok` only when all are there."""
        try:
            self.redis.ping()
        except redis.RedisError as error:
            return {"status": "unavailable", "broker": {"reachable": False, "error": str(error)}}
        owners, embedders = alive(self.redis, "index"), alive(self.redis, "embed")
        owner = owners[0] if owners else None
        index: dict[str, Any] = {"alive": owner is not None}
        if owner:
            index |= {key: owner.get(key) for key in ("items", "model", "model_sha256", "provider", "resize", "pca")}
            index["seconds_since_heartbeat"] = round(time.time() - owner["seen"], 1)
            if owner.get("mismatch"):
                index["problem"] = owner["mismatch"]
        ok = owner is not None and not owner.get("mismatch") and bool(embedders)
        return {
            "status": "ok" if ok else "unavailable",
            "broker": {"reachable": True, "queues": queue_depths(self.redis)},
            "index": index,
            "embed_workers": {
                "alive": len(embedders),
                "providers": sorted({beat.get("provider", "?") for beat in embedders}),
            },
        }
