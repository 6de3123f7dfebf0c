"""Progress lines with timings for the slow steps of an export."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    """Prints `label ...` when a step starts and `label: done in 1.2 s (detail)` when it ends."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.timings: dict[str, float] = {}

    def say(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    @contextmanager
    def step(self, label: str) -> Iterator[dict[str, str]]:
        """Time a step; the caller may set `detail` in the yielded dict to add it to the closing line."""
        self.say(f"{label} ...")
        note: dict[str, str] = {}
        started = time.perf_counter()
        yield note
        elapsed = time.perf_counter() - started
        self.timings[label] = round(elapsed, 2)
        detail = f" ({note['detail']})" if note.get("detail") else ""
        self.say(f"{label}: done in {elapsed:.1f} s{detail}")
