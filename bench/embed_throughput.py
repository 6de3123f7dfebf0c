"""Embedding throughput of one ResNet50 graph, the tutorial's way and lookalike's ways, measured in one run.

    .venv/bin/python bench/embed_throughput.py [--images DIR] [--weights none|PATH] [--seconds 8]

(a) Keras `predict` one image per call (the tutorial), (b) Keras predict in batches of 32, (c) onnxruntime fp32 at
batch 1, 8 and 32, (d) onnxruntime static INT8; all on the same decoded images, each as a ratio to (a).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.model import load_model
from export.exporter import export_resnet50
from export.images import list_images, load_images
from export.progress import Progress
from export.quantize import quantize_int8

DEFAULT_IMAGES = Path(os.environ.get("LOOKALIKE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
DEFAULT_IMAGES = DEFAULT_IMAGES / "data" / "fashion" / "images"


def images_per_second(embed: Callable[[np.ndarray], object], images: np.ndarray, batch: int, seconds: float) -> float:
    """Embed `images` in batches of `batch` (after one warm-up batch) for at least `seconds`."""
    embed(images[:batch])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for start in range(0, len(images) - batch + 1, batch):
            embed(images[start : start + batch])
            done += batch
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="product photos (shared sample)")
    parser.add_argument("--weights", default="none", help="ResNet50 weights: none (same compute) or a file")
    parser.add_argument("--count", type=int, default=64, help="images embedded by every method")
    parser.add_argument("--seconds", type=float, default=8.0, help="minimum timing per row")
    args = parser.parse_args()

    paths = list_images(args.images)
    work = Path(tempfile.mkdtemp(prefix="lookalike-bench-"))
    calibration = work / "calibration"
    calibration.mkdir()
    for path in paths[-120:]:  # calibrate on images the benchmark does not embed
        (calibration / path.name).symlink_to(path.resolve())
    quiet = Progress(io.StringIO())
    exported = export_resnet50(work / "resnet50_max.onnx", "max", args.weights, progress=quiet)
    quantize_int8(exported.path, work / "resnet50_max_int8.onnx", calibration, 100, 20, quiet)

    fp32 = load_model(exported.path, providers=["cpu"])
    int8 = load_model(work / "resnet50_max_int8.onnx", providers=["cpu"])
    images, _ = load_images(paths[: args.count], fp32.contract.size)

    def keras_predict(batch: np.ndarray) -> object:
        return exported.keras_model.predict(batch, batch_size=len(batch), verbose=0)

    rows = [("(a) Keras predict, one image per call (tutorial)", 1, keras_predict)]
    rows.append(("(b) Keras predict", 32, keras_predict))
    rows += [("(c) onnxruntime fp32", batch, fp32.embed) for batch in (1, 8, 32)]
    rows += [("(d) onnxruntime static INT8", batch, int8.embed) for batch in (1, 32)]
    results = [(label, batch, images_per_second(run, images, batch, args.seconds)) for label, batch, run in rows]

    baseline = results[0][2]
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    machine = f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"\nResNet50 + max pooling, 224x224, {len(images)} product photos; {machine}\n")
    print("| method | batch | images/s | vs (a) |")
    print("| --- | ---: | ---: | ---: |")
    for label, batch, rate in results:
        print(f"| {label} | {batch} | {rate:.1f} | {rate / baseline:.1f}x |")
    best_fp32 = max(rate for label, _, rate in results if label.startswith("(c)"))
    best_int8 = max(rate for label, _, rate in results if label.startswith("(d)"))
    print(f"\nbest onnxruntime fp32 / (a): {best_fp32 / baseline:.1f}x (expected >= 4x)")
    print(f"best INT8 / best fp32: {best_int8 / best_fp32:.1f}x (expected >= 2.5x)")


if __name__ == "__main__":
    main()
