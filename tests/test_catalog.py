"""Catalogue sources: every accepted form, bad rows as item errors, nothing read from outside the roots."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from common.areas import CatalogError, resolve_reference
from common.settings import Settings
from worker.catalog import plan_catalog


@pytest.fixture
def settings(tmp_path) -> Settings:
    root = tmp_path / "catalog"
    root.mkdir()
    return Settings.from_env({"LOOKALIKE_CATALOG_ROOT": str(root), "LOOKALIKE_DATA_DIR": str(tmp_path / "data")})


def jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8 pretend")  # planning never decodes; the embed workers do
    return path


def test_a_csv_with_ids_image_paths_and_metadata(settings):
    root = settings.catalog_root
    jpeg(root / "shop" / "photos" / "a.jpg")
    jpeg(root / "shop" / "photos" / "b.jpg")
    (root / "shop" / "items.csv").write_text(
        "id,image,name,colour\n"
        "A1,photos/a.jpg,Blue shirt,blue\n"
        'B2,photos/b.jpg,"Shirt, red",\n'
        "A1,photos/b.jpg,again,red\n"
        "C3,photos/missing.jpg,gone,grey\n"
        "D4,../../outside.jpg,escape,none\n"
        ",photos/a.jpg,no id,none\n"
    )
    plan = plan_catalog(settings, "shop/items.csv")
    assert [(item.id, item.area, item.path, item.metadata) for item in plan.items] == [
        ("A1", "catalog", "shop/photos/a.jpg", {"name": "Blue shirt", "colour": "blue"}),
        ("B2", "catalog", "shop/photos/b.jpg", {"name": "Shirt, red"}),
    ]
    codes = {key: error["code"] for key, error in plan.errors.items()}
    assert codes == {
        "A1 (row 4)": "duplicate_id",
        "C3": "missing_file",
        "D4": "outside_root",
        "row 7": "invalid_row",
    }
    assert plan.total == 6


def test_the_fashion_dataset_layout_finds_each_rows_image_by_id(settings):
    folder = settings.catalog_root / "fashion"
    jpeg(folder / "images" / "15970.jpg")
    (folder / "styles.csv").write_text(
        "id,gender,articleType,productDisplayName\n"
        "15970,Men,Shirts,Turtle Check Men Navy Blue Shirt\n"
        '44065,Men,Perfume,"Boss Men Perfume, After Shave Balm"\n'
        "3413,Men,Tshirts,Yes, its all about me,White T-shirt\n"
    )
    plan = plan_catalog(settings, str(folder))
    assert [(item.id, item.path) for item in plan.items] == [("15970", "fashion/images/15970.jpg")]
    assert plan.items[0].metadata == {"gender": "Men", "articleType": "Shirts",
                                      "productDisplayName": "Turtle Check Men Navy Blue Shirt"}  # fmt: skip
    assert {key: error["code"] for key, error in plan.errors.items()} == {
        "44065": "missing_file",
        "3413 (malformed)": "invalid_row",
    }


def test_a_folder_of_images_with_a_metadata_csv(settings):
    folder = settings.catalog_root / "drop"
    jpeg(folder / "x1.jpg")
    jpeg(folder / "sub" / "x2.png")
    jpeg(folder / "sub" / "x1.webp")
    (folder / "notes.txt").write_text("ignored")
    (settings.catalog_root / "meta.csv").write_text("id,brand\nx1,Acme\n")
    plan = plan_catalog(settings, str(folder), str(settings.catalog_root / "meta.csv"))
    assert {item.id: (item.path, item.metadata) for item in plan.items} == {
        "x1": ("drop/sub/x1.webp", {"brand": "Acme"}),
        "x2": ("drop/sub/x2.png", {}),
    }
    assert [error["code"] for error in plan.errors.values()] == ["duplicate_id"]


def test_a_tar_archive_is_unpacked_once_and_hostile_members_are_skipped(settings):
    archive = settings.catalog_root / "catalog.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        absolute = str(settings.data_dir / "absolute.jpg")
        members = [("images/1.jpg", b"\xff\xd8a"), ("images/2.jpg", b"\xff\xd8b"), ("../evil.jpg", b"x")]
        for name, data in [*members, (absolute, b"y")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind, target in (("images/3.jpg", tarfile.SYMTYPE, "/etc/passwd"),
                                   ("images/4.jpg", tarfile.LNKTYPE, "../../../../etc/passwd")):  # fmt: skip
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, target
            tar.addfile(link)
    plan = plan_catalog(settings, "catalog.tar.gz")
    assert sorted((item.id, item.area) for item in plan.items) == [("1", "archives"), ("2", "archives")]
    assert not (settings.data_dir / "evil.jpg").exists() and not (settings.data_dir / "absolute.jpg").exists()
    assert not list(settings.archives_dir.rglob("3.jpg")) and not list(settings.archives_dir.rglob("4.jpg"))
    again = plan_catalog(settings, "catalog.tar.gz")
    assert [item.path for item in again.items] == [item.path for item in plan.items]


def test_sources_outside_the_root_and_unknown_forms_are_refused(settings, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(CatalogError, match="is outside the catalogue root"):
        plan_catalog(settings, str(outside))
    with pytest.raises(CatalogError, match="does not exist"):
        plan_catalog(settings, "nothing-here")
    (settings.catalog_root / "list.txt").write_text("1,2")
    with pytest.raises(CatalogError, match="not a CSV file, a folder or a tar archive"):
        plan_catalog(settings, "list.txt")
    (settings.catalog_root / "noid.csv").write_text("sku,image\n1,a.jpg\n")
    with pytest.raises(CatalogError, match="has no 'id' column"):
        plan_catalog(settings, "noid.csv")


@pytest.mark.parametrize("reference", ["../x.jpg", "/etc/passwd", "a/../../x.jpg"])
def test_references_are_resolved_only_inside_their_area(settings, reference):
    with pytest.raises(CatalogError, match="outside the catalogue root"):
        resolve_reference(settings, "catalog", reference)


def test_a_link_inside_the_root_that_points_outside_is_refused(settings):
    (settings.catalog_root / "link.jpg").symlink_to("/etc/hostname")
    with pytest.raises(CatalogError, match="leads outside"):
        resolve_reference(settings, "catalog", "link.jpg")
    with pytest.raises(CatalogError, match="unknown catalogue area"):
        resolve_reference(settings, "home", "x.jpg")
