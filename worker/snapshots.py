"""Index snapshots: written by the owner, read by the owner at start and by every replica.

A snapshot is a folder `snapshot-<seq>-<random>/` in the index folder: vectors.hnsw, items.json, [projection.npz,]
and manifest.json (the sequence number, the model identity, hnswlib's parameters and each file's sha256).
`CURRENT` names the snapshot to load and is replaced atomically; the previous snapshot stays until the next one
is written, so a replica that has just read `CURRENT` can finish reading it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import LookalikeError
from common.files import atomic_write_bytes, file_sha256, fsync_path
from worker.index import IndexParams, Item, Photo, VectorIndex
from worker.projection import Projection

FORMAT = "lookalike-index/1"
VECTORS, ITEMS, PROJECTION, MANIFEST = "vectors.hnsw", "items.json", "projection.npz", "manifest.json"
CURRENT = "CURRENT"
PREFIX, STAGING_PREFIX = "snapshot-", ".snapshot-"


class IndexStoreError(LookalikeError):
    """The index can't be opened or changed; the message says why."""


class ModelMismatch(IndexStoreError):
    """The index holds vectors of another model: they must never be mixed with this model's."""


@dataclass(frozen=True)
class ModelIdentity:
    """What makes two vectors comparable: the same model file, fed images resized the same way."""

    sha256: str
    dimension: int
    resize: str


@dataclass
class Snapshot:
    """A snapshot as it was read: the index at `seq`, and what its manifest says about it."""

    name: str
    index_id: str  # made when the index was made: a replica tells a new index in the same folder by it
    seq: int
    identity: ModelIdentity
    params: IndexParams
    projection: Projection | None
    index: VectorIndex
    items: int


def current_name(directory: Path) -> str | None:
    """The name of the snapshot `CURRENT` points at, or None before the first snapshot."""
    try:
        return (directory / CURRENT).read_text().strip() or None
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class SnapshotFile:
    """A file a snapshot's manifest lists, as it is on disk."""

    path: Path
    size: int | None  # None: missing
    problem: str | None  # how it differs from its manifest; None: its size and sha256 are the manifest's


def current_index_id(directory: Path) -> str | None:
    """The id of the index in `directory` as its current snapshot's manifest says (unverified), or None."""
    name = current_name(directory)
    if name is None:
        return None
    try:
        return json.loads((directory / name / MANIFEST).read_text()).get("index_id") or None
    except (OSError, ValueError):
        return None


def check_files(folder: Path, manifest: dict[str, Any], from_disk: bool = False) -> list[SnapshotFile]:
    """Every file the manifest lists, with its size and sha256 compared; `from_disk`: read past the page cache."""
    checked = []
    for file_name, expected in manifest["files"].items():
        path = folder / file_name
        size = path.stat().st_size if path.is_file() else None
        listed_size = manifest.get("sizes", {}).get(file_name, size)  # snapshots written before sizes were listed
        if size is None:
            problem = "missing"
        elif size != listed_size:
            problem = f"{size} bytes, its manifest says {listed_size}"
        elif file_sha256(path, from_disk) != expected:
            problem = "sha256 differs from its manifest"
        else:
            problem = None
        checked.append(SnapshotFile(path, size, problem))
    return checked


def read_manifest(folder: Path, from_disk: bool = False) -> dict[str, Any]:
    """A snapshot's manifest, after checking every file it lists against its size and sha256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        damaged = [file for file in check_files(folder, manifest, from_disk) if file.problem]
    except (OSError, ValueError, KeyError) as error:
        raise IndexStoreError(f"index snapshot {folder} can't be read: {error}") from error
    if damaged:
        raise IndexStoreError(f"index file {damaged[0].path} is damaged ({damaged[0].problem})")
    return manifest


def read_snapshot(folder: Path, ef: int) -> Snapshot:
    """Load a verified snapshot; `ef` is the query-time setting (the graph's own parameters are the manifest's)."""
    manifest = read_manifest(folder)
    params = IndexParams(**{**manifest["params"], "ef": ef})
    projection = Projection.load(folder / PROJECTION) if manifest.get("projection") else None
    try:
        items = (read_item(row) for row in json.loads((folder / ITEMS).read_text()))
        index = VectorIndex.load(params, folder / VECTORS, items, manifest["next_label"])
    except (OSError, ValueError, RuntimeError) as error:  # hnswlib raises RuntimeError on a file it can't read
        raise IndexStoreError(f"index snapshot {folder} can't be read: {error}") from error
    identity = ModelIdentity(**manifest["model"])
    index_id = manifest.get("index_id", "")
    return Snapshot(folder.name, index_id, manifest["seq"], identity, params, projection, index, manifest["items"])


def read_item(row: list[Any]) -> tuple[str, Item]:
    """One product of items.json: [id, [[sha256, image, label], ...], metadata, metadata sha256]."""
    if len(row) == 5:  # written before products had several photos: [id, label, metadata, image sha256, metadata's]
        item_id, label, metadata, image_sha, meta_sha = row
        return item_id, Item(metadata, [Photo(image_sha, metadata.get("image"), label)], meta_sha)
    item_id, photos, metadata, meta_sha = row
    return item_id, Item(metadata, [Photo(digest, image, label) for digest, image, label in photos], meta_sha)


def write_snapshot(
    directory: Path,
    index_id: str,
    seq: int,
    identity: ModelIdentity,
    index: VectorIndex,
    projection: Projection | None,
    model_file: str = "",
) -> str:
    """Write index + items + manifest to a new folder, verify it, and switch `CURRENT` to it; returns the new name.

    The snapshot before the previous one is removed: the previous one stays for readers that are loading it. A
    snapshot that does not read back as written raises IndexStoreError, and CURRENT stays as it was."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    index.save_vectors(staging / VECTORS)
    files = [VECTORS, ITEMS]
    if projection is not None:
        projection.save(staging / PROJECTION)
        files.append(PROJECTION)
    items = [
        [item_id, [[*photo.as_list(), photo.label] for photo in item.photos], item.metadata, item.metadata_sha256]
        for item_id, item in index.items.items()
    ]
    items_data = json.dumps(items, separators=(",", ":")).encode()
    (staging / ITEMS).write_bytes(items_data)
    for name in files:
        fsync_path(staging / name)
    # The items' sha256 is what was meant to be written; hnswlib writes its file itself, so that one is read back.
    digests = {
        name: hashlib.sha256(items_data).hexdigest() if name == ITEMS else file_sha256(staging / name) for name in files
    }
    manifest = {
        "format": FORMAT,
        "index_id": index_id,
        "seq": seq,
        "next_label": index.next_label,
        "items": len(index),
        "model": asdict(identity),
        "model_file": model_file,  # where the owner opens the model the index belongs to (`worker.aliases`)
        "params": asdict(index.params),
        "projection": projection.describe() if projection else None,
        "files": digests,
        "sizes": {name: (staging / name).stat().st_size for name in files},
    }
    atomic_write_bytes(staging / MANIFEST, json.dumps(manifest, indent=2).encode())
    # A fresh name every time: the snapshot CURRENT names is never touched until CURRENT names another.
    final = directory / f"{PREFIX}{seq:020d}-{uuid.uuid4().hex[:8]}"
    staging.rename(final)
    fsync_path(directory)
    read_manifest(final, from_disk=True)  # CURRENT only ever names a snapshot that reads back as it was written
    previous = current_name(directory)
    atomic_write_bytes(directory / CURRENT, final.name.encode())
    remove_snapshots(directory, keep={final.name, previous})
    return final.name


def remove_snapshots(directory: Path, keep: set[str | None]) -> None:
    """Remove unfinished snapshots, and finished ones not in `keep`."""
    for path in directory.iterdir():
        finished = path.name.startswith(PREFIX)
        if path.is_dir() and (path.name.startswith(STAGING_PREFIX) or (finished and path.name not in keep)):
            shutil.rmtree(path, ignore_errors=True)
