"""Which index serves: the index folder holds one folder per index and an alias naming the serving one.

    LOCK           flock held by the index owner: one writer for every index in the folder
    ALIAS          JSON {serving, previous, building}: folders relative to the index folder, replaced atomically
    indexes/<id>/  one index (CURRENT, snapshots, log: `worker.store`), named by its index id
    CURRENT, snapshot-*, wal-*   an index from before aliases, adopted in place as the folder "."

An index belongs to one model (its manifest names the model's file and sha256). A new model gets a new index,
built beside the serving one and switched in by replacing ALIAS; the one it replaced stays for a rollback until
it is deleted (`worker.owner`). Replicas find the serving index through ALIAS, read-only.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.files import atomic_write_bytes
from worker.evaluation.calibration import read_calibration
from worker.snapshots import CURRENT, MANIFEST, PREFIX, STAGING_PREFIX, current_name
from worker.wal import PREFIX as LOG_PREFIX

ALIAS = "ALIAS"
INDEXES = "indexes"
ADOPTED = "."  # an index from before aliases, in the index folder itself


@dataclass
class Build:
    """An index being built beside the serving one: its folder, its model, and the job of each round so far."""

    folder: str
    model: str  # the model file, as every embed worker reaches it
    jobs: list[str] = field(default_factory=list)  # each round embeds what the index lacks; the last one runs
    allow_missing: int = 0  # serving items the operator accepts to lose in the switch (none could be carried over)
    missing: int = 0  # serving items it could not carry over, beyond allow_missing: it stopped short of the switch


@dataclass
class Alias:
    serving: str
    previous: str | None = None  # the index a switch replaced: what `lookalike index rollback` goes back to
    building: Build | None = None

    def as_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()


def read_alias(index_dir: Path) -> Alias | None:
    """The alias as ALIAS says, or None where there is none (a new folder, or one from before aliases)."""
    try:
        raw = json.loads((index_dir / ALIAS).read_text())
    except FileNotFoundError:
        return None
    building = raw.get("building")
    return Alias(raw["serving"], raw.get("previous"), Build(**building) if building else None)


def write_alias(index_dir: Path, alias: Alias) -> None:
    """Replace ALIAS in one step: a reader finds the old alias or the new one, never a mix."""
    atomic_write_bytes(index_dir / ALIAS, alias.as_json())


def holds_an_index(folder: Path) -> bool:
    """Whether `folder` itself holds an index's files (a snapshot or a log), as one from before aliases does."""
    return (folder / CURRENT).exists() or any(folder.glob(f"{LOG_PREFIX}*"))


def new_folder() -> str:
    """The folder of a new index, named by the index id it gets."""
    return f"{INDEXES}/{uuid.uuid4().hex}"


def alias_for_owner(index_dir: Path) -> Alias:
    """The alias the owner serves: as ALIAS says; else an index from before aliases, adopted in place; else a new
    index. The two last are written to ALIAS at once."""
    alias = read_alias(index_dir)
    if alias is None:
        alias = Alias(ADOPTED if holds_an_index(index_dir) else new_folder())
        write_alias(index_dir, alias)
    return alias


def serving_folder(index_dir: Path) -> Path:
    """Where the serving index is, for a reader (read-only: before the owner wrote ALIAS, the folder itself)."""
    alias = read_alias(index_dir)
    return index_dir / alias.serving if alias else index_dir


def manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of the snapshot `folder`'s CURRENT names (unverified), or None."""
    name = current_name(folder)
    if name is None:
        return None
    try:
        return json.loads((folder / name / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def remove_index(index_dir: Path, folder: str) -> None:
    """Delete an index's files; the adopted one leaves the folder it shares with the others."""
    if folder != ADOPTED:
        shutil.rmtree(index_dir / folder, ignore_errors=True)
        return
    for path in index_dir.iterdir():
        if path.name.startswith((PREFIX, STAGING_PREFIX)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name == CURRENT or path.name.startswith(LOG_PREFIX):
            path.unlink(missing_ok=True)


def describe(index_dir: Path) -> list[dict[str, Any]]:
    """Every index in the folder, as `lookalike index list` shows it: id, folder, model, items, change, role, and
    the labels of its calibration ("" without one)."""
    alias = read_alias(index_dir)
    folders = [ADOPTED] if holds_an_index(index_dir) else []
    folders += sorted(f"{INDEXES}/{path.name}" for path in (index_dir / INDEXES).glob("*") if path.is_dir())
    roles = {}
    if alias:
        roles = {alias.serving: "serving", alias.previous: "previous (for rollback)"}
        if alias.building:
            missing = alias.building.missing
            roles[alias.building.folder] = f"building, stopped: {missing:,} items missing" if missing else "building"
    rows = []
    for folder in folders:
        found = manifest(index_dir / folder) or {}
        rows.append(
            {
                "index_id": found.get("index_id") or Path(folder).name,
                "folder": folder,
                "role": roles.get(folder, "kept"),
                "model": found.get("model_file") or (found.get("model") or {}).get("sha256", "")[:12],
                "items": found.get("items", 0),
                "seq": found.get("seq", 0),
                "calibrated": calibrated_labels(index_dir / folder),
            }
        )
    return rows


def calibrated_labels(folder: Path) -> str:
    try:
        calibration = read_calibration(folder)
    except ValueError:  # the owner logs why it serves this index uncalibrated
        return "damaged"
    return ",".join(calibration.labels) if calibration else ""


def find_folder(index_dir: Path, index_id: str) -> str | None:
    """The folder of the index with id (or folder name) `index_id`."""
    for row in describe(index_dir):
        if index_id in (row["index_id"], row["folder"]):
            return row["folder"]
    return None
