"""An evaluation's figures for people (Markdown tables, the weakest label values) and for programs (JSON)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

from worker.evaluation.run import Evaluation


def markdown(evaluations: Sequence[Evaluation]) -> str:
    """Quality per setting and label, then the index against exact search, as Markdown tables."""
    lines = [
        "| setting | label | queries | P@1 | P@5 | P@10 | mAP@10 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for evaluation in evaluations:
        for quality in evaluation.labels:
            p = quality.precision
            lines.append(
                f"| {evaluation.name} | {quality.label} | {quality.queries:,} | {p.get(1, 0):.3f} | "
                f"{p.get(5, 0):.3f} | {p.get(10, 0):.3f} | {quality.map_at_10:.3f} |"
            )
    lines += ["", "| setting | index | recall@10 | queries/s | MiB |", "| --- | --- | ---: | ---: | ---: |"]
    for evaluation in evaluations:
        lines += [
            f"| {evaluation.name} | {row['index']} | {row['recall@10']:.3f} | {row['queries/s']:,} | "
            f"{row['MiB']:,.1f} |"
            for row in evaluation.ann
        ]
    return "\n".join(lines) + "\n"


def weakest_values(evaluations: Sequence[Evaluation]) -> Iterator[str]:
    """A line per setting and label: the label values with the lowest precision@5."""
    for evaluation in evaluations:
        for quality in evaluation.labels:
            worst = ", ".join(f"{entry['value']} {entry['precision@5']:.2f}" for entry in quality.worst)
            yield f"{evaluation.name} / {quality.label}, lowest precision@5: {worst}"


def unused_labels(evaluations: Sequence[Evaluation]) -> Iterator[str]:
    """A warning for each label no query could be judged on (a misspelt column, most likely)."""
    for label in sorted({quality.label for evaluation in evaluations for quality in evaluation.labels
                         if not quality.queries}):  # fmt: skip
        yield f"no query has a {label!r} another item shares: is it a column of the catalogue's CSV (or --metadata)?"


def as_json(evaluations: Sequence[Evaluation]) -> str:
    """Every figure: one entry per setting, with `labels: [{label, precision@5, ...}]` and `ann`."""
    return json.dumps([evaluation.as_dict() for evaluation in evaluations], indent=2) + "\n"
