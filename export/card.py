"""The model card: a JSON file beside each model that says what it is, how it was made and how well."""

from __future__ import annotations

import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.files import atomic_write_bytes, file_sha256
from common.model import ModelContract, card_path

CARD_FORMAT = "lookalike-model-card/1"
# module name -> the name the card records
LIBRARIES = {
    "tensorflow": "tensorflow",
    "keras": "keras",
    "tf2onnx": "tf2onnx",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "numpy": "numpy",
    "PIL": "pillow",
}


def contract_fields(contract: ModelContract) -> dict[str, Any]:
    """The card's description of the model's input and output, as the worker will check them."""
    return {
        "input": {
            "name": contract.input_name,
            "dtype": "uint8",
            "shape": ["batch", contract.height, contract.width, 3],
            "layout": "NHWC",
            "color": "RGB",
            "range": [0, 255],
        },
        "output": {"name": contract.output_name, "dtype": "float32", "dimension": contract.dimension},
    }


def library_versions() -> dict[str, str]:
    """Versions of the libraries that took part in making the model (those this process has loaded)."""
    versions = {"python": platform.python_version()}
    for module_name, label in LIBRARIES.items():
        module = sys.modules.get(module_name)
        if module is not None:
            versions[label] = str(getattr(module, "__version__", "unknown"))
    return versions


def write_card(model_path: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Complete `fields` with the model file's name, size, sha256, versions and time; write it beside the model."""
    card = {
        "format": CARD_FORMAT,
        "file": model_path.name,
        "sha256": file_sha256(model_path),
        "bytes": model_path.stat().st_size,
        **fields,
        "versions": library_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_bytes(card_path(model_path), (json.dumps(card, indent=2) + "\n").encode())
    return card
