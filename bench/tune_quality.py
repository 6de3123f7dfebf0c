"""Raw against tuned: new photos searched against the catalogue, per label, for each model given (fp32, INT8).

    .venv/bin/python bench/tune_quality.py --model ../shared/models/efficientnet_lite0_max.onnx \
        --model models/efficientnet_lite0_max_int8.onnx --weight articleType=3 --work /tmp/tune-bench

A tenth of the products (by id hash, the other end of the range from the products `lookalike tune` holds out for
its gate) is split off the catalogue as the new photos; `lookalike tune` runs on the rest, as a user runs it (with
this script's `--weight`s), and is timed. Both models then answer the new photos against the rest by
exact cosine (`worker.evaluation.run.evaluate`, as `lookalike evaluate --queries` does). Embeddings come from the
cache `lookalike tune` keeps (LOOKALIKE_DATA_DIR/cache), so only a model's first run embeds; the tuned vectors are
its own head (the graph's nodes after the backbone, run in onnxruntime) applied to the backbone's vectors, which is
what the tuned model computes (its card's parity, measured at write time, says within how much).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from chaos import cpu_model

from common.areas import resolve_reference
from common.model import load_model
from common.settings import CORES, Settings
from common.vectors import unit_rows
from export.tune import BACKBONE_OUTPUT
from lookalike.stack import LOOKALIKE
from lookalike.tune_cli import held_out, subset
from worker.evaluation.cache import EmbeddingCache
from worker.evaluation.run import Embeddings, embed_catalog, evaluate

SHARED = Path(os.environ.get("LOOKALIKE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
LABELS = ("articleType", "baseColour", "gender")
NEW_PHOTOS_SHARE = 0.1


def new_photos(catalogue: Embeddings, share: float) -> np.ndarray:
    """The products split off as new photos: the top `share` of the id-hash range (tune's gate takes the bottom)."""
    return np.array([not held_out(item_id, 1 - share) for item_id in catalogue.ids], dtype=bool)


def write_catalogue_csv(settings: Settings, catalogue: Embeddings, path: Path) -> None:
    """The products tune may learn from, as a catalogue CSV naming each image where it is."""
    columns = sorted({key for metadata in catalogue.metadata for key in metadata} - {"image"})
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "image", *columns])
        for item_id, metadata in zip(catalogue.ids, catalogue.metadata, strict=True):
            area, _, relative = metadata["image"].partition("/")
            image = resolve_reference(settings, area, relative)
            writer.writerow([item_id, image, *(metadata.get(column, "") for column in columns)])


def head_session(tuned: Path) -> ort.InferenceSession:
    """The tuned model's head alone: its nodes from the backbone's output to the embedding."""
    with tempfile.TemporaryDirectory() as folder:
        head = Path(folder) / "head.onnx"
        onnx.utils.extract_model(str(tuned), str(head), [BACKBONE_OUTPUT], [onnx.load(str(tuned)).graph.output[0].name])
        return ort.InferenceSession(str(head), providers=["CPUExecutionProvider"])


def through_head(session: ort.InferenceSession, embeddings: Embeddings) -> Embeddings:
    (vectors,) = session.run(None, {session.get_inputs()[0].name: embeddings.vectors.astype(np.float32)})
    return dataclasses.replace(embeddings, vectors=unit_rows(np.asarray(vectors)))


def precision_at_5(catalogue: Embeddings, queries: Embeddings, labels: list[str]) -> dict[str, float]:
    return {quality.label: round(quality.precision[5], 4) for quality in evaluate(catalogue, labels, queries).labels}


def measure(settings: Settings, model_path: Path, args: argparse.Namespace) -> dict:
    model = load_model(model_path, ["cpu"], intra_op_threads=CORES)
    cache = EmbeddingCache(settings.data_dir, model.sha256, settings.resize)
    catalogue = embed_catalog(settings, model, args.catalog.resolve(), args.metadata, cache=cache)
    print(f"{model_path.name}: {len(catalogue.ids):,} items ({catalogue.embedded:,} embedded now) in "
          f"{catalogue.seconds:.0f} s", file=sys.stderr)  # fmt: skip
    asked = new_photos(catalogue, args.share)
    rest, queries = subset(catalogue, ~asked), subset(catalogue, asked)
    rest_csv = args.work / "catalogue-without-new-photos.csv"
    write_catalogue_csv(settings, rest, rest_csv)
    tuned = args.work / f"{model_path.stem}_tuned.onnx"
    labels = [argument for label in args.label for argument in ("--label", label)]
    started = time.perf_counter()
    subprocess.run([LOOKALIKE, "tune", "--model", model_path, "--catalog", rest_csv, *labels, *args.tune_options,
                    "--out", tuned],
                   check=True, env={**os.environ, "LOOKALIKE_DATA_DIR": str(settings.data_dir)})  # fmt: skip
    tune_seconds = time.perf_counter() - started
    head = head_session(tuned)
    return {
        "model": model_path.name,
        "catalogue": len(rest.ids),
        "new_photos": len(queries.ids),
        "raw": precision_at_5(rest, queries, args.label),
        "tuned": precision_at_5(through_head(head, rest), through_head(head, queries), args.label),
        "tune_seconds": round(tune_seconds, 1),
        "cpu": f"{cpu_model()}, {CORES} cores",
        "tuned_card": json.loads(tuned.with_suffix(".json").read_text()),
    }


def markdown(rows: list[dict], labels: list[str]) -> str:
    header = " | ".join(f"{label} P@5 raw / tuned" for label in labels)
    lines = [f"| model | catalogue | new photos | {header} | tune (s) |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in labels) + " | ---: |"]  # fmt: skip
    for row in rows:
        cells = " | ".join(f"{row['raw'][label]:.3f} / {row['tuned'][label]:.3f}" for label in labels)
        lines.append(f"| {row['model']} | {row['catalogue']:,} | {row['new_photos']:,} | {cells} | "
                     f"{row['tune_seconds']:,.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", help="models to tune and compare (default: shared)")
    parser.add_argument("--catalog", type=Path, default=SHARED / "data" / "fashion-catalog.tar.gz")
    parser.add_argument("--metadata", type=Path, default=SHARED / "data" / "fashion" / "styles.csv")
    parser.add_argument("--label", action="append", help=f"labels to tune and judge (default: {', '.join(LABELS)})")
    parser.add_argument("--weight", action="append", default=[], metavar="LABEL=W", help="passed on to tune")
    parser.add_argument("--share", type=float, default=NEW_PHOTOS_SHARE, help="share of products split off")
    parser.add_argument("--work", type=Path, required=True, help="a folder for the CSV and the tuned models")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    args.label = args.label or list(LABELS)
    args.tune_options = [argument for weight in args.weight for argument in ("--weight", weight)]
    args.work.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env({"LOOKALIKE_CATALOG_ROOT": "/", **os.environ})
    rows = [measure(settings, path, args) for path in args.model or [SHARED / "models" / "efficientnet_lite0_max.onnx"]]
    print(markdown(rows, args.label))
    print(f"tuned with tune's defaults and {' '.join(args.tune_options) or 'no options'} on {rows[0]['cpu']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
