"""The label columns `lookalike tune` and `lookalike evaluate --calibrate` learn from, checked on a catalogue's plan
(before anything is embedded or trained): a label no item has is most likely a misspelt column."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from common.errors import UsageError

COLUMNS_SHOWN = 8


def label_values(label: str, metadata: Sequence[dict[str, Any]]) -> Counter[str]:
    """How many items have each value of `label` (an item without one counts for none)."""
    return Counter(str(item[label]) for item in metadata if item.get(label) not in (None, ""))


def require_label(label: str, metadata: Sequence[dict[str, Any]], where: str) -> Counter[str]:
    """`label_values`, or UsageError naming the columns `where` (the catalogue, the queries) has when no item has it."""
    values = label_values(label, metadata)
    if values:
        return values
    columns = list(dict.fromkeys(column for item in metadata for column in item))
    if not columns:
        raise UsageError(f"label {label!r} is in no item of {where}: it has no label columns; give it a CSV with an "
                         "id column and one per label")  # fmt: skip
    shown = ", ".join(columns[:COLUMNS_SHOWN]) + (", ..." if len(columns) > COLUMNS_SHOWN else "")
    raise UsageError(f"label {label!r} is in no item of {where}: name one of its columns ({shown})")
