"""`lookalike ingest`, `lookalike search` and `lookalike duplicates`: the typed client from a terminal."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common.errors import LookalikeError
from common.filters import parse_filters
from common.images import ImageError
from common.settings import Settings
from protocol.client import Client

SEARCH_WAIT_SECONDS = 60


def configure_ingest(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("catalog", type=Path, help="a CSV, a folder of images, a tar archive, or styles.csv+images/")
    parser.add_argument("--metadata", type=Path, help="a CSV (id + columns) for a folder or archive of images")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    parser.set_defaults(handler=run_ingest)


def configure_search(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path)
    parser.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    parser.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE", help="metadata must match")
    parser.add_argument("--json", action="store_true", help="print the job record as JSON")
    parser.set_defaults(handler=run_search)


def configure_duplicates(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", type=float, default=0.95, help="least cosine similarity (default 0.95)")
    parser.add_argument("-k", type=int, default=5, help="neighbours of each item to look at (default 5)")
    parser.add_argument("--json", action="store_true", help="print the job record as JSON")
    parser.set_defaults(handler=run_duplicates)


class JobProgress:
    """A progress bar (tqdm, on stderr) that follows a job's record: its items done and failed of its total."""

    def __init__(self, description: str) -> None:
        self.bar = tqdm(desc=description, total=None, unit=" items", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, job: dict[str, Any]) -> None:
        progress = job["progress"]
        if progress["total"] is not None and self.bar.total != progress["total"]:
            self.bar.reset(total=progress["total"])
        self.bar.set_postfix(failed=progress["failed"], refresh=False)
        self.bar.update(progress["done"] + progress["failed"] - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def follow_load(client: Client, job_id: str, check: Callable[[], None] | None = None) -> dict[str, Any]:
    """Show a load's progress bar until it finishes, then its counts and errors by code; `check` runs on each
    update (and may raise to stop following)."""
    progress = JobProgress("load")

    def update(job: dict[str, Any]) -> None:
        progress(job)
        if check is not None:
            check()

    try:
        job = client.follow(job_id, on_update=update)
    finally:
        progress.close()
    counts = job["progress"]
    print(f"load {job['state']}: {counts['done']:,} indexed, {counts['failed']:,} failed of {counts['total']:,}")
    for code, count in job.get("errors_by_code", {}).items():
        print(f"  {code}: {count:,}")
    if "error" in job:
        raise LookalikeError(job["error"]["message"])
    return job


def run_ingest(args: argparse.Namespace) -> int:
    client = Client(Settings.from_env())
    job_id = client.start_load(args.catalog.resolve(), args.metadata.resolve() if args.metadata else None)
    print(f"load {job_id} queued", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return 0
    follow_load(client, job_id)
    return 0


def run_search(args: argparse.Namespace) -> int:
    filters = parse_filters(args.filter)
    try:
        image = args.image.read_bytes()
    except OSError as error:
        raise LookalikeError(f"can't read {args.image}: {error.strerror}") from error
    client = Client(Settings.from_env())
    try:
        job_id = client.search(image, args.k, filters)
    except ImageError as error:
        raise LookalikeError(f"{error.message} ({error.code})") from error
    job = client.follow(job_id, timeout=SEARCH_WAIT_SECONDS)
    if args.json:
        print(json.dumps(job, indent=2))
    if job["state"] != "done":
        raise LookalikeError(f"search failed: {job['error']['message']} ({job['error']['code']})")
    if not args.json:
        for rank, hit in enumerate(job["result"]["hits"], start=1):
            name = hit["metadata"].get("productDisplayName", "")
            photos = hit.get("photo_count") or len(hit.get("photos") or [])
            matched = f"  (photo {hit['photos'][hit['photo']]})" if photos > 1 else ""  # which of its photos
            print(f"{rank:>3}. {hit['score']:.4f}  {hit['id']}  {name}{matched}")
    return 0


def run_duplicates(args: argparse.Namespace) -> int:
    if not 0 < args.threshold <= 1 or args.k < 1:
        raise LookalikeError("--threshold must be in (0, 1] and -k at least 1")
    client = Client(Settings.from_env())
    progress = JobProgress("items looked at")
    try:
        job = client.follow(client.find_duplicates(args.threshold, args.k), on_update=progress)
    finally:
        progress.close()
    if "error" in job:
        raise LookalikeError(job["error"]["message"])
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    result = job["result"]
    print(f"{result['total_pairs']:,} pairs of items at cosine similarity {args.threshold} or more")
    for pair in result["pairs"]:
        print(f"{pair['score']:.4f}  {pair['a']}  {pair['b']}")
    return 0
