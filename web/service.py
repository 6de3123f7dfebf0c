"""What the web asks of the rest of lookalike, through Redis and the queues only (never a model or an index)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import celery.exceptions
import redis
from flask import current_app
from kombu.exceptions import OperationalError

from common.areas import CatalogError, locate, resolve_reference
from common.images import IMAGE_SUFFIXES, ImageError, check_size, thumbnail_jpeg
from common.settings import Settings
from web.errors import ApiError, bad_parameter, not_found, unavailable
from worker.celery_app import SEARCH_QUEUE, queue_depths
from worker.client import Client
from worker.heartbeats import alive

BUSY_RETRY_SECONDS = 2  # a full search queue drains in about this long (70 searches/s on 2 cores)
FORM_SECRET_KEY = "lookalike:web:form-secret"  # the HMAC key of the forms' CSRF tokens, shared by web processes
PREVIEW_SIDE = 320  # query previews and gallery thumbnails, CSS pixels (served at this size, shown smaller)
LOADS_SHOWN = 20


def current_service() -> Service:
    return current_app.extensions["lookalike"]


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = Client(settings, redis_timeout=settings.call_timeout)
        self.jobs = self.client.jobs
        self.redis = self.jobs.redis
        self._form_secret: bytes | None = None

    def form_secret(self, refresh: bool = False) -> bytes:
        """A random secret made once per Redis and shared by every web process (see web.csrf); `refresh` reads it
        again (another process may have made a new one after Redis lost it)."""
        if self._form_secret is None or refresh:
            mine = secrets.token_bytes(32)
            self.redis.set(FORM_SECRET_KEY, mine, nx=True)
            self._form_secret = self.redis.get(FORM_SECRET_KEY) or mine
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
        return self.client.submit_search(image, k, filters, preview)

    def refuse_when_busy(self) -> None:
        """Back-pressure: a search behind a queue this long would be answered after its shopper gave up."""
        waiting = self.redis.llen(SEARCH_QUEUE)
        if waiting >= self.settings.max_queued_searches:
            raise ApiError(
                503,
                "busy",
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
        return self.client.submit_load(source, metadata)

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
        item = self._ask("get_item", item_id)
        if item is None:
            raise not_found(f"no item with id {item_id!r}")
        return item

    def similar(self, item_id: str, k: int, filters: dict[str, str]) -> list[dict[str, Any]]:
        answer = self._ask("similar_items", item_id, k, filters)
        if "error" in answer:
            raise not_found(answer["error"]["message"])
        return answer["hits"]

    def delete(self, item_id: str) -> bool:
        """True when deleted; False when the owner did not answer in time (the delete stays queued: no expiry)."""
        try:
            deleted = self._ask("delete_items", [item_id], expires=False)["deleted"]
        except celery.exceptions.TimeoutError:
            return False
        if not deleted:
            raise not_found(f"no item with id {item_id!r}")
        return True

    def _ask(self, task: str, *args: Any, expires: bool = True) -> Any:
        """A question for the index owner; celery's TimeoutError only for a question that doesn't expire."""
        self.index_owner()
        try:
            return self.client.call(task, *args, timeout=self.settings.call_timeout, expires=expires)
        except celery.exceptions.TimeoutError:
            if not expires:
                raise
            raise unavailable(
                "no_worker", f"the index worker did not answer within {self.settings.call_timeout} s (busy or stopped)"
            ) from None
        except (redis.RedisError, OperationalError):
            raise  # the broker: answered as broker_unavailable
        except Exception as error:  # the owner raised (an unusable index): its reason, not a 500
            raise unavailable("index_unavailable", f"the index can't answer: {error}") from error

    # health --------------------------------------------------------------------------------------------------

    def index_owner(self) -> dict[str, Any]:
        """The live index owner's heartbeat; 503 when none reported in lately."""
        owners = alive(self.redis, "index")
        if not owners:
            raise unavailable("no_worker", "no index worker is running (start `lookalike worker index`)")
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
