"""The page a phone opens, in a real headless Chromium (Debian's package) driven by Playwright: phone and desktop."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fruitpipe.classify.fruits import describe, species_name
from fruitpipe.serve import ServeSettings, create_app
from test_serve import _Server
from conftest import with_threshold

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("FRUITPIPE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
VIEWPORTS = {
    "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True,
              "device_scale_factor": 3},
    "desktop": {"viewport": {"width": 1280, "height": 800}},
}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("FRUITPIPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("no chromium found: run scripts/setup.sh (it installs Debian's chromium) or set "
                    "FRUITPIPE_CHROMIUM to a Chromium binary")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(trained):
    srv = _Server(create_app(ServeSettings(output=str(trained["out"]))))
    yield srv
    srv.stop()


@pytest.mark.parametrize("device", sorted(VIEWPORTS))
def test_the_page_identifies_a_real_test_photo_and_explains_a_bad_file(browser, site, trained, device: str,
                                                                      tmp_path: Path) -> None:
    rows = pq.read_table(trained["out"] / "classifier" / "test_predictions.parquet").to_pylist()
    row = next(r for r in rows if r["label"] == r["predicted"])
    photo = Path(row["uri"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(**VIEWPORTS[device])
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{site.port}/")
    picker = page.get_by_label("Take a photo of the fruit, or choose one")  # labelled for screen readers
    assert picker.get_attribute("capture") == "environment" and picker.get_attribute("accept") == "image/*"
    picker.set_input_files(str(photo))
    page.get_by_role("button", name="Identify").click()
    page.locator("#answer").wait_for(state="visible")
    fruit = describe(row["label"])
    # the species first (with its probability), the variety and the facts below it
    assert page.locator("#name").inner_text().startswith(species_name(row["label"]) + " (")
    assert fruit["scientific_name"] in page.locator("#about").inner_text()
    assert (fruit["variety"] or "") in page.locator("#about").inner_text()
    assert page.locator("#unsure").is_hidden()
    bars = page.get_by_role("progressbar")
    assert bars.count() == 5 and float(bars.first.get_attribute("aria-valuenow")) > 50
    assert page.locator("#preview").is_visible()
    page.screenshot(path=str(ARTIFACTS / f"page-{device}-answer.png"), full_page=True)

    text = tmp_path / "notes.txt"
    text.write_text("not a photo at all")
    picker.set_input_files(str(text))
    picker.focus()
    page.keyboard.press("Tab")  # from the file input to the button, then Enter: usable without a pointer
    assert page.evaluate("document.activeElement.id") == "go"
    page.keyboard.press("Enter")
    page.get_by_role("alert").filter(has_text="not a photo").wait_for()
    assert page.locator("#answer").is_hidden()
    page.screenshot(path=str(ARTIFACTS / f"page-{device}-rejected.png"), full_page=True)
    context.close()


def test_the_run_report_is_one_self_contained_file_with_every_section(browser, trained) -> None:
    """OUT/report.html, written by `run` and refreshed by `train`: opened from disk with every request recorded,
    it needs nothing but itself (images are data: URIs), and each section is there with its figures."""
    report = trained["out"] / "report.html"
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    page.goto(report.as_uri())
    assert [u for u in requested if not u.startswith(("data:", "file:"))] == []
    for section in ("counts", "timings", "pca", "scatter", "classifier"):
        assert page.locator(f"section#{section} h2").is_visible(), section
    for alt in ("scree curve", "first two principal components by class", "confusion matrix"):
        img = page.locator(f"img[alt^='{alt}']")
        assert img.count() == 1 and page.evaluate("(i) => i.naturalWidth", img.element_handle()) > 100, alt
    counts = page.locator("section#counts").inner_text()
    assert "listed\t400" in counts and "embedded\t400" in counts
    assert f"{trained['metrics']['top1']:.2%}" in page.locator("section#classifier").inner_text()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    context.close()


@pytest.fixture(scope="module")
def unsure_site(trained, tmp_path_factory: pytest.TempPathFactory):
    """The same classifier with a "not sure" threshold no answer reaches (its metadata rewritten), so the page
    must show every answer as not sure."""
    out = with_threshold(trained["out"], tmp_path_factory.mktemp("unsure") / "out", 1.5)
    srv = _Server(create_app(ServeSettings(output=str(out))))
    yield srv
    srv.stop()


def test_the_page_says_not_sure_and_still_shows_the_top_5(browser, unsure_site, trained) -> None:
    rows = pq.read_table(trained["out"] / "classifier" / "test_predictions.parquet").to_pylist()
    context = browser.new_context(**VIEWPORTS["phone"])
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{unsure_site.port}/")
    page.get_by_label("Take a photo of the fruit, or choose one").set_input_files(rows[0]["uri"])
    page.get_by_role("button", name="Identify").click()
    page.locator("#answer").wait_for(state="visible")
    assert page.locator("#unsure").is_visible() and "Not sure" in page.locator("#unsure").inner_text()
    assert page.locator("#name").inner_text().startswith("Perhaps: " + species_name(rows[0]["predicted"]))
    assert page.get_by_role("progressbar").count() == 5
    page.screenshot(path=str(ARTIFACTS / "page-phone-not-sure.png"), full_page=True)
    context.close()
