"""A real browser (Debian's chromium, driven by Playwright) against the real service on loopback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.images import side_by_side

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# Flags for a closed network: without them chromium keeps trying to reach Google's services.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]  # fmt: skip
SCREENSHOTS = Path(__file__).resolve().parent.parent / "bench" / "output"


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        message = f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    yield context.new_page()
    context.close()


def test_a_shopper_searches_with_a_photo_and_sees_the_gallery(page, served, shared_dir):
    from playwright.sync_api import expect

    page.goto(f"{served.url}/")
    expect(page.locator(".status")).to_contain_text("1,002 products")
    page.set_input_files("#image", str(shared_dir / "data" / "fashion" / "images" / "10186.jpg"))
    expect(page.locator("#preview")).to_be_visible()
    page.fill("input[name=k]", "6")
    page.click("button[type=submit]")

    cards = page.locator(".gallery .card")
    expect(cards).to_have_count(6, timeout=30_000)
    assert "/jobs/" in page.url
    scores = [float(text) for text in page.locator(".gallery .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.999
    assert cards.first.locator("a").get_attribute("href") == "/items/10186"
    page.wait_for_load_state("networkidle")
    widths = page.locator(".gallery img").evaluate_all("images => images.map(image => image.naturalWidth)")
    assert len(widths) == 6 and all(width > 0 for width in widths), "every thumbnail loaded"
    assert page.locator(".query img").evaluate("image => image.naturalWidth") > 0, "the query's own preview"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "results.png", full_page=True)

    cards.nth(1).locator("a").click()
    expect(page.locator("h2")).to_have_text("More like this")
    expect(page.locator(".gallery .card")).to_have_count(12)


def test_a_shopper_draws_a_box_around_one_of_two_products_and_gets_that_ones_lookalikes(
    page, served, shared_dir, tmp_path
):
    from playwright.sync_api import expect

    photo = tmp_path / "two.png"  # a shirt on the left, a handbag on the right, 60 x 80 pixels each
    photo.write_bytes(
        side_by_side(*(shared_dir / "data" / "fashion" / "images" / f"{i}.jpg" for i in ("10186", "10227")))
    )
    page.goto(f"{served.url}/")
    page.set_input_files("#image", str(photo))
    preview = page.locator("#preview")
    expect(preview).to_be_visible()
    page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")

    def drag(start: tuple[float, float], end: tuple[float, float]) -> None:
        """From and to a point given as fractions of the preview's width and height."""
        box = preview.bounding_box()
        page.mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"], steps=8)
        page.mouse.up()

    drag((0.1, 0.1), (0.4, 0.9))
    expect(page.locator("#crop-box")).to_be_visible()
    page.click("#crop-clear")  # changed their mind: the whole photo again
    assert page.input_value("#crop") == "" and page.locator("#crop-box").is_hidden()
    drag((0.5, 0), (1.2, 1.2))  # past the corner: the box stops at the photo's edges
    assert page.input_value("#crop") == "60,0,60,80"
    page.fill("input[name=k]", "3")
    page.click("button[type=submit]")

    cards = page.locator(".gallery .card")
    expect(cards).to_have_count(3, timeout=30_000)
    assert cards.first.locator("a").get_attribute("href") == "/items/10227"
    expect(page.locator(".searched-box")).to_contain_text("box at 60,0, 60x80 pixels")
    page.wait_for_load_state("networkidle")
    assert page.locator(".query img").evaluate("image => image.naturalWidth") == 120, "the preview, box drawn on it"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "results-crop.png", full_page=True)


def test_a_file_that_is_not_an_image_is_explained(page, served, tmp_path):
    from playwright.sync_api import expect

    text = tmp_path / "notes.jpg"
    text.write_text("not a photo at all")
    page.goto(f"{served.url}/")
    page.set_input_files("#image", str(text))
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("That file is not an image")


def test_a_catalogue_load_shows_a_progress_bar_that_reaches_100(page, served):
    from playwright.sync_api import expect

    page.goto(f"{served.url}/catalog")
    page.fill("input[name=api_key]", served.api_key)  # asked once: the form then comes without it
    page.click("button[type=submit]")
    page.fill("input[name=source]", "fashion")
    page.click("button[type=submit]")
    newest = page.locator(".loads li").first
    expect(newest.locator("progress")).to_have_attribute("value", "100", timeout=120_000)
    expect(newest.locator(".state")).to_have_text("partial")  # styles.csv lists images the sample doesn't have
    expect(newest.locator(".done")).to_have_text("1,002")
