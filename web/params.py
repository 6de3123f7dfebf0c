"""Request parameters, checked: top-N, metadata filters, job and item ids."""

from __future__ import annotations

import re
from collections.abc import Iterable

from web.errors import bad_parameter, not_found

DEFAULT_K = 5
MAX_K = 100
MAX_FILTERS = 20
MAX_FIELD_LENGTH = 200
JOB_ID = re.compile(r"[0-9a-f]{32}")


def parse_k(value: str | None, default: int = DEFAULT_K) -> int:
    """How many results: a whole number from 1 to MAX_K (empty: the default)."""
    if value is None or value.strip() == "":
        return default
    try:
        k = int(value)
    except ValueError:
        raise bad_parameter(f"k must be a whole number from 1 to {MAX_K}, not {value[:40]!r}") from None
    if not 1 <= k <= MAX_K:
        raise bad_parameter(f"k must be from 1 to {MAX_K}, not {k}")
    return k


def parse_filters(values: Iterable[str]) -> dict[str, str]:
    """`FIELD=VALUE` pairs (metadata must equal each); empty values, as an unset form select sends, are ignored."""
    filters: dict[str, str] = {}
    for text in values:
        if not text:
            continue
        field, separator, value = text.partition("=")
        field = field.strip()
        if not separator or not field:
            raise bad_parameter(f"filter {text[:60]!r}: expected FIELD=VALUE")
        if len(field) > MAX_FIELD_LENGTH or len(value) > MAX_FIELD_LENGTH:
            raise bad_parameter(f"filter {text[:60]!r}: fields and values are at most {MAX_FIELD_LENGTH} characters")
        if field in filters and filters[field] != value:
            raise bad_parameter(f"filter field {field!r} is given twice with different values")
        filters[field] = value
    if len(filters) > MAX_FILTERS:
        raise bad_parameter(f"at most {MAX_FILTERS} filters")
    return filters


def check_item_id(item_id: str) -> str:
    if not item_id or len(item_id) > MAX_FIELD_LENGTH or not item_id.isprintable():
        raise bad_parameter(f"item ids are 1 to {MAX_FIELD_LENGTH} printable characters")
    return item_id


def check_job_id(job_id: str) -> str:
    """Job ids are 32 hex digits; anything else can't be a job (404, as for an expired one)."""
    if not JOB_ID.fullmatch(job_id):
        raise not_found(f"no job with id {job_id[:40]!r}")
    return job_id
