"""Catalogue areas: the folders a catalogue item's image may live in, and references that can't leave them; and the
rule an item's id keeps, so that every item a load accepts has a URL.

An image reference is an area ("catalog", "uploads" or "archives") and a path relative to it. Every process
resolves it against its own configured folders, so embed workers and the web may run on other machines.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path, PurePosixPath

from common.errors import LookalikeError
from common.settings import Settings

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # catalogue archives, unpacked into the "archives" area
MAX_PATH_BYTES = 4096  # Linux's PATH_MAX and NAME_MAX: a longer reference can name no file
MAX_NAME_BYTES = 255
UPLOAD_FOLDER = re.compile(r"[0-9a-f]{32}")  # the folder of one catalogue upload through the web (a uuid4's hex)
MAX_ID_LENGTH = 200
ID_RULE = f"an id is 1 to {MAX_ID_LENGTH} printable characters, without '/' or '\\', and not '.' or '..'"


class CatalogError(LookalikeError):
    """The catalogue as a whole can't be read (as opposed to one bad row, which is an item error)."""


def id_problem(item_id: str) -> str | None:
    """Why a load refuses `item_id`, or None: an id is a segment of the item's URLs (API, pages, links), so it can
    hold no separator, nothing a browser would resolve as a path step, and nothing a link can't show."""
    if (
        0 < len(item_id) <= MAX_ID_LENGTH
        and item_id.isprintable()
        and not {"/", "\\"} & set(item_id)
        and item_id not in (".", "..")
    ):
        return None
    shown = f"{item_id[:60]!r}{'...' if len(item_id) > 60 else ''}"
    return f"id {shown} is refused: {ID_RULE}"


def areas(settings: Settings) -> dict[str, Path]:
    return {"catalog": settings.catalog_root, "uploads": settings.uploads_dir, "archives": settings.archives_dir}


def new_upload_folder(settings: Settings) -> Path:
    """Where the web saves one catalogue upload; `worker.leftovers` removes it once no unfinished load needs it."""
    return settings.uploads_dir / uuid.uuid4().hex


def resolve_reference(settings: Settings, area: str, relative: str) -> Path:
    """The file an item reference names, refused when it would lead outside its area (`..`, links, absolute)."""
    roots = areas(settings)
    if area not in roots:
        raise CatalogError(f"unknown catalogue area {area!r}")
    root = roots[area].resolve()
    if "\0" in relative:
        raise CatalogError(f"{relative[:60]!r} is not a file name: it holds a NUL byte")
    if len(relative.encode(errors="surrogateescape")) > MAX_PATH_BYTES:
        raise CatalogError(f"{relative[:60]!r}... is not a file name: it is over {MAX_PATH_BYTES} bytes")
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts:
        raise CatalogError(f"{relative!r} is outside the catalogue root")
    if any(len(part.encode(errors="surrogateescape")) > MAX_NAME_BYTES for part in pure.parts):
        raise CatalogError(f"{relative[:60]!r}... has a name over {MAX_NAME_BYTES} bytes")
    path = (root / pure).resolve()
    if not path.is_relative_to(root):
        raise CatalogError(f"{relative!r} leads outside the catalogue root (a link?)")
    return path


def locate(settings: Settings, path: Path) -> tuple[str, Path]:
    """The area holding `path` and `path` relative to it; refused when it is under none of them."""
    resolved = path.expanduser().resolve()
    for area, root in areas(settings).items():
        if resolved.is_relative_to(root.resolve()):
            return area, resolved.relative_to(root.resolve())
    raise CatalogError(
        f"{path} is outside the catalogue root {settings.catalog_root} (set LOOKALIKE_CATALOG_ROOT to a folder "
        "that holds it)"
    )


def shown(settings: Settings, path: Path | str) -> str:
    """A server path as clients may see it: `area/relative` under a catalogue area, else only its file name (an
    answer or a job's error never shows where the server keeps its files)."""
    try:
        area, relative = locate(settings, Path(path))
    except (CatalogError, OSError, ValueError):
        return Path(path).name
    return f"{area}/{relative.as_posix()}"
