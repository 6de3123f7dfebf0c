"""Metadata filters, `FIELD=VALUE`: one parser with one set of rules and caps for the web and the CLI."""

from __future__ import annotations

from collections.abc import Iterable

from common.errors import LookalikeError

MAX_FILTERS = 20
MAX_FIELD_LENGTH = 200  # a field or a value


class FilterError(LookalikeError):
    """A filter that can't be used; the web answers 400 `bad_parameter` with this sentence."""


def parse_filters(values: Iterable[str]) -> dict[str, str]:
    """`FIELD=VALUE` pairs (metadata must equal each); empty values, as an unset form select sends, are ignored."""
    filters: dict[str, str] = {}
    for text in values:
        if not text:
            continue
        field, separator, value = text.partition("=")
        field = field.strip()
        if not separator or not field:
            raise FilterError(f"filter {text[:60]!r}: expected FIELD=VALUE")
        if len(field) > MAX_FIELD_LENGTH or len(value) > MAX_FIELD_LENGTH:
            raise FilterError(f"filter {text[:60]!r}: fields and values are at most {MAX_FIELD_LENGTH} characters")
        if field in filters and filters[field] != value:
            raise FilterError(f"filter field {field!r} is given twice with different values")
        filters[field] = value
    if len(filters) > MAX_FILTERS:
        raise FilterError(f"at most {MAX_FILTERS} filters")
    return filters


def unknown_field(filters: Iterable[str], fields: Iterable[str]) -> str | None:
    """Why a filter can't be used on a catalogue whose items have `fields`: its field is none of them (else None)."""
    known = sorted(fields)
    unknown = sorted(set(filters) - set(known))
    if not unknown:
        return None
    return f"no item has the field {unknown[0]!r}; filter by one of: {', '.join(known) or 'none, no item has metadata'}"
