"""`lookalike worker embed|index` (the workers) and `lookalike evaluate` (retrieval quality)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common.errors import LookalikeError


def configure_worker(worker: argparse.ArgumentParser) -> None:
    worker.add_argument("kind", choices=["embed", "index"], help="embed: bulk embedding; index: the index owner")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(handler=run_worker)


def configure_evaluate(evaluate: argparse.ArgumentParser) -> None:
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
