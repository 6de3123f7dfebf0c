"""Catalogue sources -> products to load: a CSV, a folder of images, a tar archive, or the Fashion dataset layout.

A product has one photo or several, the first its main one; items carry references to their photos (see
`common.areas`), never the image bytes.
"""

from __future__ import annotations

import csv
import os
import shutil
import tarfile
import tempfile
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from common.areas import ARCHIVE_SUFFIXES, CatalogError, id_problem, locate, shown
from common.errors import ErrorCode
from common.files import file_sha256
from common.images import IMAGE_SUFFIXES
from common.settings import Settings
from protocol.jobs import item_error

DATASET_CSV = "styles.csv"
UNPACKING = "."  # how the staging folder of an archive being unpacked in DATA_DIR/archives is named: .<sha256>.<random>
ID_COLUMN, IMAGE_COLUMN = "id", "image"


@dataclass(frozen=True)
class PhotoFile:
    """Where a product's photo is, as a load reads it (the index keeps it as a `worker.index.Photo`)."""

    area: str  # "catalog", "uploads" or "archives": which configured folder `path` is relative to
    path: str

    @property
    def reference(self) -> str:
        return f"{self.area}/{self.path}"


@dataclass
class CatalogItem:
    """A product: its photos (the first the main one) and its metadata."""

    id: str
    photos: list[PhotoFile]
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_message(self) -> dict[str, Any]:
        photos = [{"area": photo.area, "path": photo.path} for photo in self.photos]
        return {"id": self.id, "photos": photos, "metadata": self.metadata}


def photos_of(message: dict[str, Any]) -> list[PhotoFile]:
    """A product message's photos; a message queued before products had several names its one photo by itself."""
    if "photos" in message:
        return [PhotoFile(photo["area"], photo["path"]) for photo in message["photos"]]
    return [PhotoFile(message["area"], message["path"])]


@dataclass
class CatalogPlan:
    """What a load will do: the products to embed and the rows refused up front (by row id)."""

    items: list[CatalogItem] = field(default_factory=list)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.items) + len(self.errors)


def batches(messages: list[dict[str, Any]], photos: int) -> Iterator[list[dict[str, Any]]]:
    """Products in batches of about `photos` photos (LOOKALIKE_BATCH); a product's photos stay in one batch."""
    batch: list[dict[str, Any]] = []
    count = 0
    for message in messages:
        size = len(photos_of(message))
        if batch and count + size > photos:
            yield batch
            batch, count = [], 0
        batch.append(message)
        count += size
    if batch:
        yield batch


def plan_catalog(settings: Settings, source: str, metadata_csv: str | None = None) -> CatalogPlan:
    """Read a catalogue source (absolute path, or relative to the catalogue root) into items and row errors."""
    path = Path(source) if Path(source).is_absolute() else settings.catalog_root / source
    _inside_an_area(settings, path)
    if not path.exists():
        raise CatalogError(f"catalogue {shown(settings, path)} does not exist")
    metadata = _read_metadata(settings, metadata_csv) if metadata_csv else None
    if path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
        path = _content(unpack_archive(settings, path))
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


@dataclass
class _Product:
    """A product being planned: its photos so far, each with where it came from, and its unusable photos."""

    id: str
    metadata: dict[str, Any] = field(default_factory=dict)
    photos: dict[PhotoFile, str] = field(default_factory=dict)
    # (row key, the error under it, the error under the product's id when none of its photos is usable)
    unusable: list[tuple[str, dict[str, str], dict[str, str]]] = field(default_factory=list)

    def finish(self, plan: CatalogPlan) -> None:
        """Into the plan: the product when a photo of it is usable, else its first unusable photo's error under its id
        (as a one-photo product fails); its other unusable photos are errors of their rows."""
        if self.photos:
            plan.items.append(CatalogItem(self.id, list(self.photos), self.metadata))
        for number, (key, error, alone) in enumerate(self.unusable):
            if number == 0 and not self.photos:
                plan.errors[self.id] = alone
            else:
                plan.errors.setdefault(key, error)


def _plan_csv(settings: Settings, csv_path: Path) -> CatalogPlan:
    """Rows that share an `id` are one product, a photo per row (as Shopify's product CSV repeats the handle on one
    row per image): `image` is relative to the CSV, default images/<id>.jpg or else the images in images/<id>/; each
    metadata field is the first row's that has it."""
    plan = CatalogPlan()
    products: dict[str, _Product] = {}
    for line, row in _read_rows(settings, csv_path, plan):
        item_id = row.pop(ID_COLUMN, "").strip()
        image = row.pop(IMAGE_COLUMN, "").strip()
        where = f"line {line} of {csv_path.name}"
        if not item_id:
            plan.errors[f"line {line}"] = item_error(ErrorCode.INVALID_ROW, f"{where} has no id")
            continue
        if problem := id_problem(item_id):
            plan.errors[f"line {line}"] = item_error(ErrorCode.INVALID_ID, f"{problem}; change it on {where}")
            continue
        product = products.setdefault(item_id, _Product(item_id))
        for name, value in _clean(row).items():
            product.metadata.setdefault(name, value)
        photos = [(csv_path.parent / image, image)] if image else _default_photos(csv_path.parent, item_id)
        _add_row(settings, plan, product, photos, line, where, named=bool(image))
    for product in products.values():
        product.finish(plan)
    return plan


def _add_row(
    settings: Settings,
    plan: CatalogPlan,
    product: _Product,
    photos: list[tuple[Path, str]],
    line: int,
    where: str,
    named: bool,
) -> None:
    """A CSV row's photos (each path with its name as shown) into its product; `named`: the row's `image` names its
    one photo, rather than the defaults finding them."""
    key, over = f"{product.id} (line {line})", 0
    for path, image in photos:
        photo = _photo(settings, path)
        if isinstance(photo, tuple):
            code, how = photo
            product.unusable.append(
                (key, item_error(code, f"image {image} on {where} {how}"), item_error(code, f"image {image} {how}"))
            )
        elif photo in product.photos:
            if named:  # a repeat in images/<id>/ is a photo a row named already: loaded once, nothing lost
                plan.errors[key] = item_error(
                    ErrorCode.DUPLICATE_ID,
                    f"image {image} of {product.id} appears again on {where}; it was loaded from "
                    f"{product.photos[photo]}",
                )
        elif len(product.photos) >= settings.max_photos:
            over += 1
        else:
            product.photos[photo] = f"line {line}"
    if over:
        what = f"the photo on {where}" if over == 1 else f"{over} photos of {where}"
        plan.errors[key] = _too_many(settings, product.id, what, over)


def _default_photos(folder: Path, item_id: str) -> list[tuple[Path, str]]:
    """The photos of a row without an image (each path with its name as shown): images/<id>.jpg when it exists, else
    the images in images/<id>/ by name when there are any, else images/<id>.jpg (which does not exist)."""
    single, album = folder / "images" / f"{item_id}.jpg", folder / "images" / item_id
    if not single.is_file() and album.is_dir():
        photos = sorted(path for path in album.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
        if photos:
            return [(path, _printable(f"images/{item_id}/{path.name}")) for path in photos]
    return [(single, f"images/{item_id}.jpg")]


def _plan_folder(settings: Settings, folder: Path, metadata: dict[str, dict[str, Any]] | None) -> CatalogPlan:
    """Every image under `folder` is a photo of the product its file name without the suffix names, or, in a folder
    images/<id>/ right in `folder`, its folder names: the single file first, then the folder's images by name."""
    plan = CatalogPlan()
    found: dict[str, tuple[list[Path], list[Path]]] = {}  # id -> (its single file, the images of images/<id>/)
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        relative = path.relative_to(folder)
        if not _is_utf8(str(relative)):
            shown = _printable(str(relative))
            plan.errors[shown] = item_error(
                ErrorCode.INVALID_NAME, f"the file name {shown} is not valid UTF-8; rename the file to load it"
            )
            continue
        in_album = len(relative.parts) == 3 and relative.parts[0] == "images"
        item_id = relative.parts[-2] if in_album else path.stem
        if problem := id_problem(item_id):
            named, kind = (relative.parent, "folder") if in_album else (relative, "file")
            plan.errors[str(named)] = item_error(
                ErrorCode.INVALID_ID, f"{problem}; rename the {kind} {named} to load it"
            )
            continue
        single, album = found.setdefault(item_id, ([], []))
        if in_album:
            album.append(path)
        elif single:
            plan.errors[str(relative)] = item_error(
                ErrorCode.DUPLICATE_ID, f"id {item_id} is also {single[0].relative_to(folder)}; that one was loaded"
            )
        else:
            single.append(path)
    for item_id, (single, album) in found.items():
        product = _Product(item_id, (metadata or {}).get(item_id, {}))
        for path in [*single, *album]:
            relative = str(path.relative_to(folder))
            photo = _photo(settings, path)
            if isinstance(photo, tuple):
                error = item_error(photo[0], f"image {relative} {photo[1]}")
                product.unusable.append((relative, error, error))
            elif photo in product.photos:
                continue  # two links to one file: loaded once, nothing lost
            elif len(product.photos) >= settings.max_photos:
                plan.errors[relative] = _too_many(settings, item_id, relative)
            else:
                product.photos[photo] = relative
        product.finish(plan)
    return plan


def _photo(settings: Settings, path: Path) -> PhotoFile | tuple[ErrorCode, str]:
    """The photo at `path`, or why it can't be one: (error code, what is wrong with it in words)."""
    try:
        area, relative = locate(settings, path)
    except CatalogError:
        return ErrorCode.OUTSIDE_ROOT, "is outside the catalogue root"
    if not _is_utf8(str(relative)):
        return ErrorCode.INVALID_NAME, "has a file name that is not valid UTF-8; rename the file to load it"
    if not path.is_file():
        return ErrorCode.MISSING_FILE, "does not exist"
    return PhotoFile(area, relative.as_posix())


def _too_many(settings: Settings, item_id: str, what: str, count: int = 1) -> dict[str, str]:
    return item_error(
        ErrorCode.INVALID_ROW,
        f"product {item_id} has more than {settings.max_photos} photos (LOOKALIKE_MAX_PHOTOS); {what} "
        f"{'was' if count == 1 else 'were'} not loaded: raise it to load more",
    )


def _printable(name: str) -> str:
    """A file name as a job record can carry it: Python hands an undecodable byte on as a lone surrogate, which no
    job record or message can carry, so it is shown escaped."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_rows(settings: Settings, csv_path: Path, plan: CatalogPlan) -> list[tuple[int, dict[str, str]]]:
    """The CSV's rows, each with the line it starts on (1-based, as an editor shows it) and its cells by column.

    The file is refused whole over LOOKALIKE_MAX_CSV_BYTES (before reading), over LOOKALIKE_MAX_CSV_ROWS (as soon as
    the rows pass it), or without an `id` column; a row that is not valid CSV (a stray quote) or has more fields than
    the header is an error of its own line, and the rows after it are read."""
    name = shown(settings, csv_path)
    try:
        size = csv_path.stat().st_size
        if size > settings.max_csv_bytes:
            raise CatalogError(
                f"{csv_path.name} is {size:,} bytes, over LOOKALIKE_MAX_CSV_BYTES ({settings.max_csv_bytes:,}); "
                "raise it to load this catalogue"
            )
        # A cell is read whole however long (shops export HTML descriptions); the file's own cap bounds it.
        csv.field_size_limit(max(csv.field_size_limit(), settings.max_csv_bytes))
        with csv_path.open(encoding="utf-8-sig", newline="") as file:
            records = ((line, cells) for line, cells in _records(file) if cells not in ([], [""]))  # blank lines
            first, header = next(records, (1, []))
            if header is None:
                raise CatalogError(f"{name} can't be read as CSV: its header, line {first}, has a stray quote")
            columns = _column_names(header)
            if header and ID_COLUMN not in columns:
                raise CatalogError(f"{name} has no {ID_COLUMN!r} column (columns: {', '.join(columns)})")
            rows = []
            for count, (line, cells) in enumerate(records, start=1):
                if count > settings.max_csv_rows:
                    raise CatalogError(
                        f"{csv_path.name} has more than {settings.max_csv_rows:,} rows (LOOKALIKE_MAX_CSV_ROWS); raise "
                        "it to load this catalogue"
                    )
                if cells is None:
                    plan.errors[f"line {line}"] = item_error(
                        ErrorCode.INVALID_ROW,
                        f"line {line} of {csv_path.name} is not valid CSV: a cell that starts with a quote must end "
                        'with one, and a quote inside it is written twice ("12"" wide")',
                    )
                elif len(cells) > len(columns):
                    plan.errors[f"line {line}"] = item_error(
                        ErrorCode.INVALID_ROW,
                        f"line {line} of {csv_path.name} has {len(cells)} fields, more than the header's "
                        f"{len(columns)}; quote the cells that hold a comma",
                    )
                else:
                    rows.append((line, dict(zip(columns, cells, strict=False))))
            return rows
    except (OSError, UnicodeDecodeError) as error:
        raise CatalogError(f"{name} can't be read as CSV: {_reason(error)}") from error


def _records(lines: Iterable[str]) -> Iterator[tuple[int, list[str] | None]]:
    """Each CSV record with the line it starts on; None for one that breaks the quoting rules (a stray quote), whose
    lines, which it would swallow up to the next quote or the end, are read again from the line after its start."""
    source = iter(lines)
    again: deque[str] = deque()  # lines a broken record took, to be read again
    taken: list[str] = []  # the lines of the record being read

    def feed() -> Iterator[str]:
        while (text := again.popleft() if again else next(source, None)) is not None:
            taken.append(text)
            yield text

    line = 1
    while True:
        try:
            for record in csv.reader(feed(), strict=True, skipinitialspace=True):
                yield line, record
                line += len(taken)
                taken.clear()
            return
        except csv.Error:
            yield line, None
            again.extendleft(reversed(taken[1:]))
            taken.clear()
            line += 1


def _column_names(header: list[str]) -> list[str]:
    """The header's names; a blank one is named by its place, a repeated one numbered, so no column hides another."""
    names, seen = [], Counter[str]()
    for place, cell in enumerate(header, start=1):
        name = cell.strip() or f"column {place}"
        names.append(f"{name}.{seen[name]}" if seen[name] else name)
        seen[name] += 1
    return names


def _read_metadata(settings: Settings, metadata_csv: str) -> dict[str, dict[str, Any]]:
    path = Path(metadata_csv) if Path(metadata_csv).is_absolute() else settings.catalog_root / metadata_csv
    _inside_an_area(settings, path)
    ignored = CatalogPlan()
    return {row.pop(ID_COLUMN, "").strip(): _clean(row) for _, row in _read_rows(settings, path, ignored)}


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {str(key).strip(): str(value).strip() for key, value in row.items() if str(value).strip() != ""}


def _content(folder: Path) -> Path:
    """An unpacked archive's catalogue: its one top-level folder when that is all it holds (`tar czf shop.tgz
    shop/`: its styles.csv or images/<id>/ folders are there), unless that is the images/ folder itself."""
    entries = list(folder.iterdir())
    alone = len(entries) == 1 and entries[0].is_dir() and entries[0].name != "images"
    return entries[0] if alone else folder


def unpack_archive(settings: Settings, archive: Path) -> Path:
    """Unpack a tar archive once into DATA_DIR/archives/<sha256>/ (only regular files, never outside it)."""
    digest = file_sha256(archive)
    target = settings.archives_dir / digest
    if target.exists():
        return target
    settings.archives_dir.mkdir(parents=True, exist_ok=True)
    # A folder of its own per unpacking: two loads of one archive at once never touch each other's files.
    staging = Path(tempfile.mkdtemp(prefix=f"{UNPACKING}{digest}.", dir=settings.archives_dir))
    try:
        with tarfile.open(archive) as tar:
            for member in _checked_members(settings, tar, archive.name):
                tar.extract(member, staging, filter="data")
        staging.rename(target)  # atomic: the folder appears whole or not at all
    except (tarfile.TarError, OSError, EOFError) as error:
        if target.exists():
            return target  # another load unpacked the same archive first
        raise CatalogError(f"archive {archive.name} can't be unpacked: {_reason(error)}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # what a refused or failed unpacking left (renamed otherwise)
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
