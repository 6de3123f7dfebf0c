"""A model the shop already has, as `lookalike export --from` takes it: a path or an http(s) URL of an ONNX model
with the contract (checked, then copied into place with its card) or of Keras ResNet50 weights (exported with them)."""

from __future__ import annotations

import http.client
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from common.files import atomic_replace, ensure_writable_file
from common.model import ModelError, card_path, load_model
from export.errors import ExportError

DOWNLOAD_SECONDS = 60  # a stalled connection's patience, not the whole download's
NOT_FOUND = 404


def is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme in ("http", "https")


def download(url: str, target: Path) -> None:
    """`url` saved at `target`; nothing there when it fails, whatever stops it."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_SECONDS) as response, open(target, "wb") as file:
            shutil.copyfileobj(response, file, 1024 * 1024)
    except BaseException as error:
        target.unlink(missing_ok=True)
        if isinstance(error, (OSError, http.client.HTTPException, ValueError)):
            reason = getattr(error, "reason", None) or error
            raise ExportError(f"can't download {url}: {reason}") from error
        raise


def fetch(source: str, folder: Path) -> Path:
    """The file at `source` in `folder`, under its own name (which says whether it is ONNX or Keras weights), with
    the model card beside it when the server has one (`NAME.json`)."""
    parts = urllib.parse.urlsplit(source)
    target = folder / (Path(parts.path).name or "model")
    download(source, target)
    if is_onnx(target):
        card_url = urllib.parse.urlunsplit(parts._replace(path=str(card_path(parts.path))))
        try:
            download(card_url, card_path(target))
        except ExportError as error:
            if not isinstance(error.__cause__, urllib.error.HTTPError) or error.__cause__.code != NOT_FOUND:
                raise  # no card is fine; a card that can't be read is not
    return target


def copy_onnx_model(source: Path, out: Path, label: str) -> None:
    """Check `source` has the model contract, then put it (and its card, if it has one) at `out`, whole or not at
    all: the workers that wait for `out` never open half a model, nor a model beside another one's card."""
    try:
        load_model(source, ["cpu"])
    except ModelError as error:
        raise ExportError(f"--from {label}: {error}".replace(str(source), label)) from error
    if source.resolve() == out.resolve():
        return
    if card_path(source).is_file():
        partial = card_path(out).with_name(f".{card_path(out).name}.partial")
        shutil.copyfile(card_path(source), partial)
        atomic_replace(partial, card_path(out))
    else:
        card_path(out).unlink(missing_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    shutil.copyfile(source, partial)
    atomic_replace(partial, out)


def is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def local_file(source: str, out: Path, folder: Path) -> Path:
    """`source` as a local file: a path as it is, a URL downloaded into `folder`."""
    ensure_writable_file(out)
    if is_url(source):
        return fetch(source, folder)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ExportError(f"--from {source}: no such file (give an .onnx model or Keras weights, or a URL)")
    return path
