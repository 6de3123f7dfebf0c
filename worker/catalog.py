"""Catalogue sources -> items to load: a CSV, a folder of images, a tar archive, or the Fashion dataset layout.

Items carry references to their images (see `common.areas`), never the image bytes.
"""

from __future__ import annotations

import csv
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from common.areas import ARCHIVE_SUFFIXES, CatalogError, locate, shown
from common.errors import ErrorCode
from common.files import file_sha256
from common.images import IMAGE_SUFFIXES
from common.settings import Settings
from protocol.jobs import item_error

DATASET_CSV = "styles.csv"
CSV_CHUNK_ROWS = 10_000  # rows parsed between two checks of LOOKALIKE_MAX_CSV_ROWS
ID_COLUMN, IMAGE_COLUMN = "id", "image"


@dataclass
class CatalogItem:
    id: str
    area: str  # "catalog", "uploads" or "archives": which configured folder `path` is relative to
    path: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_message(self) -> dict[str, Any]:
        return {"id": self.id, "area": self.area, "path": self.path, "metadata": self.metadata}


@dataclass
class CatalogPlan:
    """What a load will do: the items to embed and the rows refused up front (by row id)."""

    items: list[CatalogItem] = field(default_factory=list)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.items) + len(self.errors)


def plan_catalog(settings: Settings, source: str, metadata_csv: str | None = None) -> CatalogPlan:
    """Read a catalogue source (absolute path, or relative to the catalogue root) into items and row errors."""
    path = Path(source) if Path(source).is_absolute() else settings.catalog_root / source
    _inside_an_area(settings, path)
    if not path.exists():
        raise CatalogError(f"catalogue {shown(settings, path)} does not exist")
    metadata = _read_metadata(settings, metadata_csv) if metadata_csv else None
    if path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
        path = unpack_archive(settings, path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _plan_csv(settings, path)
    if path.is_dir() and (path / DATASET_CSV).is_file() and metadata is None:
        return _plan_csv(settings, path / DATASET_CSV)
    if path.is_dir():
        return _plan_folder(settings, path, metadata)
    raise CatalogError(f"{shown(settings, path)} is not a CSV file, a folder or a tar archive")


def _inside_an_area(settings: Settings, path: Path) -> None:
    try:
        locate(settings, path)
    except CatalogError:
        raise CatalogError(f"{path.name} is outside the catalogue root (LOOKALIKE_CATALOG_ROOT)") from None


def _reason(error: Exception) -> str:
    """An error in words for a job record: an OSError's text names a server path, its strerror doesn't."""
    return (error.strerror if isinstance(error, OSError) else None) or str(error)


def _plan_csv(settings: Settings, csv_path: Path) -> CatalogPlan:
    """One row per product: `id`, optional `image` (relative to the CSV; default images/<id>.jpg), metadata."""
    plan = CatalogPlan()
    rows = _read_rows(settings, csv_path, plan)
    if rows.empty and not plan.errors:
        return plan
    if ID_COLUMN not in rows.columns:
        columns = ", ".join(rows.columns)
        raise CatalogError(f"{shown(settings, csv_path)} has no {ID_COLUMN!r} column (columns: {columns})")
    seen: set[str] = set()
    for row_number, row in enumerate(rows.to_dict("records"), start=2):
        item_id = str(row.pop(ID_COLUMN, "")).strip()
        image = str(row.pop(IMAGE_COLUMN, "") or f"images/{item_id}.jpg").strip()
        if not item_id:
            plan.errors[f"row {row_number}"] = item_error(ErrorCode.INVALID_ROW, f"row {row_number} has no id")
            continue
        if item_id in seen:
            plan.errors[f"{item_id} (row {row_number})"] = item_error(
                ErrorCode.DUPLICATE_ID, f"id {item_id} appears again on row {row_number}; the first row was loaded"
            )
            continue
        seen.add(item_id)
        _add(settings, plan, item_id, csv_path.parent / image, image, _clean(row))
    return plan


def _plan_folder(settings: Settings, folder: Path, metadata: dict[str, dict[str, Any]] | None) -> CatalogPlan:
    """Every image under `folder` is an item whose id is its file name without the suffix."""
    plan = CatalogPlan()
    seen: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        if not _is_utf8(str(path.relative_to(folder))):
            # Python hands an undecodable byte on as a lone surrogate, which no job record or message can carry
            shown = os.fsencode(path.relative_to(folder)).decode("utf-8", "backslashreplace")
            plan.errors[shown] = item_error(
                ErrorCode.INVALID_NAME, f"the file name {shown} is not valid UTF-8; rename the file to load it"
            )
            continue
        item_id = path.stem
        if item_id in seen:
            plan.errors[str(path.relative_to(folder))] = item_error(
                ErrorCode.DUPLICATE_ID, f"id {item_id} is also {seen[item_id].relative_to(folder)}; that one was loaded"
            )
            continue
        seen[item_id] = path
        _add(settings, plan, item_id, path, str(path.relative_to(folder)), (metadata or {}).get(item_id, {}))
    return plan


def _add(settings: Settings, plan: CatalogPlan, item_id: str, path: Path, shown: str, metadata: dict) -> None:
    try:
        area, relative = locate(settings, path)
    except CatalogError:
        plan.errors[item_id] = item_error(ErrorCode.OUTSIDE_ROOT, f"image {shown} is outside the catalogue root")
        return
    if not path.is_file():
        plan.errors[item_id] = item_error(ErrorCode.MISSING_FILE, f"image {shown} does not exist")
        return
    plan.items.append(CatalogItem(item_id, area, relative.as_posix(), metadata))


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_rows(settings: Settings, csv_path: Path, plan: CatalogPlan) -> pd.DataFrame:
    """The CSV's rows, refused whole over LOOKALIKE_MAX_CSV_BYTES (before reading) or LOOKALIKE_MAX_CSV_ROWS (as
    soon as a chunk of rows passes it); a row with more fields than the header is a row error."""
    malformed = 0

    def bad_line(fields: list[str]) -> None:
        nonlocal malformed
        malformed += 1
        row_id = fields[0] if fields else "?"
        plan.errors[f"{row_id} (malformed)"] = item_error(
            ErrorCode.INVALID_ROW, f"the row of id {row_id} has {len(fields)} fields, more than the header"
        )

    try:
        size = csv_path.stat().st_size
        if size > settings.max_csv_bytes:
            raise CatalogError(
                f"{csv_path.name} is {size:,} bytes, over LOOKALIKE_MAX_CSV_BYTES ({settings.max_csv_bytes:,}); "
                "raise it to load this catalogue"
            )
        chunks, rows = [], 0
        for chunk in pd.read_csv(csv_path, dtype=str, keep_default_na=False, engine="python", on_bad_lines=bad_line,
                                 skipinitialspace=True, chunksize=CSV_CHUNK_ROWS):  # fmt: skip
            chunks.append(chunk)
            rows += len(chunk)
            if rows + malformed > settings.max_csv_rows:
                raise CatalogError(
                    f"{csv_path.name} has more than {settings.max_csv_rows:,} rows (LOOKALIKE_MAX_CSV_ROWS); raise "
                    "it to load this catalogue"
                )
        return pd.concat(chunks) if chunks else pd.DataFrame()
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, csv.Error) as error:
        raise CatalogError(f"{shown(settings, csv_path)} can't be read as CSV: {_reason(error)}") from error
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _read_metadata(settings: Settings, metadata_csv: str) -> dict[str, dict[str, Any]]:
    path = Path(metadata_csv) if Path(metadata_csv).is_absolute() else settings.catalog_root / metadata_csv
    _inside_an_area(settings, path)
    ignored = CatalogPlan()
    rows = _read_rows(settings, path, ignored)
    if ID_COLUMN not in rows.columns:
        raise CatalogError(f"{shown(settings, path)} has no {ID_COLUMN!r} column")
    return {str(row.pop(ID_COLUMN)).strip(): _clean(row) for row in rows.to_dict("records")}


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {str(key).strip(): str(value).strip() for key, value in row.items() if str(value).strip() != ""}


def unpack_archive(settings: Settings, archive: Path) -> Path:
    """Unpack a tar archive once into DATA_DIR/archives/<sha256>/ (only regular files, never outside it)."""
    digest = file_sha256(archive)
    target = settings.archives_dir / digest
    if target.exists():
        return target
    settings.archives_dir.mkdir(parents=True, exist_ok=True)
    # A folder of its own per unpacking: two loads of one archive at once never touch each other's files.
    staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=settings.archives_dir))
    try:
        with tarfile.open(archive) as tar:
            for member in _checked_members(settings, tar, archive.name):
                tar.extract(member, staging, filter="data")
        staging.rename(target)  # atomic: the folder appears whole or not at all
    except (tarfile.TarError, OSError, EOFError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        if target.exists():
            return target  # another load unpacked the same archive first
        raise CatalogError(f"archive {archive.name} can't be unpacked: {_reason(error)}") from error
    return target


def _checked_members(settings: Settings, tar: tarfile.TarFile, name: str) -> list[tarfile.TarInfo]:
    """The members to unpack, every header read and the archive's caps checked before any of them is unpacked."""
    members, unpacked = [], 0
    for count, member in enumerate(tar, start=1):  # links and other skipped members count too: each is a header
        if count > settings.max_archive_members:
            raise CatalogError(
                f"archive {name} holds more than {settings.max_archive_members:,} members "
                "(LOOKALIKE_MAX_ARCHIVE_MEMBERS); raise it to load this archive"
            )
        if not _is_safe(member):
            continue
        if member.issparse():  # a few bytes in the archive that unpack to gigabytes of holes
            raise CatalogError(f"archive {name} holds a sparse file ({member.name}); pack it without --sparse")
        unpacked += member.size
        if unpacked > settings.max_archive_bytes:
            raise CatalogError(
                f"archive {name} unpacks to more than {settings.max_archive_bytes:,} bytes "
                "(LOOKALIKE_MAX_ARCHIVE_BYTES); raise it to load this archive"
            )
        members.append(member)
    return members


def _is_safe(member: tarfile.TarInfo) -> bool:
    """A regular file with a relative path that stays inside; links, devices, `..` and absolute names are skipped."""
    name = PurePosixPath(member.name)
    return member.isfile() and not name.is_absolute() and ".." not in name.parts
