"""Where the ResNet50 weights come from, and the checks a weights file passes before Keras reads it."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from common.files import file_sha256
from export.errors import ExportError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
WEIGHTS_SUFFIXES = (".h5", ".hdf5")

# Keras's own ResNet50 "notop" ImageNet weights: the file `ResNet50(weights="imagenet")` downloads.
IMAGENET_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = f"https://storage.googleapis.com/tensorflow/keras-applications/resnet/{IMAGENET_FILE}"
IMAGENET_MD5 = "4d473c1dd8becc155b73f8504c6f6626"


@dataclass(frozen=True)
class WeightsSource:
    """The weights an export uses: `imagenet` (downloaded by Keras), a local `file`, or `none` (random)."""

    kind: str
    path: Path | None = None
    sha256: str | None = None

    def describe(self) -> str:
        return self.kind if self.path is None else f"{self.kind} {self.path}"

    def as_card(self) -> dict[str, str | None]:
        return {"source": self.kind, "path": str(self.path) if self.path else None, "sha256": self.sha256}


def resolve_weights(spec: str) -> WeightsSource:
    """`imagenet`, `none` or a path -> a checked WeightsSource (downloads the ImageNet file on first use)."""
    if spec.lower() == "none":
        return WeightsSource("none")
    if spec.lower() == "imagenet":
        path, kind = download_imagenet_weights(), "imagenet"
    else:
        path, kind = Path(spec).expanduser(), "file"
    check_weights_file(path)
    return WeightsSource(kind, path, file_sha256(path))


def check_weights_file(path: Path) -> None:
    """Refuse a missing, misnamed, non-HDF5 or truncated weights file with a one-line reason."""
    if not path.exists():
        raise ExportError(f"weights file {path} does not exist")
    if not path.is_file():
        raise ExportError(f"weights path {path} is not a file")
    if not path.name.endswith(WEIGHTS_SUFFIXES):
        raise ExportError(f"weights file {path} is not a Keras weights file (expected *_notop.h5 or *.weights.h5)")
    size = path.stat().st_size
    expected = hdf5_end_of_file(path)
    if size < expected:
        raise ExportError(
            f"weights file {path} is truncated: {size:,} bytes on disk, its HDF5 header says {expected:,} "
            "(an interrupted download? fetch it again)"
        )
    if size > expected:
        raise ExportError(f"weights file {path} is damaged: {size:,} bytes on disk, its HDF5 header says {expected:,}")


def hdf5_end_of_file(path: Path) -> int:
    """The file size an HDF5 file's superblock promises: its end-of-file address."""
    with open(path, "rb") as file:
        offset = _find_signature(file)
        if offset is None:
            raise ExportError(f"weights file {path} is not an HDF5 file (no HDF5 signature)")
        file.seek(offset)
        superblock = file.read(64)
    version = superblock[8]
    if version in (0, 1):
        offset_size = superblock[13]
        first_address = 24 if version == 0 else 28
        eof_index = 2  # after the base address and the free-space address
    elif version in (2, 3):
        offset_size = superblock[9]
        first_address = 12
        eof_index = 2  # after the base address and the superblock extension address
    else:
        raise ExportError(f"weights file {path} has an HDF5 superblock version {version} this check doesn't know")
    if offset_size not in (4, 8):
        raise ExportError(f"weights file {path} has a corrupt HDF5 superblock")
    # The field counts from the start of the file, user block included (what the HDF5 library compares
    # with the file's size when it reports "truncated file").
    fmt = "<I" if offset_size == 4 else "<Q"
    return struct.unpack_from(fmt, superblock, first_address + eof_index * offset_size)[0]


def _find_signature(file: BinaryIO) -> int | None:
    """HDF5 allows a user block before the superblock: the signature sits at 0, 512, 1024, 2048, ..."""
    offset = 0
    while True:
        file.seek(offset)
        chunk = file.read(len(HDF5_SIGNATURE))
        if len(chunk) < len(HDF5_SIGNATURE):
            return None
        if chunk == HDF5_SIGNATURE:
            return offset
        offset = 512 if offset == 0 else offset * 2


def download_imagenet_weights() -> Path:
    """Fetch (or reuse from Keras's cache) the ImageNet ResNet50 weights without the classifier."""
    import keras

    try:
        return Path(keras.utils.get_file(IMAGENET_FILE, IMAGENET_URL, cache_subdir="models", file_hash=IMAGENET_MD5))
    except Exception as error:  # urllib, socket and Keras's hash check all raise different types
        raise ExportError(
            f"can't download the ImageNet weights ({error}); download {IMAGENET_URL} "
            "elsewhere and pass it with --weights PATH"
        ) from error
