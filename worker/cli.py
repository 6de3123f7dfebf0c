"""`lookalike worker embed|index`, `lookalike ingest` and `lookalike search`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import LookalikeError

if TYPE_CHECKING:
    from protocol.client import Client


def register(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser("worker", help="run a Celery worker: embed (any number) or index (exactly one)")
    worker.add_argument("kind", choices=["embed", "index"], help="embed: bulk embedding; index: the index owner")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(handler=run_worker)

    ingest = commands.add_parser("ingest", help="load a catalogue through the queue, with a progress bar")
    ingest.add_argument("catalog", type=Path, help="a CSV, a folder of images, a tar archive, or styles.csv+images/")
    ingest.add_argument("--metadata", type=Path, help="a CSV (id + columns) for a folder or archive of images")
    ingest.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    ingest.set_defaults(handler=run_ingest)

    search = commands.add_parser("search", help="find the catalogue items most like an image")
    search.add_argument("image", type=Path)
    search.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    search.add_argument("--filter", action="append", default=[], metavar="FIELD=VALUE", help="metadata must match")
    search.add_argument("--json", action="store_true", help="print the job record as JSON")
    search.set_defaults(handler=run_search)


def register_duplicates(commands: argparse._SubParsersAction) -> None:
    duplicates = commands.add_parser("duplicates", help="list catalogue items that look the same (near-duplicates)")
    duplicates.add_argument("--threshold", type=float, default=0.95, help="least cosine similarity (default 0.95)")
    duplicates.add_argument("-k", type=int, default=5, help="neighbours of each item to look at (default 5)")
    duplicates.add_argument("--json", action="store_true", help="print the job record as JSON")
    duplicates.set_defaults(handler=run_duplicates)


def register_evaluate(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("evaluate", help="measure retrieval quality on a labelled catalogue")
    evaluate.add_argument(
        "--model",
        type=Path,
        action="append",
        required=True,
        help="an ONNX model with the contract; repeat to compare (fp32 and INT8, max and avg)",
    )
    evaluate.add_argument("--catalog", type=Path, required=True, help="any form a load accepts, with label columns")
    evaluate.add_argument("--metadata", type=Path, help="a CSV (id + columns) for a folder or archive of images")
    evaluate.add_argument(
        "--label",
        action="append",
        required=True,
        metavar="COLUMN",
        help="a neighbour is right when it has the query's value here; repeat for more columns",
    )
    evaluate.add_argument(
        "--queries",
        type=Path,
        help="a separate query set (any form a load accepts); default: leave-one-out over the catalogue",
    )
    evaluate.add_argument(
        "--resize",
        action="append",
        choices=["stretch", "pad"],
        help="resize policies to compare (default LOOKALIKE_RESIZE)",
    )
    evaluate.add_argument(
        "--m", type=int, action="append", help="hnswlib M values to compare (default LOOKALIKE_HNSW_M)"
    )
    evaluate.add_argument("--ef", type=int, action="append", help="hnswlib ef values (default LOOKALIKE_HNSW_EF)")
    evaluate.add_argument(
        "--pca",
        type=int,
        action="append",
        metavar="DIM",
        help="PCA dimensions to compare, fitted on the catalogue as the index fits it; 0: none "
        "(default LOOKALIKE_PCA_DIM)",
    )
    evaluate.add_argument("--json", type=Path, help="write every figure as JSON here")
    evaluate.set_defaults(handler=run_evaluate)


def run_worker(args: argparse.Namespace) -> int:
    import worker.tasks  # noqa: F401 - registers the tasks with the app below
    from protocol.celery_app import create_celery
    from worker import runtime
    from worker.recovery import watch_for_orphans

    config = runtime.settings()
    app = create_celery(config)
    watch_for_orphans(app, config)
    if args.kind == "embed":
        from worker.processes import check_model_elsewhere, embed_worker_argv, prepare_embed_processes

        check_model_elsewhere(config)
        prepare_embed_processes()
        app.worker_main(embed_worker_argv(config, args.loglevel))
        return 0
    from protocol.heartbeats import forget_heartbeat
    from worker.processes import index_worker_argv, open_index_owner

    owner = open_index_owner(app)
    try:
        app.worker_main(index_worker_argv(args.loglevel))
    finally:
        owner.close()
        forget_heartbeat(owner.redis, "index")
    return 0


def run_ingest(args: argparse.Namespace) -> int:
    from protocol.client import Client
    from worker.runtime import settings

    client = Client(settings())
    job_id = client.start_load(args.catalog.resolve(), args.metadata.resolve() if args.metadata else None)
    print(f"load {job_id} queued", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return 0
    follow_load(client, job_id)
    return 0


def follow_load(client: Client, job_id: str, check: Callable[[], None] | None = None) -> dict[str, Any]:
    """Show a load's progress bar until it finishes, then its counts and errors by code; `check` runs on each
    update (and may raise to stop following)."""

    def update(job: dict[str, Any]) -> None:
        _progress_bar(job)
        if check is not None:
            check()

    job = client.follow(job_id, on_update=update)
    print(file=sys.stderr)
    progress = job["progress"]
    print(f"load {job['state']}: {progress['done']:,} indexed, {progress['failed']:,} failed of {progress['total']:,}")
    for code, count in job.get("errors_by_code", {}).items():
        print(f"  {code}: {count:,}")
    if "error" in job:
        raise LookalikeError(job["error"]["message"])
    return job


def run_search(args: argparse.Namespace) -> int:
    from common.filters import parse_filters
    from common.images import ImageError
    from protocol.client import Client
    from worker.runtime import settings

    filters = parse_filters(args.filter)
    try:
        image = args.image.read_bytes()
    except OSError as error:
        raise LookalikeError(f"can't read {args.image}: {error.strerror}") from error
    client = Client(settings())
    try:
        job_id = client.search(image, args.k, filters)
    except ImageError as error:
        raise LookalikeError(f"{error.message} ({error.code})") from error
    job = client.follow(job_id, timeout=60)
    if args.json:
        print(json.dumps(job, indent=2))
    if job["state"] != "done":
        raise LookalikeError(f"search failed: {job['error']['message']} ({job['error']['code']})")
    if not args.json:
        for rank, hit in enumerate(job["result"]["hits"], start=1):
            name = hit["metadata"].get("productDisplayName", "")
            print(f"{rank:>3}. {hit['score']:.4f}  {hit['id']}  {name}")
    return 0


def _progress_bar(job: dict[str, Any]) -> None:
    progress = job["progress"]
    total, finished = progress["total"], progress["done"] + progress["failed"]
    if not total:
        print(f"\r{job['state']}: reading the catalogue ...", end="", file=sys.stderr, flush=True)
        return
    width = 30
    filled = int(width * finished / total)
    bar = "#" * filled + "-" * (width - filled)
    print(f"\r[{bar}] {finished:,}/{total:,} ({progress['failed']:,} failed)", end="", file=sys.stderr, flush=True)


def run_evaluate(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from common.model import load_model
    from common.settings import CORES, Settings
    from worker.evaluate import embed_catalog, evaluate, markdown, reduce
    from worker.index import IndexParams
    from worker.projection import Projection

    # The files named here are read where they are: the catalogue root is the whole file system unless set.
    settings = Settings.from_env({"LOOKALIKE_CATALOG_ROOT": "/", **os.environ})
    evaluations = []
    for model_path in args.model:
        model = load_model(model_path, settings.providers, intra_op_threads=CORES)
        for resize in args.resize or [settings.resize]:
            configured = dataclasses.replace(settings, resize=resize)
            print(f"{model_path.name}, resize {resize}: embedding {args.catalog} ...", file=sys.stderr)
            catalogue = embed_catalog(configured, model, args.catalog.resolve(), args.metadata)
            if not catalogue.ids:
                raise LookalikeError(f"no image of {args.catalog} could be embedded")
            queries = embed_catalog(configured, model, args.queries.resolve()) if args.queries else None
            for dimension in args.pca or [settings.pca_dim]:
                setting: dict[str, Any] = {"model": model_path.name, "resize": resize}
                indexed, asked = catalogue, queries
                if dimension:
                    try:
                        projection = Projection.fit(catalogue.vectors, dimension)
                    except ValueError as error:
                        raise LookalikeError(f"--pca {dimension}: {error}") from None
                    indexed = reduce(catalogue, projection)
                    asked = reduce(queries, projection) if queries else None
                    setting["pca"] = f"{dimension} ({projection.retained_variance:.0%} of variance)"
                index_params = [
                    IndexParams(indexed.vectors.shape[1], m, settings.hnsw_ef_construction, ef)
                    for m in args.m or [settings.hnsw_m]
                    for ef in args.ef or [settings.hnsw_ef]
                ]
                evaluations.append(evaluate(indexed, args.label, asked, index_params, setting))
    print(markdown(evaluations))
    for evaluation in evaluations:
        for quality in evaluation.labels:
            if not quality.queries:
                print(f"no query has a {quality.label!r} another item shares: is it a column of the catalogue's "
                      "CSV (or --metadata)?", file=sys.stderr)  # fmt: skip
            worst = ", ".join(f"{entry['value']} {entry['precision@5']:.2f}" for entry in quality.worst)
            print(f"{evaluation.name} / {quality.label}, lowest precision@5: {worst}")
    if args.json:
        args.json.write_text(json.dumps([evaluation.as_dict() for evaluation in evaluations], indent=2) + "\n")
    return 0


def run_duplicates(args: argparse.Namespace) -> int:
    from protocol.client import Client
    from worker.runtime import settings

    if not 0 < args.threshold <= 1 or args.k < 1:
        raise LookalikeError("--threshold must be in (0, 1] and -k at least 1")
    client = Client(settings())
    job = client.follow(client.find_duplicates(args.threshold, args.k), on_update=_progress_bar)
    print(file=sys.stderr)
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
