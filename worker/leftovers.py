"""What catalogue loads leave in the data folder, removed once nothing needs it (the load watchdog runs this).

An upload through the web (DATA_DIR/uploads/<uuid>/: the archive and CSV it saved) is read while its load runs:
planned, or planned again by the watchdog. Its items point at the images unpacked from it into DATA_DIR/archives,
never at the upload, so it goes once no unfinished load names it, or when none ever did (the web died before it
queued the load, or Redis refused it). An unpacking killed on the way (out of memory, the task's time limit) leaves
its staging folder. Unpacked archives stay: indexed items point at their images, and a build embeds them again.
So does DATA_DIR/uploads/photos/, the photos of products sent one at a time (`PUT /api/items/<id>`), kept by their
content (`common.products`): only upload folders named by 32 hex digits are ever removed here.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from common.areas import UPLOAD_FOLDER
from common.settings import Settings
from worker.catalog import UNPACKING

log = logging.getLogger(__name__)

UNCLAIMED_SECONDS = 600  # the web queues the load as soon as it saved the upload; this long after, it never will


def remove_leftovers(settings: Settings, load_sources: Iterable[str | None]) -> list[Path]:
    """Remove uploads that no unfinished load reads (`load_sources`: their sources and metadata files) and the
    staging folders of dead unpackings; returns what was removed."""
    in_use = {Path(source).parent.name for source in load_sources if source}
    now = time.time()
    uploads = [
        folder
        for folder in _folders(settings.uploads_dir)
        if UPLOAD_FOLDER.fullmatch(folder.name) and folder.name not in in_use and _idle(folder, now) > UNCLAIMED_SECONDS
    ]
    # Twice the time limit: by then the task that unpacked is gone, even by the clock of another machine.
    unpackings = [
        folder
        for folder in _folders(settings.archives_dir)
        if folder.name.startswith(UNPACKING) and _idle(folder, now) > 2 * settings.task_time_limit
    ]
    for folder in uploads + unpackings:
        shutil.rmtree(folder, ignore_errors=True)
        log.info("removed %s/%s: nothing needs it any more", folder.parent.name, folder.name)
    return uploads + unpackings


def _folders(parent: Path) -> list[Path]:
    try:
        return [path for path in parent.iterdir() if path.is_dir()]
    except FileNotFoundError:
        return []


def _idle(folder: Path, now: float) -> float:
    """Seconds since the folder or a file directly in it last changed (a file being saved changes as it grows)."""
    try:
        return now - max(path.stat().st_mtime for path in (folder, *folder.iterdir()))
    except FileNotFoundError:  # removed meanwhile
        return 0.0
