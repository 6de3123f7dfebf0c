"""Image folders for the parity check and for INT8 calibration, decoded exactly as the worker decodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.images import IMAGE_SUFFIXES, ImageError, ResizePolicy, decode_image
from export.errors import ExportError


def list_images(folder: Path) -> list[Path]:
    """Every image file under `folder`, in a stable order; an error when there is none."""
    if not folder.is_dir():
        raise ExportError(f"image folder {folder} does not exist or is not a folder")
    found = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not found:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ExportError(f"no images in {folder} (looked for {suffixes})")
    return found


def load_images(
    paths: list[Path], size: tuple[int, int], policy: ResizePolicy = ResizePolicy.STRETCH
) -> tuple[np.ndarray, list[Path]]:
    """Decode `paths` to a uint8 batch; returns it with the paths that decoded (broken files are skipped)."""
    arrays, used = [], []
    for path in paths:
        try:
            arrays.append(decode_image(path.read_bytes(), size, policy))
        except (ImageError, OSError):
            continue
        used.append(path)
    if not arrays:
        raise ExportError(f"none of the {len(paths)} images in {paths[0].parent} could be decoded")
    return np.stack(arrays), used
