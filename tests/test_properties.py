"""Property-based tests (hypothesis): request parameters, the catalogue CSV reader and the ids it accepts (each read
back through the API and the pages), and a bounded decoder fuzz."""

from __future__ import annotations

import contextlib
import csv
import html
import io
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from markupsafe import escape
from PIL import Image

from common.areas import CatalogError, id_problem
from common.images import ImageError, decode_image, thumbnail_jpeg
from common.settings import Settings
from protocol.client import Client
from tests.images import encode
from web.app import create_app
from web.errors import ApiError
from web.params import MAX_K, check_item_id, parse_filters, parse_k
from worker.catalog import plan_catalog

# -- request parameters ---------------------------------------------------------------------------------------


@given(st.one_of(st.none(), st.text(max_size=40)))
def test_k_is_a_whole_number_from_1_to_100_or_a_400(value):
    try:
        k = parse_k(value)
    except ApiError as error:
        assert error.status == 400 and error.code == "bad_parameter"
    else:
        assert 1 <= k <= MAX_K
        assert value is None or value.strip() == "" or int(value) == k


@given(st.integers(min_value=1, max_value=MAX_K))
def test_every_k_in_range_is_taken_as_it_is(k):
    assert parse_k(str(k)) == k and parse_k(f" {k} ") == k


@given(st.lists(st.text(max_size=250), max_size=25))
def test_filters_are_field_value_pairs_or_a_400(values):
    try:
        filters = parse_filters(values)
    except ApiError as error:
        assert error.status == 400 and error.code == "bad_parameter"
    else:
        assert len(filters) <= 20
        pairs = [(text.partition("=")[0].strip(), text.partition("=")[2]) for text in values]
        assert all(field and (field, value) in pairs for field, value in filters.items())


FIELDS = st.text(st.characters(blacklist_characters="=", blacklist_categories=("Cs",)), min_size=1, max_size=30)


@given(st.dictionaries(FIELDS.filter(lambda f: f.strip() == f and f), st.text(max_size=30), max_size=20))
def test_well_formed_filters_come_back_as_given(pairs):
    assert parse_filters([f"{field}={value}" for field, value in pairs.items()]) == pairs


@given(st.text(max_size=300))
def test_an_item_id_no_load_accepts_is_a_400_naming_the_rule(item_id):
    try:
        assert check_item_id(item_id) == item_id
    except ApiError as error:
        assert error.status == 400 and error.message == id_problem(item_id) and "printable characters" in error.message
    else:
        assert 1 <= len(item_id) <= 200 and item_id.isprintable()
        assert "/" not in item_id and "\\" not in item_id and item_id not in (".", "..")


@pytest.fixture(scope="module")
def web(module_redis, tmp_path_factory):
    """The web app on a real Redis with no worker: every valid search ends in 503, every invalid one in 400."""
    folder = tmp_path_factory.mktemp("properties")
    settings = Settings.from_env({"LOOKALIKE_REDIS_URL": module_redis, "LOOKALIKE_DATA_DIR": str(folder)})
    return create_app(settings).test_client()


PHOTO = encode(Image.new("RGB", (48, 48), (90, 20, 20)), "JPEG")


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(k=st.text(max_size=12), filters=st.lists(st.text(max_size=40), max_size=4), item_id=st.text(max_size=50))
def test_no_request_parameter_makes_the_web_fail(web, k, filters, item_id):
    answer = web.post("/api/search", data={"image": (io.BytesIO(PHOTO), "p.jpg"), "k": k, "filter": filters})
    assert answer.status_code in (400, 503) and answer.is_json, answer.data[:200]
    item = quote(item_id, safe="")
    for path in (f"/api/items/{item}", f"/api/items/{item}/similar?k={quote(k)}"):
        answer = web.get(path)
        assert answer.status_code in (400, 404, 503) and answer.is_json, (path, answer.data[:200])


# -- the catalogue CSV reader ---------------------------------------------------------------------------------

CELLS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=400))
def test_any_csv_text_is_a_plan_or_a_catalog_error(text):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "catalog.csv").write_text(text, encoding="utf-8")
        try:
            plan = plan_catalog(_settings(root), "catalog.csv")
        except CatalogError:
            return
        for item in plan.items:
            assert id_problem(item.id) is None and isinstance(item.metadata, dict)
        assert all(error["code"] in ("invalid_row", "invalid_id", "missing_file", "duplicate_id", "outside_root")
                   for error in plan.errors.values())  # fmt: skip


# Every id a load accepts: 1 to 200 printable characters (letters, marks, digits, punctuation, symbols, the space)
# that the id rule lets through, without the spaces around it that a CSV cell loses.
IDS = st.text(
    st.characters(categories=("L", "M", "N", "P", "S"), include_characters=" "), min_size=1, max_size=200
).filter(lambda item_id: item_id.strip() == item_id and id_problem(item_id) is None)


def write_catalog(folder: Path, rows: dict[str, tuple[str, str]], photo: Path) -> Path:
    """A CSV of `id`, `image` (images/<n>.jpg, a copy of `photo`: a file name any id fits), `colour` and `name`."""
    (folder / "images").mkdir(parents=True)
    with (folder / "catalog.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "image", "colour", "name"])
        for number, (item_id, cells) in enumerate(rows.items()):
            shutil.copy(photo, folder / "images" / f"{number}.jpg")
            writer.writerow([item_id, f"images/{number}.jpg", *cells])
    return folder / "catalog.csv"


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(IDS, st.tuples(CELLS, CELLS), min_size=1, max_size=15))
def test_rows_written_by_a_csv_writer_come_back_as_items(rows):
    """Ids, quoting, commas, quotes and newlines inside cells, unicode: what csv.writer writes, a load reads."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "empty.jpg").write_bytes(b"")
        write_catalog(root, rows, root / "empty.jpg")
        plan = plan_catalog(_settings(root), "catalog.csv")
    assert plan.errors == {}
    assert [item.id for item in plan.items] == list(rows)
    for item, (colour, name) in zip(plan.items, rows.values(), strict=True):
        expected = {key: value.strip() for key, value in (("colour", colour), ("name", name)) if value.strip()}
        assert item.metadata == expected


def _settings(root: Path) -> Settings:
    return Settings.from_env({"LOOKALIKE_CATALOG_ROOT": str(root), "LOOKALIKE_DATA_DIR": str(root / "data")})


@pytest.fixture
def loading(make_stack):
    """An index owner and an embed worker, and the web app in front of them."""
    stack = make_stack()
    stack.start("index")
    stack.start("embed")
    return stack, Client(stack.settings), create_app(stack.settings).test_client()


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(IDS, min_size=1, max_size=6, unique=True))
@example(["100% #1?", "a b", "?k=5#top", "%2F", "A.similar", "...", "é ü 中文 ∑", "<b>&amp;", '"quoted", yes'])
@example(["x" * 200, "-" * 199 + "."])
def test_every_id_a_load_accepts_is_read_by_the_api_and_its_page_and_links_work(loading, shared_dir, ids):
    stack, client, web = loading
    stack.settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=stack.settings.uploads_dir))
    rows = dict.fromkeys(ids, ("red", "a shirt"))
    source = write_catalog(folder, rows, shared_dir / "data" / "fashion" / "images" / "10186.jpg")
    job = client.follow(client.start_load(source), timeout=120)
    assert job["state"] == "done", (job["errors"], job["progress"])
    for item_id in ids:
        answer = web.get(f"/api/items/{quote(item_id, safe='')}?min_seq={job['seq']}")
        assert answer.status_code == 200 and answer.json["id"] == item_id, (item_id, answer.json)
        page = web.get(answer.json["page_url"])
        assert page.status_code == 200 and f"<td>{escape(item_id)}</td>" in page.text, item_id
        for link in re.findall(r'href="(/items/[^"]*)"', page.text):  # "more like this"
            assert web.get(html.unescape(link)).status_code == 200, link


# -- a bounded fuzz run of the decoder -------------------------------------------------------------------------


def _seeds() -> list[bytes]:
    noise = Image.effect_noise((24, 16), 60)
    rgba = noise.convert("RGBA")
    return [
        encode(noise.convert("RGB"), "JPEG"),
        encode(noise.convert("RGB"), "JPEG", progressive=True),
        encode(rgba, "PNG"),
        encode(noise.convert("P"), "GIF"),
        encode(noise.convert("RGB"), "BMP"),
        encode(noise.convert("RGB"), "TIFF"),
        encode(rgba, "WEBP"),
        encode(Image.fromarray(np.arange(384, dtype=np.uint16).reshape(16, 24)), "PNG"),
    ]


SEEDS = _seeds()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + bytearray(draw(st.binary(max_size=64))) + data[cut:]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damage it works around
@settings(max_examples=400, deadline=None)
@given(mutated_images())
def test_the_decoder_turns_any_damaged_image_into_pixels_or_a_coded_error(data):
    """Each damaged file either decodes to the model's input or raises ImageError with a code; nothing else."""
    try:
        pixels = decode_image(data, (32, 32))
    except ImageError as error:
        assert error.code in ("empty", "not_an_image", "truncated", "corrupt", "unsupported_format", "too_large")
    else:
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    with contextlib.suppress(ImageError):
        assert thumbnail_jpeg(data, 64).startswith(b"\xff\xd8")
