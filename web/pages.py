"""The pages: search form, job pages that poll, results gallery, items, catalogue loads, thumbnails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, make_response, redirect, render_template, request, url_for

from common.errors import ErrorCode
from common.vectors import STRATEGIES
from protocol.jobs import FINISHED
from web.api import present_item, present_job
from web.auth import browser_signed_in, is_the_key, sign_in_browser, unauthorized
from web.errors import ApiError, not_found
from web.params import DEFAULT_K, MAX_K, check_item_id, check_job_id, parse_whole
from web.service import PREVIEW_SIDE
from web.service import current_service as service
from web.submit import load_from_request, recommendation_from_request, search_from_request

THUMBNAIL_SIDES = (PREVIEW_SIDE, 640)  # gallery cards, an item's own page
THUMBNAIL_MAX_AGE = 24 * 3600
SIMILAR_SHOWN = 12

# What a person reads for each error code; anything else shows the error's own message.
SENTENCES = {
    ErrorCode.EMPTY: "The file is empty.",
    ErrorCode.NOT_AN_IMAGE: "That file is not an image. Choose a JPEG, PNG, WebP, GIF, BMP or TIFF photo.",
    ErrorCode.UNSUPPORTED_FORMAT: "That kind of image is not accepted. Choose a JPEG, PNG, WebP, GIF, BMP or TIFF "
    "photo.",
    ErrorCode.TRUNCATED: "The image file is incomplete (it ends early). Save it again and retry.",
    ErrorCode.CORRUPT: "The image data is damaged and can't be read.",
    ErrorCode.TOO_LARGE: "That image is too large.",
    ErrorCode.MISSING_IMAGE: "Choose an image first.",
    ErrorCode.NO_WORKER: "No index worker is running, so searches can't be answered right now.",
    ErrorCode.BROKER_UNAVAILABLE: "The queue (Redis) can't be reached right now. Try again in a moment.",
}

pages = Blueprint("pages", __name__)


NAME_FIELDS = ("productDisplayName", "name", "title")
TAG_FIELDS = 4  # short metadata values shown under a product's name
TAG_LENGTH = 24
HIDDEN_FIELDS = {"image", *NAME_FIELDS}


@pages.app_template_global()
def item_title(item: dict[str, Any]) -> str:
    metadata = item.get("metadata", {})
    return next((str(metadata[field]) for field in NAME_FIELDS if metadata.get(field)), item["id"])


@pages.app_template_global()
def item_tags(item: dict[str, Any]) -> list[str]:
    """A few short metadata values (category, colour, ...), in the catalogue's column order."""
    values = [str(value) for field, value in item.get("metadata", {}).items() if field not in HIDDEN_FIELDS]
    return [value for value in values if len(value) <= TAG_LENGTH][:TAG_FIELDS]


@pages.app_template_global()
def load_percent(job: dict[str, Any]) -> int:
    progress = job["progress"]
    if progress["total"]:
        return int(100 * (progress["done"] + progress["failed"]) / progress["total"])
    return 100 if job["state"] in FINISHED else 0


@pages.app_template_global()
def sentence(error: dict[str, str]) -> str:
    known = SENTENCES.get(error["code"])
    return f"{known} ({error['message']})" if known else error["message"]


@pages.get("/")
def index() -> str:
    return render_template("index.html", **_form_context())


@pages.post("/search")
def search() -> Response:
    return _searched(search_from_request)


@pages.post("/recommend")
def recommend() -> Response:
    """The results page's "more like this" / "less like this", searched again."""
    return _searched(recommendation_from_request)


def _searched(submit: Callable[[], str]) -> Response:
    """303 to the page of the job `submit` queued; the search form again, with the reason, when it refused."""
    try:
        job_id = submit()
    except ApiError as error:
        return _refused("index.html", error, _form_context())
    return redirect(url_for("pages.job", job_id=job_id), 303)


@pages.get("/jobs/<job_id>")
def job(job_id: str) -> str:
    record = present_job(service().job(check_job_id(job_id)))
    error = sentence(record["error"]) if record.get("error") else None
    answers = (record.get("result") or {}).get("results") or []  # a search of several photos: each one's answer
    photo_errors = [sentence(answer["error"]) if "error" in answer else None for answer in answers]
    return render_template("job.html", job=record, error=error, photo_errors=photo_errors, strategies=STRATEGIES)


@pages.get("/jobs/<job_id>/preview.jpg")
def preview(job_id: str) -> Response:
    response = make_response(service().preview(check_job_id(job_id)))
    response.mimetype = "image/jpeg"
    response.cache_control.private = True
    response.cache_control.max_age = THUMBNAIL_MAX_AGE
    return response


@pages.get("/items/<item_id>")
def item(item_id: str) -> str:
    item_id = check_item_id(item_id)
    record = present_item(service().item(item_id))
    answer = service().similar(item_id, SIMILAR_SHOWN, {})
    similar = {**answer, "hits": [present_item(hit) for hit in answer["hits"]]}
    return render_template("item.html", item=record, similar=similar)


@pages.get("/catalog")
def catalog() -> str:
    return render_template("catalog.html", **_catalog_context())


@pages.post("/catalog/key")
def sign_in() -> Response:
    """The API key, once per browser session: then the catalogue form may be used (web.auth)."""
    if not is_the_key(request.form.get("api_key", "")):
        return _refused("catalog.html", unauthorized("that is not the API key"), _catalog_context())
    return sign_in_browser(redirect(url_for("pages.catalog"), 303))


@pages.post("/catalog")
def start_load() -> Response:
    try:
        load_from_request()
    except ApiError as error:
        return _refused("catalog.html", error, _catalog_context())
    return redirect(url_for("pages.catalog"), 303)


@pages.get("/thumbnails/<path:reference>")
def thumbnail(reference: str) -> Response:
    """A catalogue image, small, cached by the browser; only files inside the catalogue areas are readable."""
    side = parse_whole("size", request.args.get("size"), PREVIEW_SIDE, 1, max(THUMBNAIL_SIDES))
    side = side if side in THUMBNAIL_SIDES else PREVIEW_SIDE
    path = service().catalog_image(reference)
    try:
        stat = path.stat()
    except OSError:
        raise not_found(f"no image {reference!r}") from None
    etag = f"{stat.st_mtime_ns:x}-{stat.st_size:x}-{side}"
    fresh = request.if_none_match.contains(etag)
    response = make_response(b"" if fresh else service().thumbnail(path, side), 304 if fresh else 200)
    response.mimetype = "image/jpeg"
    response.set_etag(etag)
    response.cache_control.public = True
    response.cache_control.max_age = THUMBNAIL_MAX_AGE
    return response


def _refused(template: str, error: ApiError, context: dict[str, Any]) -> Response:
    """The form's page again, with the reason in a sentence and the error's status and headers (or JSON, to a client
    that asks for it, as every other error)."""
    if request.accept_mimetypes.best == "application/json":
        raise error
    page = render_template(template, error=sentence(error.as_dict()["error"]), **context)
    return make_response(page, error.status, error.headers)


def _form_context() -> dict[str, Any]:
    return {"health": service().health(), "facets": service().facets(), "default_k": DEFAULT_K, "max_k": MAX_K}


def _catalog_context() -> dict[str, Any]:
    loads = [present_job(load) for load in service().loads()]
    return {"loads": loads, "health": service().health(), "signed_in": browser_signed_in()}
