"""Load: concurrent clients upload photos to POST /api/search and follow each job to its result.

    .venv/bin/python bench/load.py [--url http://HOST:PORT] [--clients 20] [--seconds 30 | --uploads 200]
                                   [--json OUT]

Each client uploads a shared sample photo, polls its job the way the results page does, and repeats, for
`--seconds` or until `--uploads` uploads are made by all clients together; a refused client waits as Retry-After
says. Without --url it starts its own stack (embedded Redis, index and embed workers, `lookalike web`) with the
1,002 shared sample photos loaded. Prints throughput, latency percentiles (upload to result) and the answers by
status and reason; exits 1 when an answer was neither 202 nor a 429/503 with a JSON reason and Retry-After, or an
accepted search did not end done.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from catalog_load import SHARED, percentiles
from shoppers import FAILED, run_clients

from lookalike.redis_server import EmbeddedRedis, free_port
from lookalike.stack import Stack
from lookalike.up import start_workers
from protocol.client import Client

MODEL = SHARED / "models" / "efficientnet_lite0_max.onnx"
PHOTOS = SHARED / "data" / "fashion" / "images"


@contextmanager
def own_stack() -> Iterator[str]:
    """A whole service on loopback with the shared sample loaded; its URL."""
    work = Path(tempfile.mkdtemp(prefix="lookalike-load-"))
    with EmbeddedRedis(work / "redis") as redis_server:
        stack = Stack(redis_server.url, work / "data", MODEL, SHARED / "data")
        try:
            start_workers(stack, stack.settings)
            url = stack.start_web(free_port())
            client = Client(stack.settings)
            client.follow(client.start_load(SHARED / "data" / "fashion"), timeout=600)
            yield url
        finally:
            stack.stop()


def acceptable(refusal: str) -> bool:
    """A refusal is fine when it is a 429 or 503 that says why and when to come back."""
    return refusal.startswith(("429 ", "503 ")) and not refusal.endswith(("no reason", "no Retry-After"))


def run(url: str, clients: int, seconds: float, uploads: int | None) -> dict:
    """Every client's answers and latencies, summed."""
    address = urlsplit(url)
    photos = sorted(PHOTOS.glob("*.jpg"))
    started = time.perf_counter()
    latencies, statuses, refusals = run_clients(
        address.port or 80, photos, clients, seconds, uploads, address.hostname or "127.0.0.1"
    )
    elapsed = time.perf_counter() - started
    failed_jobs = statuses.pop(FAILED, 0)
    bad = sum(count for reason, count in refusals.items() if not acceptable(reason))
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "uploads": sum(statuses.values()),
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "refusals": dict(sorted(refusals.items())),
        "bad_answers": bad,
        "failed_jobs": failed_jobs,
        "searches_per_second": round(len(latencies) / elapsed, 1),
        "latency": percentiles(latencies) if latencies else "0 | - | - | -",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running lookalike web (default: start one with the shared sample)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30, help="how long the clients upload")
    parser.add_argument("--uploads", type=int, help="stop after this many uploads by all clients together")
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.uploads is not None:
        args.seconds = float("inf")
    if args.url:
        result = run(args.url, args.clients, args.seconds, args.uploads)
    else:
        with own_stack() as url:
            result = run(url, args.clients, args.seconds, args.uploads)
    print("| clients | uploads | s | searches done | p50 ms | p95 ms | p99 ms | searches/s | answers by status |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    answers = ", ".join(f"{status}: {count}" for status, count in result["statuses"].items())
    print(f"| {result['clients']} | {result['uploads']} | {result['seconds']} | {result['latency']} | "
          f"{result['searches_per_second']} | {answers} |")  # fmt: skip
    for reason, count in result["refusals"].items():
        print(f"- refused {count}x: {reason}")
    if result["failed_jobs"]:
        print(f"- {result['failed_jobs']} accepted searches ended failed")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["bad_answers"] or result["failed_jobs"] else 0


if __name__ == "__main__":
    sys.exit(main())
