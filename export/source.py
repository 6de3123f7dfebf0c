"""A model the shop already has, as `lookalike export --from` takes it: a path or an http(s) URL of an ONNX model
with the contract (checked, then copied into place with its card) or of Keras ResNet50 weights (exported with them)."""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from common.files import atomic_replace, ensure_writable_file
from common.model import ModelError, card_path, load_model
from export.errors import ExportError

DOWNLOAD_SECONDS = 60  # a stalled connection's patience, not the whole download's


def is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme in ("http", "https")


def download(url: str, folder: Path) -> Path:
    """`url` saved under `folder` with its own file name (which says whether it is ONNX or Keras weights)."""
    name = Path(urllib.parse.urlsplit(url).path).name or "model"
    target = Path(tempfile.mkdtemp(prefix=".download-", dir=folder)) / name
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_SECONDS) as response, open(target, "wb") as file:
            shutil.copyfileobj(response, file, 1024 * 1024)
    except (OSError, urllib.error.URLError) as error:
        shutil.rmtree(target.parent, ignore_errors=True)
        raise ExportError(f"can't download {url}: {getattr(error, 'reason', error)}") from error
    return target


def copy_onnx_model(source: Path, out: Path) -> None:
    """Check `source` has the model contract, then put it (and its card, if it has one) at `out`, whole or not at
    all: the workers that wait for `out` never open half a model."""
    try:
        load_model(source, ["cpu"])
    except ModelError as error:
        raise ExportError(f"--from {source}: {error}") from error
    for origin, target in ((card_path(source), card_path(out)), (source, out)):  # the card first: the model last
        if origin.is_file() and origin.resolve() != target.resolve():
            partial = target.with_name(f".{target.name}.partial")
            shutil.copyfile(origin, partial)
            atomic_replace(partial, target)


def is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def local_copy(source: str, out: Path) -> tuple[Path, Path | None]:
    """`source` as a local file, and the download folder to remove afterwards (None for a local path)."""
    ensure_writable_file(out)
    if not is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ExportError(f"--from {source}: no such file (give an .onnx model or Keras weights, or a URL)")
        return path, None
    path = download(source, out.parent)
    return path, path.parent
