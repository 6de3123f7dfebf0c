"""A form or API request -> a queued job: the pages and the JSON API submit through these, the same way."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import request
from werkzeug.datastructures import FileStorage, MultiDict

from common.areas import ARCHIVE_SUFFIXES, new_upload_folder
from common.errors import ErrorCode
from common.products import MAX_METADATA_BYTES, ProductError, check_photo_count, parse_metadata
from common.vectors import STRATEGIES
from protocol.client import MAX_SEARCH_PHOTOS
from web.errors import ApiError, bad_parameter
from web.params import check_job_id, parse_crop, parse_filters, parse_k, parse_min_seq
from web.service import current_service as service


def search_from_request() -> str:
    """multipart `image` (repeated: one search of each photo, in one job), `k`, repeated `filter=FIELD=VALUE` and
    `crop=x,y,w,h` (of a single photo) -> a queued search job's id."""
    k = parse_k(request.form.get("k"))
    filters = parse_filters(request.form.getlist("filter"))
    min_seq = parse_min_seq(request.form)
    crop = parse_crop(request.form.get("crop"))
    uploads = [upload for upload in request.files.getlist("image") if upload.filename]
    if not uploads:
        raise ApiError(400, ErrorCode.MISSING_IMAGE, "send the image as the multipart file field `image`")
    if len(uploads) > MAX_SEARCH_PHOTOS:
        raise bad_parameter(f"a search takes at most {MAX_SEARCH_PHOTOS} photos (`image` fields), not {len(uploads)}")
    if crop and len(uploads) > 1:
        raise bad_parameter("`crop` names a part of one photo: send it with a single `image`")
    # One byte past the cap is enough to know the upload is over it.
    photos = [upload.read(service().settings.max_upload + 1) for upload in uploads]
    if len(photos) == 1:
        return service().submit_search(photos[0], k, filters, min_seq, crop)
    return service().submit_search_of_photos(photos, k, filters, min_seq)


def recommendation_from_request() -> str:
    """Form or JSON: `positive` and `negative` product ids (repeated), multipart `positive_image` and
    `negative_image` photos (repeated), `from_job` (a search whose photo is one more positive example), `k`,
    `filter`, `strategy`, `min_seq` -> a queued recommendation's job id."""
    fields = request_fields()
    k = parse_k(fields.get("k"))
    filters = parse_filters(fields.getlist("filter"))
    min_seq = parse_min_seq(fields)
    strategy = fields.get("strategy") or STRATEGIES[0]
    limit = service().settings.max_upload + 1  # one byte past the cap is enough to know a photo is over it
    shopper = [service().preview(check_job_id(fields["from_job"]))] if fields.get("from_job") else []
    positive = [*shopper, *(_photos("positive_image", limit)), *[text for text in fields.getlist("positive") if text]]
    negative = [*(_photos("negative_image", limit)), *[text for text in fields.getlist("negative") if text]]
    return service().submit_recommendation(positive, negative, k, filters, strategy, min_seq)


def request_fields() -> MultiDict[str, str]:
    """The request's fields: its form, or its JSON object (a list value is a repeated field)."""
    if not request.is_json:
        return request.form
    body = json_body()
    if not isinstance(body, dict):
        raise bad_parameter('the JSON body must be an object like {"positive": ["15970"], "k": 5}')
    fields: MultiDict[str, str] = MultiDict()
    for name, value in body.items():
        for each in value if isinstance(value, list) else [value]:
            if not isinstance(each, str | int | float) or isinstance(each, bool):
                raise bad_parameter(f"`{name}` must be text or a number, or a list of them")
            fields.add(name, str(each))
    return fields


def json_body() -> Any:
    """The request's JSON, None when it is not JSON; 400 for JSON nested past what Python parses (a RecursionError,
    which get_json's `silent` does not cover)."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        raise bad_parameter("the JSON body is nested too deeply") from None


def _photos(name: str, limit: int) -> list[bytes]:
    return [upload.read(limit) for upload in request.files.getlist(name) if upload.filename]


def load_from_request() -> str:
    """An uploaded archive (+ optional CSV), or `source` (+ optional `metadata`) under the catalogue root."""
    fields = json_body() if request.is_json else request.form
    if not isinstance(fields, Mapping):
        raise bad_parameter('the JSON body must be an object like {"source": "fashion"}')
    archive, csv_file = _upload("archive"), _upload("csv")
    source, metadata = (_text_field(fields, name) for name in ("source", "metadata"))
    if archive and source:
        raise bad_parameter("give an archive or a source folder, not both")
    if csv_file and metadata:
        raise bad_parameter("give a CSV file or a metadata path, not both")
    if not archive and not source:
        raise bad_parameter(
            "upload a catalogue archive (`archive`: .tar, .tar.gz or .tgz, optionally with a `csv`), "
            "or name a CSV, folder or archive under the catalogue root (`source`)"
        )
    if archive and not archive.filename.lower().endswith(ARCHIVE_SUFFIXES):
        raise bad_parameter(f"the archive must be a {', '.join(ARCHIVE_SUFFIXES)} file, not {archive.filename!r}")
    if csv_file and not csv_file.filename.lower().endswith(".csv"):
        raise bad_parameter(f"the metadata file must be a .csv file, not {csv_file.filename!r}")
    # Named paths are checked before anything is saved; saved uploads go again if the load can't be queued.
    source_path = None if archive else service().catalog_path(source)
    metadata_path = service().catalog_path(metadata) if metadata else None
    folder = new_upload_folder(service().settings)
    try:
        saved = _save_uploads(folder, catalog=archive, metadata=csv_file)
        return service().submit_load(saved.get("catalog") or source_path, saved.get("metadata") or metadata_path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def product_from_request(item_id: str) -> str:
    """A product, whole: repeated multipart file field `photo` (1 to LOOKALIKE_MAX_PHOTOS, the main one first) and
    `metadata`, a JSON object of fields (a text field, or a file) -> the queued load of that one product. Everything
    is checked before anything is kept or queued."""
    if "photo" in request.form:
        raise ApiError(400, ErrorCode.MISSING_IMAGE, "send each photo as a file in the multipart field `photo`")
    uploads = [upload for upload in request.files.getlist("photo") if upload.filename]
    if not uploads:
        raise ApiError(
            400,
            ErrorCode.MISSING_IMAGE,
            "send the product's photos as the multipart file field `photo`, repeated, the main one first",
        )
    try:
        check_photo_count(len(uploads), service().settings)
        text = _metadata_text()
        metadata = parse_metadata(text) if text.strip() else {}
    except ProductError as error:
        raise bad_parameter(str(error)) from error
    # One byte past the cap is enough to know a photo is over it.
    photos = [(upload.filename or "", upload.read(service().settings.max_upload + 1)) for upload in uploads]
    return service().submit_product(item_id, photos, metadata)


def _metadata_text() -> str:
    """The `metadata` field's text, sent as a form field or as a (JSON) file; "" when not sent."""
    texts, files = request.form.getlist("metadata"), [f for f in request.files.getlist("metadata") if f.filename]
    if len(texts) + len(files) > 1:
        raise bad_parameter("send `metadata` once: one JSON object of the product's fields")
    if not files:
        return texts[0] if texts else ""
    data = files[0].read(MAX_METADATA_BYTES + 1)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise bad_parameter("the metadata file is not UTF-8 text (JSON)") from None


def _text_field(fields: Mapping[str, Any], name: str) -> str:
    value = fields.get(name) or ""
    if not isinstance(value, str):
        raise bad_parameter(f"`{name}` must be a path as text, relative to the catalogue root")
    return value.strip()


def _upload(name: str) -> FileStorage | None:
    upload = request.files.get(name)
    return upload if upload is not None and upload.filename else None


def _save_uploads(folder: Path, **uploads: FileStorage | None) -> dict[str, Path]:
    """Each upload saved in `folder` under our own name (a client's file name is never a path here)."""
    present = {stem: upload for stem, upload in uploads.items() if upload is not None}
    if not present:
        return {}
    folder.mkdir(parents=True)
    saved = {}
    for stem, upload in present.items():
        name = (upload.filename or "").lower()
        suffix = next((s for s in (*ARCHIVE_SUFFIXES, ".csv") if name.endswith(s)), "")
        saved[stem] = folder / f"{stem}{suffix}"
        upload.save(saved[stem])
    return saved
