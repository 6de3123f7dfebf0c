"""`lookalike worker embed|index` (the workers) and `lookalike evaluate` (retrieval quality)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure_worker(worker: argparse.ArgumentParser) -> None:
    worker.add_argument(
        "kind",
        choices=["embed", "index", "query", "replica"],
        help="embed: bulk embedding (any number); index: the index owner (exactly one); query: searches by image "
        "(any number); replica: a read-only copy of the index (any number)",
    )
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
    from worker.processes import run_worker

    return run_worker(args.kind, args.loglevel)


def run_evaluate(args: argparse.Namespace) -> int:
    import os

    from common.settings import Settings
    from worker.evaluation.report import as_json, markdown, unused_labels, weakest_values
    from worker.evaluation.run import Plan, run_plan

    # The files named here are read where they are: the catalogue root is the whole file system unless set.
    settings = Settings.from_env({"LOOKALIKE_CATALOG_ROOT": "/", **os.environ})
    plan = Plan(
        models=args.model,
        catalog=args.catalog.resolve(),
        labels=args.label,
        metadata=args.metadata,
        queries=args.queries.resolve() if args.queries else None,
        resizes=args.resize or (),
        pca_dims=args.pca or (),
        ms=args.m or (),
        efs=args.ef or (),
    )
    evaluations = list(run_plan(settings, plan, say=lambda line: print(line, file=sys.stderr)))
    print(markdown(evaluations))
    for warning in unused_labels(evaluations):
        print(warning, file=sys.stderr)
    for line in weakest_values(evaluations):
        print(line)
    if args.json:
        args.json.write_text(as_json(evaluations))
    return 0
