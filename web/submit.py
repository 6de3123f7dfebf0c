"""A form or API request -> a queued job: the pages and the JSON API submit through these, the same way."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import request
from werkzeug.datastructures import FileStorage

from common.areas import ARCHIVE_SUFFIXES, new_upload_folder
from common.errors import ErrorCode
from web.errors import ApiError, bad_parameter
from web.params import parse_crop, parse_filters, parse_k, parse_min_seq
from web.service import current_service as service


def search_from_request() -> str:
    """multipart `image`, `k`, repeated `filter=FIELD=VALUE` and `crop=x,y,w,h` -> a queued search job's id."""
    k = parse_k(request.form.get("k"))
    filters = parse_filters(request.form.getlist("filter"))
    min_seq = parse_min_seq(request.form)
    crop = parse_crop(request.form.get("crop"))
    upload = request.files.get("image")
    if upload is None or not upload.filename:
        raise ApiError(400, ErrorCode.MISSING_IMAGE, "send the image as the multipart file field `image`")
    # One byte past the cap is enough to know the upload is over it.
    data = upload.read(service().settings.max_upload + 1)
    return service().submit_search(data, k, filters, min_seq, crop)


def load_from_request() -> str:
    """An uploaded archive (+ optional CSV), or `source` (+ optional `metadata`) under the catalogue root."""
    fields = request.get_json(silent=True) if request.is_json else request.form
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
