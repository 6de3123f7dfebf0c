"""`lookalike index check`: an index folder's snapshot and log as they are on disk, read without changing anything.

It takes no lock, so it runs beside a live owner too; that owner's newest log may grow while it is read (a batch
being written then shows as a torn tail, which is no damage).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import LookalikeError
from worker.snapshots import MANIFEST, check_files, current_name
from worker.wal import WriteAheadLog


@dataclass
class IndexCheck:
    """What `check_index` found: a line for each thing looked at, and the damage that keeps the owner from starting."""

    lines: list[str] = field(default_factory=list)
    damage: list[str] = field(default_factory=list)
    logged_changes: int = 0  # changes in the log after the snapshot: what start-up replays

    def damaged(self, line: str) -> None:
        self.lines.append(f"  DAMAGED: {line}")
        self.damage.append(line)


def check_index(directory: Path) -> IndexCheck:
    if not directory.is_dir():
        raise LookalikeError(f"index folder {directory} does not exist; give the right one with --index-dir")
    check = IndexCheck([f"index folder {directory}"])
    snapshot_seq = _check_snapshot(directory, check)
    for report in WriteAheadLog(directory).inspect():
        changes = f", changes {report.first_seq} to {report.last_seq}" if report.records else ""
        check.lines.append(f"log {report.path.name}: {report.records} records{changes}, {report.size:,} bytes")
        if report.torn:
            check.lines.append(f"  torn tail at byte {report.end} (a write never acknowledged: the owner cuts it)")
        elif report.damaged:
            after = "valid records follow it" if report.valid_after_end else "newer log files follow it"
            check.damaged(f"{report.path.name} at byte {report.end} ({after})")
        if report.last_seq is not None:
            check.logged_changes += max(0, report.last_seq - max(report.first_seq, snapshot_seq + 1) + 1)
    return check


def _check_snapshot(directory: Path, check: IndexCheck) -> int:
    """Report the snapshot CURRENT names, its files verified; returns its sequence number (0: none)."""
    name = current_name(directory)
    if name is None:
        check.lines.append("snapshot: none yet (the owner starts from the log alone)")
        return 0
    folder = directory / name
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = check_files(folder, manifest)
    except (OSError, ValueError, KeyError) as error:
        check.lines.append(f"snapshot {name}")
        check.damaged(f"snapshot {name} can't be read: {error}")
        return 0
    check.lines.append(
        f"snapshot {name}: index {manifest.get('index_id') or '(no id)'}, change {manifest['seq']}, "
        f"{manifest['items']:,} items, model {manifest['model']['sha256'][:12]}"
    )
    for file in files:
        if file.problem:
            check.damaged(f"{name}/{file.path.name}: {file.problem}")
        else:
            check.lines.append(f"  {file.path.name}: {file.size:,} bytes, sha256 verified")
    return manifest["seq"]
