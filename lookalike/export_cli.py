"""`lookalike export`: arguments, defaults and the two ways it runs (export ResNet50, quantise a model)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from export.keras_model import POOLINGS  # light: the exporter's TensorFlow is imported only when it runs

if TYPE_CHECKING:
    from export.progress import Progress

MODELS_DIR = Path("models")
CALIBRATION_IMAGES = 200
HOLDOUT_IMAGES = 100

EXAMPLES = """\
examples:
  lookalike export                                   ResNet50 + max pooling, ImageNet weights
  lookalike export --weights ~/resnet50_notop.h5     the same from a weights file you downloaded
  lookalike export --from https://shop.example/m.onnx --out models/model.onnx --if-missing
                                                     a model you already have (a path or URL): checked, copied
  lookalike export --quantize int8 --calibration catalog/images
                                                     export, then an INT8 copy calibrated on your images
  lookalike export --quantize int8 --model SRC.onnx --calibration DIR --out DST.onnx
                                                     INT8 copy of any model with the lookalike contract
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Export ResNet50 + global pooling to ONNX with a model card and a Keras-vs-ONNX parity check; "
        "optionally quantise it (or any model with the contract) to static INT8."
    )
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--out",
        type=Path,
        help="the model file this command writes last (default: models/resnet50_POOLING.onnx, "
        "or SOURCE_int8.onnx beside the source when quantising); its card is written beside it as .json",
    )
    parser.add_argument("--pooling", choices=POOLINGS, default="max", help="global pooling (default: max)")
    parser.add_argument(
        "--weights",
        default="imagenet",
        metavar="imagenet|none|PATH",
        help="ImageNet weights from Keras (default), random weights (none, for tests), or a local Keras weights "
        "file (*_notop.h5 or *.weights.h5)",
    )
    parser.add_argument(
        "--from",
        dest="source",
        metavar="imagenet|PATH|URL",
        help="where the model comes from: Keras's ImageNet weights (as without it), or a path or http(s) URL of an "
        "ONNX model with the contract (checked, then copied to --out with its card) or of Keras weights (*.h5)",
    )
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing when --out exists already (a deployment's first start)"
    )
    parser.add_argument("--sample", type=Path, metavar="DIR", help="real images for the parity check")
    parser.add_argument("--quantize", choices=["int8"], help="also write a static INT8 model")
    parser.add_argument(
        "--model", type=Path, metavar="SRC.onnx", help="quantise this model instead of exporting ResNet50"
    )
    parser.add_argument("--calibration", type=Path, metavar="DIR", help="catalogue images to calibrate INT8 on")
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=CALIBRATION_IMAGES,
        metavar="N",
        help=f"images to calibrate on (default: {CALIBRATION_IMAGES})",
    )
    parser.add_argument(
        "--holdout-images",
        type=int,
        default=HOLDOUT_IMAGES,
        metavar="N",
        help=f"images held back to measure INT8 against fp32 (default: {HOLDOUT_IMAGES}, at most a fifth)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: TensorFlow and onnxruntime take seconds to load, and `--help` needs neither.
    from common.files import ensure_writable_file
    from export.errors import ExportError
    from export.exporter import export_resnet50
    from export.images import list_images
    from export.progress import Progress

    if args.model and not args.quantize:
        raise ExportError("--model names the model to quantise: add --quantize int8 --calibration DIR")
    if args.calibration and not args.quantize:
        raise ExportError("--calibration is for --quantize int8")
    if args.quantize and not args.calibration:
        raise ExportError("--quantize int8 needs --calibration DIR, a folder of your catalogue's images")
    progress = Progress()
    fp32_default = MODELS_DIR / f"resnet50_{args.pooling}.onnx"
    last_written = args.out or (int8_path(args.model or fp32_default) if args.quantize else fp32_default)
    if args.if_missing and last_written.is_file():
        print(f"{last_written} is there already: nothing to do (remove it to export again)")
        return 0
    if args.source:
        export_from(args, args.out or fp32_default, progress)
    elif args.model:
        _quantize(args, args.model, args.out or int8_path(args.model), progress)
    elif not args.quantize:
        export_resnet50(args.out or fp32_default, args.pooling, args.weights, args.sample, progress)
    else:
        # Export, then quantise what was just exported: --out names the INT8 model, the fp32 one goes beside it.
        int8_out = args.out or int8_path(fp32_default)
        fp32_out = int8_out.parent / fp32_default.name
        if fp32_out.resolve() == int8_out.resolve():
            raise ExportError(f"--out {int8_out} is where the fp32 export goes; name the INT8 model differently")
        ensure_writable_file(int8_out)
        list_images(args.calibration)  # fail now, not after a minute of exporting
        export_resnet50(fp32_out, args.pooling, args.weights, args.sample, progress)
        _quantize(args, fp32_out, int8_out, progress)
    return 0


def export_from(args: argparse.Namespace, out: Path, progress: Progress) -> None:
    """`--from`: ResNet50 with Keras's ImageNet weights, or a model or weights file the shop already has."""
    import tempfile

    from export.errors import ExportError
    from export.exporter import export_resnet50
    from export.source import copy_onnx_model, is_onnx, local_file

    if args.model or args.quantize or args.weights != "imagenet":
        raise ExportError("--from names the model or its weights: give it without --weights, --model or --quantize")
    if args.source.lower() == "imagenet":
        export_resnet50(out, args.pooling, "imagenet", args.sample, progress)
        return
    with tempfile.TemporaryDirectory(prefix="lookalike-download-") as downloads:
        path = local_file(args.source, out, Path(downloads))
        if is_onnx(path):
            copy_onnx_model(path, out, args.source)
            print(f"{out}: the model from {args.source}, with lookalike's model contract")
        else:
            export_resnet50(out, args.pooling, str(path), args.sample, progress)


def int8_path(source: Path) -> Path:
    return source.with_name(f"{source.stem}_int8.onnx")


def _quantize(args: argparse.Namespace, source: Path, out: Path, progress: Progress) -> None:
    from export.quantize import quantize_int8

    quantize_int8(source, out, args.calibration, args.calibration_images, args.holdout_images, progress)
