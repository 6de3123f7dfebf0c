"""Catalogue sources: every accepted form, bad rows as item errors, nothing read from outside the roots."""

from __future__ import annotations

import csv
import gzip
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from common.areas import CatalogError, id_problem, resolve_reference
from common.settings import Settings
from protocol.client import Client
from worker.catalog import CatalogItem, PhotoFile, photos_of, plan_catalog


def catalog_settings(tmp_path: Path, **env: str) -> Settings:
    root = tmp_path / "catalog"
    root.mkdir()
    return Settings.from_env({"LOOKALIKE_CATALOG_ROOT": str(root), "LOOKALIKE_DATA_DIR": str(tmp_path / "data"), **env})


@pytest.fixture
def settings(tmp_path) -> Settings:
    return catalog_settings(tmp_path)


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
    a, b = PhotoFile("catalog", "shop/photos/a.jpg"), PhotoFile("catalog", "shop/photos/b.jpg")
    assert [(item.id, item.photos, item.metadata) for item in plan.items] == [
        ("A1", [a, b], {"name": "Blue shirt", "colour": "blue"}),  # line 4 is A1's second photo
        ("B2", [b], {"name": "Shirt, red"}),
    ]
    codes = {key: error["code"] for key, error in plan.errors.items()}
    assert codes == {
        "C3": "missing_file",
        "D4": "outside_root",
        "line 7": "invalid_row",
    }
    assert plan.total == 5


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
    assert [(item.id, item.photos) for item in plan.items] == [
        ("15970", [PhotoFile("catalog", "fashion/images/15970.jpg")])
    ]
    assert plan.items[0].metadata == {"gender": "Men", "articleType": "Shirts",
                                      "productDisplayName": "Turtle Check Men Navy Blue Shirt"}  # fmt: skip
    assert {key: error["code"] for key, error in plan.errors.items()} == {
        "44065": "missing_file",
        "line 4": "invalid_row",
    }


def test_a_folder_of_images_with_a_metadata_csv(settings):
    folder = settings.catalog_root / "drop"
    jpeg(folder / "x1.jpg")
    jpeg(folder / "sub" / "x2.png")
    jpeg(folder / "sub" / "x1.webp")
    (folder / "notes.txt").write_text("ignored")
    (settings.catalog_root / "meta.csv").write_text("id,brand\nx1,Acme\n")
    plan = plan_catalog(settings, str(folder), str(settings.catalog_root / "meta.csv"))
    assert {item.id: (item.photos, item.metadata) for item in plan.items} == {
        "x1": ([PhotoFile("catalog", "drop/sub/x1.webp")], {"brand": "Acme"}),
        "x2": ([PhotoFile("catalog", "drop/sub/x2.png")], {}),
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
    assert sorted((item.id, item.photos[0].area) for item in plan.items) == [("1", "archives"), ("2", "archives")]
    assert not (settings.data_dir / "evil.jpg").exists() and not (settings.data_dir / "absolute.jpg").exists()
    assert not list(settings.archives_dir.rglob("3.jpg")) and not list(settings.archives_dir.rglob("4.jpg"))
    again = plan_catalog(settings, "catalog.tar.gz")
    assert [item.photos for item in again.items] == [item.photos for item in plan.items]


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


def test_a_refused_catalogue_is_named_by_its_reference_never_a_server_path(settings, tmp_path):
    root = settings.catalog_root
    (root / "shop").mkdir()
    (root / "shop" / "noid.csv").write_text("sku,image\n1,a.jpg\n")
    (root / "shop" / "list.txt").write_text("1,2")
    (root / "shop" / "broken.tar").write_bytes(b"not a tar archive at all" * 40)
    (tmp_path / "elsewhere").mkdir()
    sources = {
        str(root / "shop" / "noid.csv"): "catalog/shop/noid.csv has no 'id' column",
        str(root / "shop" / "list.txt"): "catalog/shop/list.txt is not a CSV file",
        str(root / "shop" / "gone"): "catalogue catalog/shop/gone does not exist",
        str(root / "shop" / "broken.tar"): "archive broken.tar can't be unpacked",
        str(tmp_path / "elsewhere"): "elsewhere is outside the catalogue root (LOOKALIKE_CATALOG_ROOT)",
    }
    for source, message in sources.items():
        with pytest.raises(CatalogError) as refused:
            plan_catalog(settings, source)
        assert str(refused.value).startswith(message) and str(tmp_path) not in str(refused.value)


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


def sparse_archive(path: Path, name: str, size: int) -> Path:
    """A .tar.gz of some 130 bytes whose one member is a GNU sparse file of `size` bytes, all holes."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[483:495] = tarfile.itn(size, 12, tarfile.GNU_FORMAT)  # the size it unpacks to; no data blocks follow
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)  # the header's checksum, as tarfile writes it
    path.write_bytes(gzip.compress(bytes(header) + bytes(2 * tarfile.BLOCKSIZE)))
    return path


def test_an_archive_with_a_sparse_member_is_refused_before_anything_is_unpacked(settings):
    archive = sparse_archive(settings.catalog_root / "bomb.tar.gz", "images/1.jpg", 4 * 2**30)
    assert archive.stat().st_size < 200
    with pytest.raises(CatalogError, match=r"archive bomb.tar.gz holds a sparse file \(images/1.jpg\)"):
        plan_catalog(settings, "bomb.tar.gz")
    assert not list(settings.archives_dir.rglob("*.jpg"))


def small_archive(path: Path, members: dict[str, bytes], links: int = 0) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for number in range(links):
            link = tarfile.TarInfo(f"link{number}.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
    return path


@pytest.mark.parametrize(
    ("env", "members", "links", "refusal"),
    [({"LOOKALIKE_MAX_ARCHIVE_MEMBERS": "3"}, 2, 2, "holds more than 3 members .LOOKALIKE_MAX_ARCHIVE_MEMBERS.; raise"),
     ({"LOOKALIKE_MAX_ARCHIVE_BYTES": "1000"}, 2, 0, "unpacks to more than 1,000 bytes .LOOKALIKE_MAX_ARCHIVE_BYTES.")],
    ids=["members", "bytes"],
)  # fmt: skip
def test_an_archive_over_a_cap_is_refused_naming_the_variable_before_anything_is_unpacked(
    tmp_path, env, members, links, refusal
):
    settings = catalog_settings(tmp_path, **env)
    root = settings.catalog_root
    photos = {f"images/{number}.jpg": b"\xff\xd8" + bytes(600) for number in range(members)}
    small_archive(root / "over.tar", photos, links)
    with pytest.raises(CatalogError, match=f"archive over.tar {refusal}"):
        plan_catalog(settings, "over.tar")
    assert not list(settings.archives_dir.rglob("*.jpg"))
    small_archive(root / "within.tar", dict(list(photos.items())[:1]))  # at the caps: unpacked
    assert [item.id for item in plan_catalog(settings, "within.tar").items] == ["0"]


@pytest.mark.parametrize(
    ("env", "refusal"),
    [({"LOOKALIKE_MAX_CSV_BYTES": "50"}, r"items.csv is 58 bytes, over LOOKALIKE_MAX_CSV_BYTES \(50\); raise it"),
     ({"LOOKALIKE_MAX_CSV_ROWS": "3"}, r"items.csv has more than 3 rows \(LOOKALIKE_MAX_CSV_ROWS\); raise it")],
    ids=["bytes", "rows"],
)  # fmt: skip
def test_a_csv_over_a_cap_is_refused_naming_the_variable(tmp_path, env, refusal):
    settings = catalog_settings(tmp_path, **env)
    root = settings.catalog_root
    for item_id in "ABCD":
        jpeg(root / "images" / f"{item_id}.jpg")
    (root / "items.csv").write_text("id,name,colour\nA,one,red\nB,two,blue\nC,x,y,z,w\nD,four,grey\n")  # C counts too
    with pytest.raises(CatalogError, match=refusal):
        plan_catalog(settings, "items.csv")
    (root / "items.csv").write_text("id,name,colour\nA,one,red\nB,two,blue\nC,3,x\n")  # within the caps
    assert [item.id for item in plan_catalog(settings, "items.csv").items] == ["A", "B", "C"]


def test_file_names_that_are_not_utf8_are_item_errors_and_the_rest_is_planned(settings):
    folder = settings.catalog_root / "drop"
    jpeg(folder / "fine.jpg")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as file:  # Latin-1, as an old camera names it
        file.write(b"\xff\xd8 pretend")
    archive = settings.catalog_root / "drop.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in ("images/fine.jpg", "images/caf\udce9.jpg"):  # the second holds the byte 0xE9 as it is
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"\xff\xd8a"))
    for source, shown in (("drop", "caf\\xe9.jpg"), ("drop.tar", "images/caf\\xe9.jpg")):
        plan = plan_catalog(settings, source)
        assert [item.id for item in plan.items] == ["fine"]
        message = f"the file name {shown} is not valid UTF-8; rename the file to load it"
        assert plan.errors == {shown: {"code": "invalid_name", "message": message}}


STRAY_QUOTES = (
    "id,name,colour\n"
    'A,"Blue\nshirt",blue\n'  # a quoted cell over two lines: the next row starts on line 4, not row 3
    'B,"12"" wide,red\n'  # the quote that opens the cell never closes
    'C,"Shirt, red",red\n'
    "D,plain,grey\n"
    'E,"no end,grey\n'  # nor here, up to the end of the file
)


def test_a_stray_quote_fails_only_its_own_row_naming_its_line(settings):
    for item_id in "ABCDE":
        jpeg(settings.catalog_root / "images" / f"{item_id}.jpg")
    (settings.catalog_root / "items.csv").write_text(STRAY_QUOTES)
    plan = plan_catalog(settings, "items.csv")
    assert [(item.id, item.metadata) for item in plan.items] == [
        ("A", {"name": "Blue\nshirt", "colour": "blue"}),
        ("C", {"name": "Shirt, red", "colour": "red"}),
        ("D", {"name": "plain", "colour": "grey"}),
    ]
    assert {key: error["code"] for key, error in plan.errors.items()} == {
        "line 4": "invalid_row",
        "line 7": "invalid_row",
    }
    assert plan.errors["line 4"]["message"].startswith("line 4 of items.csv is not valid CSV: a cell that starts with")


def test_a_200_kb_description_cell_is_read_whole(settings):
    description = "<p>" + "Soft cotton, <b>washable</b>. " * 6_700 + "</p>"
    assert len(description) > 200_000  # the csv module reads cells of at most 131,072 characters unless told more
    for item_id in "ABC":
        jpeg(settings.catalog_root / "images" / f"{item_id}.jpg")
    with (settings.catalog_root / "items.csv").open("w", newline="") as file:
        csv.writer(file).writerows([("id", "description"), ("A", "short"), ("B", description), ("C", "short too")])
    plan = plan_catalog(settings, "items.csv")
    assert plan.errors == {}
    assert [(item.id, item.metadata["description"]) for item in plan.items] == [
        ("A", "short"), ("B", description), ("C", "short too")
    ]  # fmt: skip


def test_an_archive_of_one_top_level_folder_finds_its_styles_csv_there(settings):
    shop = settings.catalog_root / "shop"
    for item_id in ("1", "2"):
        jpeg(shop / "images" / f"{item_id}.jpg")
    (shop / "styles.csv").write_text("id,gender,articleType\n1,Men,Shirts\n2,Women,Tops\n")
    subprocess.run(["tar", "czf", "shop.tgz", "shop/"], cwd=settings.catalog_root, check=True)
    plan = plan_catalog(settings, "shop.tgz")
    assert plan.errors == {}
    assert [(item.id, item.photos[0].area, item.metadata) for item in plan.items] == [
        ("1", "archives", {"gender": "Men", "articleType": "Shirts"}),
        ("2", "archives", {"gender": "Women", "articleType": "Tops"}),
    ]
    assert plan.items[0].photos[0].path.endswith("/shop/images/1.jpg")


def test_rows_that_share_an_id_are_one_product_a_photo_per_row_as_shopify_exports_them(settings):
    shop = settings.catalog_root / "shop"
    for name in ("front.jpg", "back.jpg", "detail.png", "mug.jpg"):
        jpeg(shop / "photos" / name)
    (shop / "products.csv").write_text(
        "id,image,title,vendor,colour\n"
        "shirt,photos/front.jpg,Oxford shirt,Acme,\n"
        "shirt,photos/back.jpg,,,\n"
        "mug,photos/mug.jpg,Mug,Acme,white\n"
        "shirt,photos/detail.png,Ignored title,,blue\n"  # a field no earlier row has is taken from here
    )
    plan = plan_catalog(settings, "shop/products.csv")
    assert plan.errors == {}
    assert [(item.id, [photo.path for photo in item.photos], item.metadata) for item in plan.items] == [
        ("shirt", ["shop/photos/front.jpg", "shop/photos/back.jpg", "shop/photos/detail.png"],
         {"title": "Oxford shirt", "vendor": "Acme", "colour": "blue"}),
        ("mug", ["shop/photos/mug.jpg"], {"title": "Mug", "vendor": "Acme", "colour": "white"}),
    ]  # fmt: skip
    assert plan.total == 2
    assert plan.items[0].as_message() == {
        "id": "shirt",
        "photos": [
            {"area": "catalog", "path": f"shop/photos/{name}"} for name in ("front.jpg", "back.jpg", "detail.png")
        ],
        "metadata": {"title": "Oxford shirt", "vendor": "Acme", "colour": "blue"},
    }


def test_a_photo_named_twice_for_one_product_is_an_error_of_the_later_row(settings):
    for name in ("a.jpg", "b.jpg"):
        jpeg(settings.catalog_root / "photos" / name)
    (settings.catalog_root / "items.csv").write_text("id,image\nP,photos/a.jpg\nP,photos/b.jpg\nP,./photos/a.jpg\n")
    plan = plan_catalog(settings, "items.csv")
    assert [photo.path for photo in plan.items[0].photos] == ["photos/a.jpg", "photos/b.jpg"]
    assert plan.errors == {
        "P (line 4)": {
            "code": "duplicate_id",
            "message": "image ./photos/a.jpg of P appears again on line 4 of items.csv; it was loaded from line 2",
        }
    }


def test_a_row_without_an_image_finds_its_products_photos_in_a_folder_named_by_its_id(settings):
    images = settings.catalog_root / "shop" / "images"
    jpeg(images / "A.jpg")
    jpeg(images / "A" / "ignored.jpg")  # images/A.jpg comes first: the folder is only looked at without it
    for name in ("2.png", "1.jpg", "3.JPEG"):
        jpeg(images / "B" / name)
    (images / "B" / "notes.txt").write_text("not a photo")
    (images / "C").mkdir()  # holds no image
    (settings.catalog_root / "shop" / "items.csv").write_text("id,name\nA,one\nB,two\nC,three\n")
    plan = plan_catalog(settings, "shop/items.csv")
    assert {item.id: [photo.path for photo in item.photos] for item in plan.items} == {
        "A": ["shop/images/A.jpg"],
        "B": ["shop/images/B/1.jpg", "shop/images/B/2.png", "shop/images/B/3.JPEG"],
    }
    assert plan.errors == {"C": {"code": "missing_file", "message": "image images/C.jpg does not exist"}}


def test_a_folder_with_images_of_an_id_and_a_folder_named_by_it_makes_one_product(settings):
    folder = settings.catalog_root / "drop"
    for name in ("images/123.jpg", "images/123/side.jpg", "images/123/back.png", "images/45/front.jpg", "x1.jpg",
                 "sub/x1.jpg", "images/tab\there/a.jpg", "men/images/caps/77.jpg"):  # fmt: skip
        jpeg(folder / name)
    (settings.catalog_root / "meta.csv").write_text("id,brand\n123,Acme\n")
    plan = plan_catalog(settings, "drop", "meta.csv")
    assert {item.id: ([photo.path for photo in item.photos], item.metadata) for item in plan.items} == {
        "123": (["drop/images/123.jpg", "drop/images/123/back.png", "drop/images/123/side.jpg"], {"brand": "Acme"}),
        "45": (["drop/images/45/front.jpg"], {}),
        "x1": (["drop/sub/x1.jpg"], {}),
        "77": (["drop/men/images/caps/77.jpg"], {}),  # images/<id>/ counts right in the loaded folder only
    }
    assert {key: error["code"] for key, error in plan.errors.items()} == {
        "x1.jpg": "duplicate_id",
        "images/tab\there": "invalid_id",
    }
    assert plan.errors["images/tab\there"]["message"].endswith("; rename the folder images/tab\there to load it")
    assert plan.total == 6


def test_photos_over_the_cap_are_errors_of_their_rows_naming_the_variable(tmp_path):
    settings = catalog_settings(tmp_path, LOOKALIKE_MAX_PHOTOS="2")
    root = settings.catalog_root
    for number in range(1, 5):
        jpeg(root / "photos" / f"{number}.jpg")
        jpeg(root / "drop" / "images" / "P" / f"{number}.jpg")
        jpeg(root / "images" / "Q" / f"{number}.jpg")
    rows = "".join(f"P,photos/{number}.jpg\n" for number in range(1, 5))
    (root / "items.csv").write_text(f"id,image\n{rows}Q,\n")  # Q's photos are the four in images/Q/
    plan = plan_catalog(settings, "items.csv")
    assert [[photo.path for photo in item.photos] for item in plan.items] == [
        ["photos/1.jpg", "photos/2.jpg"], ["images/Q/1.jpg", "images/Q/2.jpg"]
    ]  # fmt: skip
    cap = "more than 2 photos (LOOKALIKE_MAX_PHOTOS)"
    assert {key: (error["code"], error["message"]) for key, error in plan.errors.items()} == {
        "P (line 4)": ("invalid_row", f"product P has {cap}; the photo on line 4 of items.csv was not loaded: raise "
                       "it to load more"),
        "P (line 5)": ("invalid_row", f"product P has {cap}; the photo on line 5 of items.csv was not loaded: raise "
                       "it to load more"),
        "Q (line 6)": ("invalid_row", f"product Q has {cap}; 2 photos of line 6 of items.csv were not loaded: raise "
                       "it to load more"),
    }  # fmt: skip
    folder = plan_catalog(settings, "drop")
    assert [photo.path for photo in folder.items[0].photos] == ["drop/images/P/1.jpg", "drop/images/P/2.jpg"]
    assert sorted(folder.errors) == ["images/P/3.jpg", "images/P/4.jpg"]
    assert "LOOKALIKE_MAX_PHOTOS" in folder.errors["images/P/3.jpg"]["message"]


def test_a_missing_photo_is_an_error_of_its_row_and_the_products_other_photos_load(settings):
    for name in ("a.jpg", "c.jpg"):
        jpeg(settings.catalog_root / "photos" / name)
    (settings.catalog_root / "items.csv").write_text(
        "id,image,name\nP,photos/a.jpg,Lamp\nP,photos/gone.jpg,\nP,photos/c.jpg,\nQ,photos/x.jpg,\nQ,photos/y.jpg,\n"
    )
    plan = plan_catalog(settings, "items.csv")
    assert [(item.id, [photo.path for photo in item.photos]) for item in plan.items] == [
        ("P", ["photos/a.jpg", "photos/c.jpg"])
    ]
    assert plan.errors == {
        "P (line 3)": {
            "code": "missing_file",
            "message": "image photos/gone.jpg on line 3 of items.csv does not exist",
        },
        "Q": {"code": "missing_file", "message": "image photos/x.jpg does not exist"},  # no photo of Q: Q fails
        "Q (line 6)": {"code": "missing_file", "message": "image photos/y.jpg on line 6 of items.csv does not exist"},
    }
    assert plan.total == 4


def test_a_message_queued_by_an_older_version_names_its_one_photo():
    old = {"id": "A", "area": "uploads", "path": "shop/a.jpg", "metadata": {"name": "Lamp"}}
    assert photos_of(old) == [PhotoFile("uploads", "shop/a.jpg")]
    photos = [PhotoFile("catalog", "a.jpg"), PhotoFile("archives", "f00/b.jpg")]
    assert photos_of(CatalogItem("A", photos).as_message()) == photos
    assert photos[1].reference == "archives/f00/b.jpg"


REFUSED_IDS = ["A/B", ".", "..", "x" * 201, "tab\there", "back\\slash", "no\u00a0break", "zero\u200bwidth"]


def test_ids_no_url_can_reach_are_invalid_id_errors_naming_the_rule_and_the_other_rows_load(settings):
    accepted = ["ok", "100% #1?", "a b", "é.ü", "...", "x" * 200]
    rows = [*accepted, *REFUSED_IDS]
    for number in range(len(rows)):
        jpeg(settings.catalog_root / "images" / f"{number}.jpg")
    with (settings.catalog_root / "items.csv").open("w", newline="") as file:
        csv.writer(file).writerows([("id", "image"), *((item_id, f"images/{n}.jpg") for n, item_id in enumerate(rows))])
    plan = plan_catalog(settings, "items.csv")
    assert [item.id for item in plan.items] == accepted
    lines = {f"line {len(accepted) + 2 + n}": item_id for n, item_id in enumerate(REFUSED_IDS)}
    assert plan.errors == {
        key: {"code": "invalid_id", "message": f"{id_problem(item_id)}; change it on {key} of items.csv"}
        for key, item_id in lines.items()
    }
    assert plan.errors["line 8"]["message"] == (
        "id 'A/B' is refused: an id is 1 to 200 printable characters, without '/' or '\\', and not '.' or '..'; "
        "change it on line 8 of items.csv"
    )


def test_file_names_that_make_ids_no_url_can_reach_are_invalid_id_errors(settings):
    names = ["..jpg", "...jpg", "back\\slash.jpg", "tab\there.jpg", f"{'x' * 201}.jpg"]  # ids ".", "..", ...
    folder = settings.catalog_root / "drop"
    for name in ["fine.jpg", *names]:
        jpeg(folder / name)
    archive = small_archive(settings.catalog_root / "drop.tar", {name: b"\xff\xd8a" for name in ["fine.jpg", *names]})
    for source in (folder, archive):
        plan = plan_catalog(settings, str(source))
        assert [item.id for item in plan.items] == ["fine"]
        assert plan.errors == {
            name: {"code": "invalid_id", "message": f"{id_problem(name[:-4])}; rename the file {name} to load it"}
            for name in names
        }


@pytest.mark.slow
def test_a_load_with_a_stray_quote_records_that_lines_error_and_indexes_the_other_rows(make_stack, shared_dir):
    stack = make_stack()
    stack.start("index")
    stack.start("embed")
    shop = stack.settings.uploads_dir / "shop"
    photos = sorted((shared_dir / "data" / "fashion" / "images").glob("*.jpg"))
    (shop / "images").mkdir(parents=True)
    for item_id, photo in zip("ABCDE", photos, strict=False):
        shutil.copy(photo, shop / "images" / f"{item_id}.jpg")
    (shop / "items.csv").write_text(STRAY_QUOTES)
    client = Client(stack.settings)
    job = client.follow(client.start_load(shop / "items.csv"), timeout=120)
    assert job["state"] == "partial" and job["progress"] == {"total": 5, "done": 3, "failed": 2}, job
    assert [(error["id"], error["code"]) for error in job["errors"]] == [
        ("line 4", "invalid_row"), ("line 7", "invalid_row")
    ]  # fmt: skip
    assert job["errors"][0]["message"].startswith("line 4 of items.csv is not valid CSV")
    assert client.stats(min_seq=job["seq"])["items"] == 3
    assert client.get_item("C", min_seq=job["seq"])["metadata"]["name"] == "Shirt, red"
