"""File helpers shared by the exporter and the worker: checksums and crash-safe writes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from common.errors import LookalikeError


def file_sha256(path: str | Path, from_disk: bool = False) -> str:
    """The file's sha256; `from_disk`: its cached pages are dropped first (flushed ones: call after an fsync), so
    what is hashed is what the disk gives back."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if from_disk and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the whole new one, never a part; `mode`:
    its permissions (else the temporary file's, 0600)."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            if mode is not None:
                os.fchmod(file.fileno(), mode)
            file.write(data)
        atomic_replace(Path(temporary), path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_replace(source: Path, target: Path) -> None:
    """Move a finished file (on the same file system) into place durably: flush it, rename, flush the folder."""
    fsync_path(source)
    os.replace(source, target)
    fsync_path(target.parent)


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or make the renames inside a folder durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def ensure_writable_file(path: str | Path) -> Path:
    """Create the parent folder if needed and prove a file can be written there, before any slow work."""
    path = Path(path)
    if path.is_dir():
        raise LookalikeError(f"output {path} is a folder; give a file name such as {path / 'model.onnx'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise LookalikeError(f"can't write to {path.parent}: {error.strerror or error}") from error
    return path
