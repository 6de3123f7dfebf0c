"""Request parameters, checked: top-N, metadata filters, a crop box, job and item ids."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from common import filters
from common.areas import id_problem
from common.images import Crop
from web.errors import bad_parameter, not_found

DEFAULT_K = 5
MAX_K = 100
MAX_WAIT_SECONDS = 10  # a request that waits for its job holds one of the web's waiting threads (LOOKALIKE_WEB_WAITING)
JOB_ID = re.compile(r"[0-9a-f]{32}")
MAX_SEQ = 10**18 - 1
DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() also takes "²", which int() refuses
CROP = re.compile(r"\s*(-?[0-9]{1,9})\s*,\s*(-?[0-9]{1,9})\s*,\s*(-?[0-9]{1,9})\s*,\s*(-?[0-9]{1,9})\s*")


def parse_whole(name: str, value: str | None, default: int, minimum: int, maximum: int) -> int:
    """A whole number from `minimum` to `maximum`; missing or empty: the default."""
    if value is None or value.strip() == "":
        return default
    if not DIGITS.fullmatch(value.strip()) or not minimum <= int(value) <= maximum:
        raise bad_parameter(f"{name} must be a whole number from {minimum} to {maximum}, not {value[:40]!r}")
    return int(value)


def parse_wait(value: str | None) -> int:
    """`wait`: seconds a request may wait for its job to finish, 0 to MAX_WAIT_SECONDS (0: answer at once)."""
    return parse_whole("wait", value, 0, 0, MAX_WAIT_SECONDS)


def parse_k(value: str | None) -> int:
    """How many results: 1 to MAX_K, DEFAULT_K when not given."""
    return parse_whole("k", value, DEFAULT_K, 1, MAX_K)


def parse_min_seq(fields: Mapping[str, str]) -> int:
    """`min_seq`: the sequence number a write answered with; the read then sees that write (0: any reader)."""
    return parse_whole("min_seq", fields.get("min_seq"), 0, 0, MAX_SEQ)


def parse_crop(value: str | None) -> Crop | None:
    """`crop=x,y,w,h`: the part of the upload to search, in its pixels as shown (after its EXIF orientation); None
    when not given. Whether it lies inside the image, and is large enough, is known once the image is decoded."""
    if value is None or value.strip() == "":
        return None
    match = CROP.fullmatch(value)
    if not match:
        raise bad_parameter(f"crop must be four whole numbers x,y,w,h in pixels of the image, not {value[:40]!r}")
    crop = Crop(*map(int, match.groups()))
    if crop.width <= 0 or crop.height <= 0:
        raise bad_parameter(f"the crop box's width and height must be positive, not {crop.width}x{crop.height}")
    if crop.x < 0 or crop.y < 0:
        raise bad_parameter(f"the crop box starts outside the image, at {crop.x},{crop.y}: x and y are 0 or more")
    return crop


def parse_filters(values: Iterable[str]) -> dict[str, str]:
    """The request's `filter` values (see `common.filters`), a 400 when one breaks the rules."""
    try:
        return filters.parse_filters(values)
    except filters.FilterError as error:
        raise bad_parameter(str(error)) from None


def check_item_id(item_id: str) -> str:
    """An id a load accepts (`common.areas.id_problem`); no item has any other, so it is a 400 naming the rule."""
    if problem := id_problem(item_id):
        raise bad_parameter(problem)
    return item_id


def check_job_id(job_id: str) -> str:
    """Job ids are 32 hex digits; anything else can't be a job (404, as for an expired one)."""
    if not JOB_ID.fullmatch(job_id):
        raise not_found(f"no job with id {job_id[:40]!r}")
    return job_id
