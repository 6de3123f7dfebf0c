"""`lookalike worker embed|index` (the workers) and `lookalike evaluate` (retrieval quality)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.settings import Settings
    from worker.evaluation.calibration import Calibration


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
    evaluate.add_argument(
        "--calibrate",
        action="store_true",
        help="fit, from the labels, the similarity below which a neighbour is more often wrong than right, and store "
        "it with the serving index (needs one --model, the serving index's, and at most one --resize and --pca): "
        "searches then say when nothing close was found",
    )
    evaluate.set_defaults(handler=run_evaluate)


def run_worker(args: argparse.Namespace) -> int:
    from worker.processes import run_worker

    return run_worker(args.kind, args.loglevel)


def run_evaluate(args: argparse.Namespace) -> int:
    import os

    from common.settings import Settings
    from worker.evaluation.report import as_json, markdown, unused_labels, weakest_values
    from worker.evaluation.run import Plan, run_plan

    if args.calibrate and (len(args.model) > 1 or len(args.resize or []) > 1 or len(args.pca or []) > 1):
        print("--calibrate fits one setting: give one --model (the serving index's) and at most one --resize and "
              "--pca", file=sys.stderr)  # fmt: skip
        return 2
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
        calibrate=args.calibrate,
    )
    evaluations = list(run_plan(settings, plan, say=lambda line: print(line, file=sys.stderr)))
    print(markdown(evaluations))
    for warning in unused_labels(evaluations):
        print(warning, file=sys.stderr)
    for line in weakest_values(evaluations):
        print(line)
    if args.json:
        args.json.write_text(as_json(evaluations))
    if args.calibrate:
        return store_calibration(settings, evaluations[0].calibration)
    return 0


def store_calibration(settings: Settings, calibration: Calibration) -> int:
    """Print the thresholds, then send the calibration to the index owner to store with the serving index."""
    import celery.exceptions

    from protocol.client import Client, ReadError

    summary = calibration.summary()
    print(f"no close match below similarity {summary['threshold']:.3f} (a neighbour sharing "
          f"{' and '.join(summary['labels'])} is more often wrong than right there)")  # fmt: skip
    for value, threshold in summary["values"].items():
        print(f"  {value}: {threshold:.3f}")
    print(f"{summary['no_close_match']:.1%} of the catalogue's own photos would find no close match")
    try:
        stored = Client(settings).calibrate_index(calibration.as_dict())
    except ReadError as error:
        print(f"the index owner refused the calibration ({error.code}): {error}", file=sys.stderr)
        return 1
    except celery.exceptions.TimeoutError:
        print("no index owner answered: is `lookalike worker index` running against LOOKALIKE_REDIS_URL?",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"stored with index {stored['index_id']}: searches now say when there is no close match")
    return 0
