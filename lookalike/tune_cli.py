"""`lookalike tune`: learn a projection head from the catalogue's labels, gate it on held-out products, write it."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from common.model import EmbeddingModel
    from common.settings import Settings
    from worker.catalog import CatalogPlan
    from worker.evaluation.cache import EmbeddingCache
    from worker.evaluation.run import Embeddings

HOLDOUT_SHARE = 0.1
MAX_LOSS = 0.01  # the most held-out precision@5 a label may lose before tune refuses to write the model
PARITY_IMAGES = 8
MIN_VALUE_ITEMS = 2  # a value on one photo alone teaches nothing about what its items share

EXAMPLES = """\
example:
  lookalike tune --model models/efficientnet_lite0_max.onnx --catalog fashion-catalog.tar.gz \\
      --metadata fashion/styles.csv --label articleType --label baseColour --label gender \\
      --out models/efficientnet_lite0_max_tuned.onnx
"""


def configure(parser: argparse.ArgumentParser) -> None:
    from export.head import HEAD_KINDS, TrainingSettings

    defaults = TrainingSettings()
    parser.description = (
        "Learn a projection head on a model's frozen embeddings from the catalogue's labels, and write the model "
        "followed by the head as one ONNX model with the contract, with its card. A share of the products is held "
        f"out: tune refuses to write a model that loses more than {MAX_LOSS} of held-out precision@5 on any label."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", type=Path, required=True, help="the ONNX model to tune (the contract)")
    parser.add_argument("--catalog", type=Path, required=True, help="any form a load accepts, with label columns")
    parser.add_argument("--metadata", type=Path, help="a CSV (id + columns) for a folder or archive of images")
    parser.add_argument("--label", action="append", required=True, metavar="COLUMN", help="a label to learn; repeat")
    parser.add_argument(
        "--weight", action="append", default=[], metavar="LABEL=W", help="a label's weight in the loss (default 1)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the tuned model; its card goes beside it as .json")
    parser.add_argument(
        "--head",
        choices=HEAD_KINDS,
        default=defaults.head,
        help=f"a linear map, or the map plus a hidden layer's correction (default {defaults.head})",
    )
    parser.add_argument(
        "--hidden", type=int, default=defaults.hidden, help=f"the mlp head's hidden units (default {defaults.hidden})"
    )
    parser.add_argument("--dim", type=int, default=defaults.dim, help=f"output dimensions (default {defaults.dim})")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"(default {defaults.epochs})")
    parser.add_argument(
        "--holdout",
        type=float,
        default=HOLDOUT_SHARE,
        metavar="SHARE",
        help=f"share of the products held out to judge the head (default {HOLDOUT_SHARE}), chosen by id hash",
    )
    parser.add_argument(
        "--allow-loss",
        action="append",
        default=[],
        metavar="LABEL",
        help=f"write the model even when LABEL loses more than {MAX_LOSS} of held-out precision@5",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: TensorFlow takes seconds to load, and `--help` needs none of it.
    import time

    from common.errors import LookalikeError
    from common.files import ensure_writable_file
    from common.model import load_model
    from common.settings import CORES, Settings
    from export.head import TrainingSettings, training_fields
    from worker.catalog import plan_catalog
    from worker.evaluation.cache import EmbeddingCache

    weights = parse_weights(args.weight, args.label)
    unknown = sorted(set(args.allow_loss) - set(args.label))
    if unknown:
        raise LookalikeError(f"--allow-loss {', '.join(unknown)}: not a --label of this run")
    if not 0 < args.holdout < 1:
        raise LookalikeError(f"--holdout {args.holdout}: give a share between 0 and 1, such as 0.1")
    if args.hidden < 1:
        raise LookalikeError(f"--hidden {args.hidden}: give a number of units, such as 1024")
    if args.out.resolve() == args.model.resolve():
        raise LookalikeError(f"the tuned model would overwrite its source {args.model}; choose another --out")
    ensure_writable_file(args.out)
    started = time.perf_counter()
    # The files named here are read where they are: the catalogue root is the whole file system unless set.
    settings = Settings.from_env({"LOOKALIKE_CATALOG_ROOT": "/", **os.environ})
    plan = plan_catalog(settings, str(args.catalog.resolve()), str(args.metadata) if args.metadata else None)
    require_tunable(args.label, [item.metadata for item in plan.items])
    model = load_model(args.model, settings.providers, intra_op_threads=CORES)
    cache = EmbeddingCache(settings.data_dir, model.sha256, settings.resize)
    catalogue = embed_with_bar(settings, model, plan, cache)
    cached = len(catalogue.ids) - catalogue.embedded
    say(f"embedded {catalogue.embedded:,} images and took {cached:,} from the cache ({cache.path}) in "
        f"{catalogue.seconds:.0f} s; {len(catalogue.errors):,} rows have no image that can be read")  # fmt: skip
    trained, held = split_by_product(catalogue, args.holdout)
    if len(held.products) < 2 or len(trained.products) < 2:
        raise LookalikeError(
            f"--holdout {args.holdout} leaves too few products on one side of {len(catalogue.products)}"
        )
    training = TrainingSettings(head=args.head, dim=args.dim, hidden=args.hidden, epochs=args.epochs)
    say(f"training a {training.dim}-dimension {training.head} head on {len(trained.products):,} products for "
        f"{training.epochs} epochs, judging it on {len(held.products):,} held out ...")  # fmt: skip
    from export.tune import project, train_head, write_tuned_model  # TensorFlow: seconds, so only now

    train_started = time.perf_counter()
    head = train_head(trained.vectors, class_targets(trained, args.label), weights, training)
    train_seconds = time.perf_counter() - train_started
    before = held_out_quality(trained, held, args.label)
    after = held_out_quality(reprojected(trained, project(head, trained.vectors)),
                             reprojected(held, project(head, held.vectors)), args.label)  # fmt: skip
    quality = compare(before, after)
    for label, figures in quality.items():
        say(f"{label}: held-out precision@5 {figures['before']['precision@5']:.3f} -> "
            f"{figures['after']['precision@5']:.3f} ({figures['change@5']:+.3f})")  # fmt: skip
    losses = gate(quality, args.allow_loss)
    if losses:
        raise LookalikeError(
            "; ".join(losses) + ": no model written (add --allow-loss LABEL to write it anyway, or change --weight)"
        )
    fields = {
        **training_fields(training, args.label, weights),
        "catalog": {"source": str(args.catalog), "items": len(catalogue.products), "failed": len(catalogue.errors)},
        "holdout": {
            "share": args.holdout,
            "by": "sha256 of the product id",
            "trained": len(trained.products),
            "held_out": len(held.products),
        },
        "quality": {"held_out_against_trained": quality, "allowed_loss": list(args.allow_loss)},
        "timings_s": {"embed": round(catalogue.seconds, 1), "train": round(train_seconds, 1)},
    }
    card = write_tuned_model(model, head, args.out, parity_images(settings, model, held), fields)
    say(f"wrote {args.out} (sha256 {card['sha256'][:16]}...) and its card {args.out.with_suffix('.json')} "
        f"in {time.perf_counter() - started:.0f} s")  # fmt: skip
    return 0


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def parse_weights(pairs: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """`--weight LABEL=W` for labels of this run; every other label weighs 1."""
    from common.errors import LookalikeError, UsageError

    weights = dict.fromkeys(labels, 1.0)
    for pair in pairs:
        label, _, value = pair.partition("=")
        if label not in weights:
            raise LookalikeError(f"--weight {pair}: {label!r} is not a --label of this run")
        try:
            weights[label] = float(value)
        except ValueError:
            raise LookalikeError(f"--weight {pair}: give LABEL=NUMBER, such as {label}=0.5") from None
        if weights[label] < 0:
            raise LookalikeError(f"--weight {pair}: a weight can't be negative")
    if not any(weights.values()):
        raise UsageError(f"--weight {' '.join(pairs)}: every label weighs 0, so nothing would be learnt; give one a "
                         "weight above 0")  # fmt: skip
    return weights


def require_tunable(labels: Sequence[str], metadata: Sequence[dict[str, Any]]) -> None:
    """UsageError for a label the catalogue can't teach: one no item has, or one without two values to tell apart."""
    from common.errors import UsageError
    from worker.evaluation.labels import require_label

    for label in labels:
        values = require_label(label, metadata, "the catalogue")
        common = [value for value, count in values.items() if count >= MIN_VALUE_ITEMS]
        if len(common) >= 2:
            continue
        found = (f"a single value ({next(iter(values))!r})" if len(values) == 1
                 else f"{len(values):,} values, {len(common)} of them on {MIN_VALUE_ITEMS} items or more,")  # fmt: skip
        raise UsageError(f"label {label!r} has {found} among the catalogue's {len(metadata):,} items: tuning needs at "
                         f"least two values with {MIN_VALUE_ITEMS} items each")  # fmt: skip


def embed_with_bar(settings: Settings, model: EmbeddingModel, plan: CatalogPlan, cache: EmbeddingCache) -> Embeddings:
    from tqdm import tqdm

    from worker.evaluation.run import embed_plan

    with tqdm(desc="embedding", unit=" images", file=sys.stderr, dynamic_ncols=True) as bar:

        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return embed_plan(settings, model, plan, progress=advance, cache=cache)


def held_out(item_id: str, share: float) -> bool:
    """Whether a product is held out: by the hash of its id, so the same products are on every run and machine."""
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") < share * 2**64


def split_by_product(catalogue: Embeddings, share: float) -> tuple[Embeddings, Embeddings]:
    """The products to train on and those held out."""
    import numpy as np

    mask = np.array([held_out(item_id, share) for item_id in catalogue.ids], dtype=bool)
    return subset(catalogue, ~mask), subset(catalogue, mask)


def subset(embeddings: Embeddings, mask: np.ndarray) -> Embeddings:
    import dataclasses

    rows = mask.nonzero()[0]
    return dataclasses.replace(
        embeddings,
        ids=[embeddings.ids[row] for row in rows],
        vectors=embeddings.vectors[rows],
        metadata=[embeddings.metadata[row] for row in rows],
        errors={},
    )


def reprojected(embeddings: Embeddings, vectors: np.ndarray) -> Embeddings:
    import dataclasses

    return dataclasses.replace(embeddings, vectors=vectors)


def class_targets(embeddings: Embeddings, labels: Sequence[str]) -> dict[str, np.ndarray]:
    """Each label's values as class numbers (-1 where an item has none)."""
    import numpy as np

    targets = {}
    for label in labels:
        values = [str(item.get(label) or "") for item in embeddings.metadata]
        classes = {value: number for number, value in enumerate(sorted(set(values) - {""}))}
        targets[label] = np.array([classes.get(value, -1) for value in values], dtype=np.int64)
    return targets


def held_out_quality(trained: Embeddings, held: Embeddings, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """precision@1 and @5 per label of the held-out products searched among the trained ones (exact cosine)."""
    from worker.evaluation.run import evaluate

    result = evaluate(trained, labels, queries=held)
    return {quality.label: {f"precision@{k}": round(quality.precision.get(k, 0.0), 4) for k in (1, 5)}
            for quality in result.labels}  # fmt: skip


def compare(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    return {
        label: {
            "before": before[label],
            "after": after[label],
            "change@5": round(after[label]["precision@5"] - before[label]["precision@5"], 4),
        }
        for label in before
    }


def gate(quality: dict[str, dict[str, Any]], allowed: Sequence[str]) -> list[str]:
    """A sentence for each label that loses more held-out precision@5 than the gate allows and is not allowed to."""
    return [
        f"{label} loses {-figures['change@5']:.3f} of held-out precision@5 (more than {MAX_LOSS})"
        for label, figures in quality.items()
        if figures["change@5"] < -MAX_LOSS and label not in allowed
    ]


def parity_images(settings: Settings, model: EmbeddingModel, held: Embeddings) -> np.ndarray:
    """A few held-out images, decoded as the workers decode them, to check the written model against its parts."""
    import numpy as np

    from common.areas import resolve_reference
    from common.images import decode_image, read_image_file

    images = []
    for metadata in held.metadata[:PARITY_IMAGES]:
        area, _, path = metadata["image"].partition("/")
        data = read_image_file(resolve_reference(settings, area, path), settings.max_image_bytes)
        images.append(decode_image(data, model.contract.size, settings.resize, settings.max_pixels))
    return np.stack(images)
