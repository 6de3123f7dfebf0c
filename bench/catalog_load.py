"""A catalogue load through the queue versus raw onnxruntime, and search latency idle and during that load.

    .venv/bin/python bench/catalog_load.py [--archive ...fashion-catalog.tar.gz] [--model M.onnx]

Starts its own Redis and the workers `lookalike up` starts (the index owner, a replica, a query process, an embed
worker) on this machine and loads the archive with styles.csv as metadata, alone; then, on a fresh index, searches
with catalogue photos idle and while the same load runs. Raw throughput is the same model in this process, all
cores, on pre-decoded images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from common.images import decode_image
from common.model import load_model
from lookalike.redis_server import EmbeddedRedis
from lookalike.stack import Stack
from lookalike.up import start_workers
from protocol.client import Client

SHARED = Path(os.environ.get("LOOKALIKE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


def raw_throughput(model_path: Path, archive: Path, count: int, batch: int = 32) -> float:
    """Images/s of the bare model on `count` pre-decoded catalogue images, all cores, best of three passes."""
    model = load_model(model_path, ["cpu"], intra_op_threads=os.cpu_count())
    with tarfile.open(archive) as tar:
        members = [member for member in tar if member.isfile()][:count]
        pixels = np.stack([decode_image(tar.extractfile(m).read(), model.contract.size) for m in members])
    model.embed(pixels[:batch])
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        for start in range(0, len(pixels), batch):
            model.embed(pixels[start : start + batch])
        best = max(best, len(pixels) / (time.perf_counter() - started))
    return best


def search_latencies(client: Client, photos: list[Path], until: float) -> list[float]:
    """Seconds from submitting a search to its finished job, one search at a time, until `until` (monotonic)."""
    latencies = []
    while time.monotonic() < until:
        data = photos[len(latencies) % len(photos)].read_bytes()
        started = time.perf_counter()
        job = client.follow(client.search(data, 10), timeout=120)
        latencies.append(time.perf_counter() - started)
        assert job["state"] == "done", job
        time.sleep(0.1)
    return latencies


def percentiles(values: list[float]) -> str:
    """`count | p50 | p95 | p99` in milliseconds, for a table row."""
    ms = sorted(value * 1000 for value in values)
    p95, p99 = (ms[min(len(ms) - 1, int(q * len(ms)))] for q in (0.95, 0.99))
    return f"{len(ms)} | {statistics.median(ms):.0f} | {p95:.0f} | {p99:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=SHARED / "data" / "fashion-catalog.tar.gz")
    parser.add_argument("--metadata", type=Path, default=SHARED / "data" / "fashion" / "styles.csv")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "efficientnet_lite0_max.onnx")
    parser.add_argument("--raw-images", type=int, default=1024)
    parser.add_argument("--busy-seconds", type=float, default=90, help="how long to search during a second load")
    args = parser.parse_args()

    photos = sorted((SHARED / "data" / "fashion" / "images").glob("*.jpg"))
    work = Path(tempfile.mkdtemp(prefix="lookalike-load-"))
    raw_before = raw_throughput(args.model, args.archive, args.raw_images)
    with EmbeddedRedis(work / "redis") as redis_server:
        # 1. The whole catalogue, nothing else running: end-to-end throughput.
        with running_stack(redis_server.url, work / "quiet", args) as client:
            started = time.perf_counter()
            job = client.follow(client.start_load(args.archive, args.metadata), timeout=7200)
            elapsed = time.perf_counter() - started
            indexed = client.stats()["items"]
        # 2. A fresh index: searches one after another, idle, then while the same catalogue loads.
        with running_stack(redis_server.url.rsplit("/", 1)[0] + "/1", work / "busy", args) as client:
            idle = search_latencies(client, photos, time.monotonic() + 30)
            client.start_load(args.archive, args.metadata)
            time.sleep(5)  # past the unpacking, into embedding
            busy = search_latencies(client, photos, time.monotonic() + args.busy_seconds)
            busy_progress = client.jobs.list_loads(1)[0]["progress"]
    # The machine is shared: the bare model is timed before and after, and the better figure is the baseline.
    raw = max(raw_before, raw_throughput(args.model, args.archive, args.raw_images))

    print(f"\n{args.archive.name}: {job['progress']}, {job['state']}; {os.cpu_count()} cores, {args.model.name}")
    print("\n| path | images/s | vs raw |")
    print("| --- | ---: | ---: |")
    print(f"| raw onnxruntime, one process, all cores, pre-decoded images | {raw:.0f} | 1.00 |")
    end_to_end = indexed / elapsed
    label = "catalogue load through the queue (unpack, plan, decode, embed, index)"
    print(f"| {label} | {end_to_end:.0f} | {end_to_end / raw:.2f} |")
    print("\n| search latency (upload to finished job, top-10), ms | searches | p50 | p95 | p99 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| idle | {percentiles(idle)} |")
    print(f"| during a catalogue load ({busy_progress['done']:,} items indexed meanwhile) | {percentiles(busy)} |")


@contextmanager
def running_stack(redis_url: str, data_dir: Path, args: argparse.Namespace) -> Iterator[Client]:
    stack = Stack(redis_url, data_dir, args.model, args.archive.parent)
    stack.redis.flushdb()
    try:
        start_workers(stack, stack.settings)
        yield Client(stack.settings)
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
