"""`FIELD=VALUE` filters: one parser, the same rules and caps for the web and the CLI."""

from __future__ import annotations

import pytest

from common.filters import MAX_FIELD_LENGTH, MAX_FILTERS, FilterError, parse_filters


def test_pairs_become_a_mapping_and_empty_values_are_ignored():
    assert parse_filters(["gender=Women", "", " usage =Casual", "name=a=b"]) == {
        "gender": "Women",
        "usage": "Casual",
        "name": "a=b",
    }
    assert parse_filters(["gender=Women", "gender=Women"]) == {"gender": "Women"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["gender"], "expected FIELD=VALUE"),
        (["=Women"], "expected FIELD=VALUE"),
        ([f"{'f' * (MAX_FIELD_LENGTH + 1)}=x"], f"at most {MAX_FIELD_LENGTH} characters"),
        ([f"f=x{'v' * MAX_FIELD_LENGTH}"], f"at most {MAX_FIELD_LENGTH} characters"),
        (["gender=Women", "gender=Men"], "given twice with different values"),
        ([f"field{n}=x" for n in range(MAX_FILTERS + 1)], f"at most {MAX_FILTERS} filters"),
    ],
)
def test_a_filter_that_breaks_a_rule_is_refused_in_one_sentence(values, message):
    with pytest.raises(FilterError, match=message):
        parse_filters(values)
