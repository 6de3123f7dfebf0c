"""The JSON API under /api: searches and jobs, catalogue loads, items. Documented in openapi.json; the app checks
every write's key before its view runs (web.auth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from flask import Blueprint, Response, g, jsonify, request, send_file, url_for

from protocol.jobs import ERROR_PAGE
from web.params import check_item_id, check_job_id, parse_filters, parse_k, parse_min_seq, parse_wait, parse_whole
from web.service import LOADS_SHOWN
from web.service import current_service as service
from web.submit import (
    load_from_request,
    product_from_request,
    recommendation_from_request,
    request_fields,
    search_from_request,
)

OPENAPI = Path(__file__).with_name("openapi.json")
MAX_ERROR_PAGE = 500
MAX_ERRORS_OFFSET = 100_000_000
MAX_LOADS = 100
LINK_MARK = "LINK-MARK"  # where a link's value goes in its route's URL
PATH_SEGMENT_SAFE = "!$&'()*+,/:;=@"  # what werkzeug's converters leave unquoted in a URL path
LOAD_FILES = ("source", "metadata")  # a load's params that are server paths, shown as catalogue references

api = Blueprint("api", __name__, url_prefix="/api")


@api.post("/search")
def search() -> tuple[Response, int, dict[str, str]]:
    """202 and the job to follow; with `wait`, 200 and the finished job when it finishes within the wait."""
    seconds = parse_wait(request.values.get("wait"))
    return answered(search_from_request(), seconds)


@api.post("/recommend")
def recommend() -> tuple[Response, int, dict[str, str]]:
    """The products most like the positive examples and least like the negative ones: a job, as a search is."""
    seconds = parse_wait(request.args.get("wait") or request_fields().get("wait"))
    return answered(recommendation_from_request(), seconds)


@api.get("/jobs/<job_id>")
def job(job_id: str) -> Response:
    offset = parse_whole("errors_offset", request.args.get("errors_offset"), 0, 0, MAX_ERRORS_OFFSET)
    limit = parse_whole("errors_limit", request.args.get("errors_limit"), ERROR_PAGE, 0, MAX_ERROR_PAGE)
    seconds = parse_wait(request.args.get("wait"))
    return jsonify(present_job(service().finished_job(check_job_id(job_id), seconds, offset, limit)))


@api.post("/catalog/loads")
def start_load() -> tuple[Response, int, dict[str, str]]:
    return accepted(load_from_request())


@api.get("/catalog/loads")
def loads() -> Response:
    limit = parse_whole("limit", request.args.get("limit"), LOADS_SHOWN, 1, MAX_LOADS)
    return jsonify({"loads": [present_job(load) for load in service().loads(limit)]})


@api.get("/items/<item_id>")
def item(item_id: str) -> Response:
    return jsonify(present_item(service().item(check_item_id(item_id), parse_min_seq(request.args))))


@api.get("/items/<item_id>/similar")
def similar(item_id: str) -> Response:
    k = parse_k(request.args.get("k"))
    filters = parse_filters(request.args.getlist("filter"))
    answer = service().similar(check_item_id(item_id), k, filters, parse_min_seq(request.args))
    return jsonify({"id": item_id, **answer, "hits": [present_item(hit) for hit in answer["hits"]]})


@api.delete("/items/<item_id>")
def delete(item_id: str) -> tuple[Response, int]:
    answer = service().delete(check_item_id(item_id))
    if answer is not None:
        return jsonify({"deleted": item_id, "seq": answer["seq"]}), 200
    message = "the index worker is busy: the delete is queued and will be applied"
    return jsonify({"queued": item_id, "message": message}), 202


@api.put("/items/<item_id>")
def put_item(item_id: str) -> tuple[Response, int, dict[str, str]]:
    """Add or replace a product, whole (its photos and metadata): 202 and its load to follow; with `wait`, 200 and
    the finished load, whose `seq` a read can wait for, when it finishes within the wait."""
    check_item_id(item_id)
    seconds = parse_wait(request.values.get("wait"))
    return answered(product_from_request(item_id), seconds)


@api.get("/openapi.json")
def openapi() -> Response:
    return send_file(OPENAPI, mimetype="application/json")


def answered(job_id: str, seconds: int) -> tuple[Response, int, dict[str, str]]:
    """200 and the finished job when it finishes within `seconds`, else 202 and where to follow it."""
    if seconds and service().wait_for(job_id, seconds):  # queued this instant: no need to read it before the wait
        return (
            jsonify(present_job(service().job_made_here(job_id))),
            200,
            {"Location": url_for("api.job", job_id=job_id)},
        )
    return accepted(job_id)


def accepted(job_id: str) -> tuple[Response, int, dict[str, str]]:
    """202 with where to follow the job: its JSON record and its page."""
    status_url = url_for("api.job", job_id=job_id)
    body = {"job_id": job_id, "status_url": status_url, "page_url": url_for("pages.job", job_id=job_id)}
    return jsonify(body), 202, {"Location": status_url}


def present_job(job: dict[str, Any]) -> dict[str, Any]:
    """A job record for clients: search hits with their links, a load's files as catalogue references."""
    if job["kind"] == "search" and job.get("result"):
        job["result"] = present_answer(job["result"])
    if job["kind"] == "load":
        params = job["params"]
        job["params"] = {name: service().reference(value) if name in LOAD_FILES else value
                         for name, value in params.items()}  # fmt: skip
        if params.get("item") is not None:  # a product sent on its own (PUT /api/items/<id>)
            job["item_url"] = url_for("api.item", item_id=params["item"])
    return job


def present_answer(answer: dict[str, Any]) -> dict[str, Any]:
    """A search's answer with its hits' links; of several photos, each photo's answer (or its error)."""
    if "results" in answer:
        return {**answer, "results": [present_answer(each) for each in answer["results"]]}
    return {**answer, "hits": [present_item(hit) for hit in answer["hits"]]} if "hits" in answer else answer


def present_item(item: dict[str, Any]) -> dict[str, Any]:
    """An item or a hit with its links: its page, and its photos' thumbnails (a hit's matched photo first)."""
    photos = list(item.get("photos") or [item.get("metadata", {}).get("image")])
    matched = item.get("photo", 0)
    if 0 < matched < len(photos):
        photos.insert(0, photos.pop(matched))
    photos = [reference for reference in photos if reference]
    links = {"item_url": link("api.item", item_id=item["id"]), "page_url": link("pages.item", item_id=item["id"])}
    if photos:
        links["photo_urls"] = [link("pages.thumbnail", reference=reference) for reference in photos]
        links["thumbnail_url"] = links["photo_urls"][0]
    return {**item, **links}


def link(endpoint: str, **argument: str) -> str:
    """The URL of a route that takes one value (an item id, an image reference): the route's URL is built once per
    request and the value quoted into it as werkzeug quotes a path segment (url_for for every link of every hit
    was a tenth of the web's CPU a search)."""
    ((name, value),) = argument.items()
    templates = g.setdefault("link_templates", {})
    template = templates.get(endpoint)
    if template is None:
        template = templates[endpoint] = url_for(endpoint, **{name: LINK_MARK})
    return template.replace(LINK_MARK, quote(str(value), safe=PATH_SEGMENT_SAFE))
