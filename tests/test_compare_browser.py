"""compare.html of a real comparison in headless Chromium (Debian's package, driven by Playwright): cards
least agreeing first, images load, sorting and filters, names that are text, and the first page without
JavaScript. Skipped only where the browser is missing and CI is not set; in CI a missing browser fails."""

import json
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from compare_runs import MALICIOUS, explain, shared_pair, write_images
from report_runs import cli
from test_report_browser import Page, browser  # noqa: F401 - the browser fixture

from hirescam_cli.compare.comparison import least_agreeing_first
from hirescam_cli.report.compare_page import PAGE_SIZE

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips, or fails in CI
    expect = None

PREFIX = "window.HIRESCAM_COMPARE = JSON.parse("


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    return shared_pair(tmp_path_factory)


def page_data(folder: Path) -> dict:
    """The data compare.js works from (data.js without its assignment)."""
    text = (folder / "compare-files" / "data.js").read_text(encoding="utf-8")
    assert text.startswith(PREFIX)
    return json.loads(json.loads(text.removeprefix(PREFIX).rstrip().removesuffix(");")))


def rows(folder: Path) -> list[dict]:
    return json.loads((folder / "compare.json").read_text())["inputs"]


@pytest.fixture
def page(browser, pair):  # noqa: F811
    opened = Page(browser, (pair["dir"] / "compare.html").as_uri())
    opened.page.wait_for_selector("html[data-ready]")
    yield opened
    opened.close()


def test_cards_come_least_agreeing_first_and_every_image_loads(page, pair):
    ordered = least_agreeing_first(rows(pair["dir"]))
    assert page.cards() == [row["index"] for row in ordered]
    assert ordered[0]["agreement"] is None and ordered[0]["top1_changed"]  # no class in common comes first
    assert page.all_images_load() == []
    data = page_data(pair["dir"])
    pictures = sum(1 + 2 * sum(cell is not None for t in r["t"] for cell in t["m"]) for r in data["records"])
    assert page.page.locator("li.card img").count() == pictures
    assert page.problems == [] and page.dialogs == []


def test_full_size_links_lead_to_the_runs_own_pictures(page, pair):
    hrefs = page.page.eval_on_selector_all(".pairs a", "links => links.map(a => a.href)")
    assert hrefs and all(href.startswith("file://") for href in hrefs)
    targets = {Path(unquote(urlsplit(href).path)) for href in hrefs}
    assert all(path.is_file() and path.suffix == ".png" for path in targets)
    assert {path.parent.parent for path in targets} == {pair["base"], pair["new"]}
    raw = page.page.eval_on_selector_all(".pairs a", "links => links.map(a => a.getAttribute('href'))")
    assert all(href.startswith("../") for href in raw)  # relative: DIR moves with BASE and NEW


def test_sorting_and_filters(page, pair):
    data = page_data(pair["dir"])
    page.page.select_option("#sort", "input")
    assert page.cards() == sorted(r["i"] for r in data["records"])
    assert "sort=input" in page.page.url
    page.page.select_option("#sort", "probability")
    change = {r["i"]: r["d"] for r in data["records"]}
    shown = page.cards()
    known = [change[i] for i in shown if change[i] is not None]
    assert known == sorted(known, reverse=True) and known[0] > known[-1]
    page.page.select_option("#change", "top1")
    changed = sorted(r["i"] for r in data["records"] if r["c"])
    assert sorted(page.cards()) == changed and 0 < len(changed) < len(data["records"])
    assert page.page.locator("li.card.changed").count() == len(changed)
    page.page.select_option("#change", "same")
    assert len(page.cards()) == len(data["records"]) - len(changed)
    page.page.select_option("#change", "")
    label, count = data["labels"][0]
    page.page.select_option("#class", label)
    by_index = {r["i"]: r for r in data["records"]}
    assert [by_index[i]["b"][0] for i in page.cards()] == [label] * count
    page.page.select_option("#class", "")
    page.page.fill("#name", "img_0")
    expect(page.page.locator("li.card")).to_have_count(sum("img_0" in r["n"] for r in data["records"]))
    page.page.reload()
    page.page.wait_for_selector("html[data-ready]")
    assert page.page.input_value("#name") == "img_0" and page.page.input_value("#sort") == "probability"
    assert page.problems == []


def test_the_malicious_name_is_text_and_never_runs(page):
    page.page.select_option("#sort", "input")  # cards built by compare.js
    page.page.fill("#name", "onerror")
    expect(page.page.locator("li.card")).to_have_count(1)
    assert page.page.locator("li.card h2.name").inner_text() == MALICIOUS
    assert page.page.locator("img[src='x']").count() == 0
    assert page.dialogs == [] and page.problems == []


def test_cards_built_by_script_match_the_html(page):
    html_cards = page.page.locator("#cards").inner_html()
    page.page.select_option("#sort", "input")
    page.page.select_option("#sort", "agreement")
    normalise = "h => h.replace(/>\\s+</g, '><').replace(/\\s+/g, ' ').replace(/ hidden=\"\"/g, '').trim()"
    assert page.page.evaluate(normalise, html_cards) == page.page.evaluate(
        normalise, page.page.locator("#cards").inner_html()
    )


def test_without_javascript_the_first_page_is_readable(browser, pair):  # noqa: F811
    page = Page(browser, (pair["dir"] / "compare.html").as_uri(), javascript=False)
    try:
        assert page.cards() == [row["index"] for row in least_agreeing_first(rows(pair["dir"]))]
        assert page.page.locator("#controls").is_hidden() and page.page.locator("#pager").is_hidden()
        assert "FAIL" not in page.page.locator("header").inner_text()
        assert page.all_images_load() == []
        assert page.problems == []
    finally:
        page.close()


def test_gates_in_the_header_and_pages_of_a_larger_comparison(browser, tmp_path):  # noqa: F811
    """60 inputs: two pages of at most PAGE_SIZE cards; the failed gate is shown."""
    images = write_images(tmp_path / "images", PAGE_SIZE + 12)
    base = explain(images, tmp_path / "base", "tiny_net")
    new = explain(images, tmp_path / "new", "perturbed_net")
    shutil.rmtree(images)  # the originals are gone: the cards say so, the overlays still show
    assert cli("compare", base, new, "-o", tmp_path / "cmp", "--max-changed", "0") == 6
    page = Page(browser, (tmp_path / "cmp" / "compare.html").as_uri())
    try:
        page.page.wait_for_selector("html[data-ready]")
        assert len(page.cards()) == PAGE_SIZE
        page.page.click("#next")
        assert len(page.cards()) == 12 and "page=2" in page.page.url
        assert (
            page.page.locator(".gates li.fail")
            .inner_text()
            .startswith("FAIL --max-changed 0: the top-1 class")
        )
        assert page.page.locator("li.card .missing", has_text="original not available").count() == 12
        assert page.all_images_load() == []
        assert page.problems == []
    finally:
        page.close()
