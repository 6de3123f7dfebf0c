"""`lookalike ingest`, `lookalike put`, `lookalike search` and `lookalike duplicates`: the typed client from a
terminal."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common.errors import LookalikeError, UsageError
from common.filters import parse_filters
from common.images import ImageError
from common.products import check_photo
from common.settings import Settings
from common.vectors import STRATEGIES
from protocol.client import MAX_EXAMPLES, MAX_SEARCH_PHOTOS, Client

SEARCH_WAIT_SECONDS = 60


def configure_ingest(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("catalog", type=Path, help="a CSV, a folder of images, a tar archive, or styles.csv+images/")
    parser.add_argument("--metadata", type=Path, help="a CSV (id + columns) for a folder or archive of images")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    parser.set_defaults(handler=run_ingest)


def configure_search(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, nargs="+", help=f"a photo; several (up to {MAX_SEARCH_PHOTOS}): one job")
    parser.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    parser.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE", help="metadata must match")
    parser.add_argument("--json", action="store_true", help="print the job record as JSON")
    parser.set_defaults(handler=run_search)


def configure_recommend(parser: argparse.ArgumentParser) -> None:
    examples = parser.add_argument_group("examples (at least one positive; ids and photos together at most "
                                         f"{MAX_EXAMPLES})")  # fmt: skip
    examples.add_argument("--like", action="append", default=[], metavar="ID", help="a product to find more like")
    examples.add_argument("--like-photo", action="append", default=[], type=Path, metavar="PHOTO")
    examples.add_argument("--unlike", action="append", default=[], metavar="ID", help="a product to find less like")
    examples.add_argument("--unlike-photo", action="append", default=[], type=Path, metavar="PHOTO")
    parser.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    parser.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE", help="metadata must match")
    parser.add_argument("--strategy", choices=STRATEGIES, default=STRATEGIES[0], help="how the examples are weighed")
    parser.add_argument("--json", action="store_true", help="print the job record as JSON")
    parser.set_defaults(handler=run_recommend)


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
    images = [read_photo(path) for path in args.image]
    client = Client(Settings.from_env())
    try:
        job_id = client.search(images if len(images) > 1 else images[0], args.k, filters)
    except ImageError as error:
        raise LookalikeError(f"{error.message} ({error.code})") from error
    job = finished_search(client, job_id, args.json)
    if args.json:
        return 0 if job["state"] == "done" else 1
    answers = job["result"].get("results") or [job["result"]]
    for path, answer in zip(args.image, answers, strict=True):
        if len(answers) > 1:
            print(f"{path}:")
        if "error" in answer:
            print(f"  failed: {answer['error']['message']} ({answer['error']['code']})")
        print_hits(answer.get("hits", []))
    return 0 if job["state"] == "done" else 1


def run_recommend(args: argparse.Namespace) -> int:
    positive = [*args.like, *(read_photo(path) for path in args.like_photo)]
    negative = [*args.unlike, *(read_photo(path) for path in args.unlike_photo)]
    client = Client(Settings.from_env())
    try:
        job_id = client.recommend(positive, negative, args.k, parse_filters(args.filter), args.strategy)
    except ImageError as error:
        raise LookalikeError(f"{error.message} ({error.code})") from error
    job = finished_search(client, job_id, args.json)
    if not args.json:
        print_hits(job["result"]["hits"])
    return 0


def read_photo(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise LookalikeError(f"can't read {path}: {error.strerror}") from error


def finished_search(client: Client, job_id: str, as_json: bool) -> dict[str, Any]:
    """The search's finished record (printed as JSON with `as_json`); a failed one is raised."""
    job = client.follow(job_id, timeout=SEARCH_WAIT_SECONDS)
    if as_json:
        print(json.dumps(job, indent=2))
    if job["state"] == "failed":
        raise LookalikeError(f"search failed: {job['error']['message']} ({job['error']['code']})")
    return job


def print_hits(hits: list[dict[str, Any]]) -> None:
    for rank, hit in enumerate(hits, start=1):
        name = hit["metadata"].get("productDisplayName", "")
        photos = hit.get("photo_count") or len(hit.get("photos") or [])
        matched = f"  (photo {hit['photos'][hit['photo']]})" if photos > 1 else ""  # which of its photos
        print(f"{rank:>3}. {hit['score']:.4f}  {hit['id']}  {name}{matched}")


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


def configure_put(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", metavar="ID", help="the product's id (as in its URL: /api/items/<id>)")
    parser.add_argument("photos", type=Path, nargs="+", metavar="PHOTO", help="its photos, the main one first")
    parser.add_argument("--field", action="append", default=[], metavar="NAME=VALUE", help="metadata (repeatable)")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    parser.add_argument("--json", action="store_true", help="print the finished job record as JSON")
    parser.set_defaults(handler=run_put)


def run_put(args: argparse.Namespace) -> int:
    """Add or replace one product (every photo it has, and its metadata), checked as the web checks an upload."""
    settings = Settings.from_env()
    metadata = parse_fields(args.field)
    photos = []
    for path in args.photos:
        data = read_photo(path)
        try:
            check_photo(data, settings.max_upload, settings.max_pixels)
        except ImageError as error:
            raise LookalikeError(f"{path}: {error.message} ({error.code})") from error
        photos.append(data)
    client = Client(settings)
    job_id = client.put_item(args.id, photos, metadata)
    print(f"product {args.id}: load {job_id} queued", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return 0
    job = client.follow(job_id)
    if args.json:
        print(json.dumps(job, indent=2))
    elif job["state"] == "done":
        print(f"product {args.id} {job['state']}: seq {job.get('seq')} (read it with min_seq={job.get('seq')})")
    else:
        print(f"product {args.id} {job['state']}")
        for error in job.get("errors", []) + ([job["error"]] if "error" in job else []):
            print(f"  {error['code']}: {error['message']}")
    return 0 if job["state"] == "done" else 1


def parse_fields(values: list[str]) -> dict[str, str]:
    """`--field NAME=VALUE` options -> metadata (the rules are `common.products.check_metadata`'s, applied by the
    client)."""
    fields: dict[str, str] = {}
    for text in values:
        name, separator, value = text.partition("=")
        if not separator or not name.strip():
            raise UsageError(f"--field {text[:60]!r}: expected NAME=VALUE")
        if name.strip() in fields:
            raise UsageError(f"--field {name.strip()[:60]!r} is given twice")
        fields[name.strip()] = value
    return fields
