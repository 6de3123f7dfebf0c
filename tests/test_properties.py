"""Property-based tests (hypothesis): request parameters, the catalogue CSV reader, and a bounded decoder fuzz."""

from __future__ import annotations

import contextlib
import csv
import io
import tempfile
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from common.areas import CatalogError
from common.images import ImageError, decode_image, thumbnail_jpeg
from common.settings import Settings
from tests.images import encode
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
def test_item_ids_are_printable_and_bounded_or_a_400(item_id):
    try:
        assert check_item_id(item_id) == item_id
    except ApiError as error:
        assert error.status == 400
    else:
        assert 1 <= len(item_id) <= 200 and item_id.isprintable()


@pytest.fixture(scope="module")
def web(module_redis, tmp_path_factory):
    """The web app on a real Redis with no worker: every valid search ends in 503, every invalid one in 400."""
    from web.app import create_app

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
            assert item.id and isinstance(item.metadata, dict)
        assert all(error["code"] in ("invalid_row", "missing_file", "duplicate_id", "outside_root")
                   for error in plan.errors.values())  # fmt: skip


IDS = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="/\\"), min_size=1, max_size=20
).filter(lambda item_id: item_id.strip() == item_id and item_id not in (".", ".."))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(IDS, st.tuples(CELLS, CELLS), min_size=1, max_size=15))
def test_rows_written_by_a_csv_writer_come_back_as_items(rows):
    """Ids, quoting, commas, quotes and newlines inside cells, unicode: what csv.writer writes, a load reads."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "images").mkdir()
        for item_id in rows:
            try:
                (root / "images" / f"{item_id}.jpg").write_bytes(b"")
            except OSError:
                assume(False)  # a name this file system refuses (too long in bytes)
        with (root / "catalog.csv").open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["id", "colour", "name"])
            writer.writerows([item_id, colour, name] for item_id, (colour, name) in rows.items())
        plan = plan_catalog(_settings(root), "catalog.csv")
    assert plan.errors == {}
    assert [item.id for item in plan.items] == list(rows)
    for item, (colour, name) in zip(plan.items, rows.values(), strict=True):
        expected = {key: value.strip() for key, value in (("colour", colour), ("name", name)) if value.strip()}
        assert item.metadata == expected


def _settings(root: Path) -> Settings:
    return Settings.from_env({"LOOKALIKE_CATALOG_ROOT": str(root), "LOOKALIKE_DATA_DIR": str(root / "data")})


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
