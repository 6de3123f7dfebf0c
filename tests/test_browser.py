"""A real browser (Debian's chromium, driven by Playwright) against the real service on loopback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

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
