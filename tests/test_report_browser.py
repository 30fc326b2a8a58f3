"""The report of a real run in headless Chromium (Debian's package, driven by Playwright).

Skipped only where the browser is missing and CI is not set; in CI a missing browser fails."""

import json
import os
import shutil
from pathlib import Path

import pytest
from report_runs import MALICIOUS, many_inputs, report_data, reported_in_small_chunks, shared_run

from hirescam_cli.report import write_report
from hirescam_cli.report.site import fixed

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips, or fails in CI
    expect = None
from hirescam_cli.report.gallery import PAGE_SIZE

# markup as the browser serialises it, whitespace between tags aside (the HTML and the script's cards)
NORMALISE = "h => h.replace(/>\\s+</g, '><').replace(/\\s+/g, ' ').replace(/ hidden=\"\"/g, '').trim()"
CHROMIUM = os.environ.get("HIRESCAM_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).exists():
        missing = "playwright" if sync_playwright is None else CHROMIUM
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is missing: CI must run the browser tests (.ci/run installs it)")
        pytest.skip(f"{missing} is missing (apt-get install -y chromium; pip install playwright)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def run_out(tmp_path_factory) -> Path:
    return shared_run(tmp_path_factory)


class Page:
    """A page of the report with every console message, page error and dialog it raised."""

    def __init__(self, browser, url: str, javascript: bool = True):
        self.context = browser.new_context(
            viewport={"width": 1280, "height": 900}, java_script_enabled=javascript
        )
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: m.type in ("error", "warning") and self.problems.append(m.text))
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))
        self.page.on("requestfailed", self._request_failed)
        self.page.on("dialog", self._dialog)
        self.page.goto(url)
        if javascript and url.endswith("index.html"):
            self.page.wait_for_selector("html[data-ready]")

    def _request_failed(self, request) -> None:
        """A failed load is a problem, but not one the browser aborted because the page no longer needs
        it (its cards were redrawn, or the page reloaded, while thumbnails were loading: on a busy machine
        many are in flight then); an image the page still shows that never loaded fails all_images_load."""
        if request.failure != "net::ERR_ABORTED":
            self.problems.append(f"failed ({request.failure}): {request.url}")

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def cards(self) -> list[int]:
        """data-i of the cards shown, in order (once their chunks are loaded)."""
        self.page.wait_for_selector("#cards:not([aria-busy='true'])", state="attached")
        return [int(i) for i in self.page.eval_on_selector_all("li.card", "cs => cs.map(c => c.dataset.i)")]

    def all_images_load(self) -> list[str]:
        """The src of every image of the page that does not decode (lazy ones are loaded first)."""
        return self.page.evaluate(
            """async () => {
                const bad = [];
                for (const img of document.querySelectorAll("img")) {
                    img.loading = "eager";
                    try { await img.decode(); } catch (e) {}
                    if (!(img.complete && img.naturalWidth > 0)) bad.push(img.getAttribute("src"));
                }
                return bad;
            }"""
        )

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, run_out):
    opened = Page(browser, (run_out / "report" / "index.html").as_uri())
    yield opened
    opened.close()


def test_cards_images_and_no_console_errors(page, run_out):
    data = report_data(run_out)
    assert page.cards() == list(range(len(data["images"])))
    assert page.all_images_load() == []
    assert page.page.locator("li.card img").count() == sum(
        1 + sum(len(t["m"]) for t in i["t"]) for i in data["images"] if i["s"] != "error"
    )
    assert page.problems == [] and page.dialogs == []


def test_sorting_by_disagreement_puts_the_lowest_agreement_first(page, run_out):
    data = report_data(run_out)
    page.page.select_option("#sort", "disagreement")
    shown = page.cards()
    lowest = {i["i"]: min(t["r"] for t in i["t"]) for i in data["images"] if i.get("t")}
    expected = sorted(lowest, key=lambda i: (lowest[i], i))
    assert shown[: len(expected)] == expected != sorted(expected)
    assert "sort=disagreement" in page.page.url
    page.page.select_option("#sort", "input")
    assert page.cards() == list(range(len(data["images"])))
    assert page.problems == []


def test_filtering_by_class_status_and_name(page, run_out):
    data = report_data(run_out)
    label, count = data["classes"][-1]
    page.page.select_option("#class", label)
    shown = page.cards()
    assert len(shown) == count < len(data["images"])
    assert all(any(t["l"] == label for t in data["images"][i]["t"]) for i in shown)
    assert all(label in text for text in page.page.locator("li.card").all_inner_texts())
    page.page.select_option("#class", "")
    page.page.select_option("#status", "error")
    assert [data["images"][i]["s"] for i in page.cards()] == ["error"]
    page.page.select_option("#status", "")
    page.page.fill("#name", "sample_0")
    expect(page.page.locator("li.card")).to_have_count(5)
    assert page.page.locator("#shown").inner_text().startswith("Images 1\N{EN DASH}5 of 5")
    assert page.problems == []


def test_malicious_name_is_text_and_never_runs(page):
    names = page.page.locator("li.card h2.name").all_inner_texts()
    assert MALICIOUS in names
    page.page.select_option("#sort", "disagreement")  # cards built by report.js this time
    page.page.fill("#name", "onerror")
    expect(page.page.locator("li.card")).to_have_count(1)
    assert page.page.locator("li.card h2.name").inner_text() == MALICIOUS
    page.page.locator("li.card").first.click()
    expect(page.page.locator("#viewer-title")).to_have_text(MALICIOUS)
    assert page.page.locator("img[src='x']").count() == 0
    assert page.dialogs == [] and page.problems == []


def test_broken_input_shows_its_reason(page, run_out):
    data = report_data(run_out)
    broken = next(i for i in data["images"] if i["s"] == "error")
    card = page.page.locator(f"li.card[data-i='{broken['i']}']")
    assert card.locator(".reason").inner_text() == broken["e"]
    assert broken["e"] in page.page.locator("#failures").inner_text()
    assert broken["n"].endswith("broken.png")


def test_viewer_opens_from_the_keyboard_with_full_size_overlays(page, run_out):
    data = report_data(run_out)
    first = data["images"][0]
    button = page.page.locator("li.card").first.locator("button.open")
    button.focus()
    page.page.keyboard.press("Enter")
    viewer = page.page.locator("#viewer")
    page.page.wait_for_selector("#viewer[open]")  # once its chunk is loaded
    srcs = viewer.locator("img").evaluate_all("imgs => imgs.map(i => i.getAttribute('src'))")
    assert srcs[1:3] == [cell[1] for cell in first["t"][0]["m"]]
    assert page.all_images_load() == []
    sizes = viewer.locator("img").evaluate_all("imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes[1] == [first["w"], first["h"]]  # the run's own PNG, full size
    page.page.keyboard.press("Escape")
    assert not viewer.evaluate("d => d.open")
    assert page.problems == []


def assert_script_rebuilds_the_html_cards(page) -> None:
    """Sorting away and back makes report.js build the cards shown: they must equal the HTML's."""
    html_cards = page.page.locator("#cards").inner_html()
    page.page.select_option("#sort", "gap")
    page.page.select_option("#sort", "input")
    page.cards()
    assert page.page.evaluate(NORMALISE, html_cards) == page.page.evaluate(
        NORMALISE, page.page.locator("#cards").inner_html()
    )


def test_cards_built_by_script_match_the_html(page):
    assert_script_rebuilds_the_html_cards(page)


def test_volume_cards_built_by_script_match_the_html_and_link_their_nifti_maps(browser, tmp_path, capsys):
    from test_cli import run
    from test_volumes import hounsfield, volume_config
    from volume_sets import oblique_affine, write_nifti

    for n in range(2):
        affine = oblique_affine(zooms=(1.0, 1.5, 3.0))
        write_nifti(tmp_path / "in" / f"scan{n}.nii.gz", hounsfield(seed=n), affine)
    out = tmp_path / "out"
    command = ["explain", tmp_path / "in", "-o", out, "-c", volume_config(tmp_path), "--report", "-q"]
    assert run(command, capsys)[0] == 0
    records = report_data(out)["images"]
    assert [r["k"] for r in records] == ["volume", "volume"]
    niftis = [cell[2] for r in records for t in r["t"] for cell in t["m"] if cell]
    page = Page(browser, (out / "report" / "index.html").as_uri())
    try:
        links = "as => as.map(a => a.getAttribute('href'))"
        assert page.page.locator("#cards a.nifti").evaluate_all(links) == niftis
        assert_script_rebuilds_the_html_cards(page)
        assert page.page.locator("#cards .scan").all_inner_texts() == [r["d"] for r in records]
        page.page.locator("li.card").first.locator("button.open").click()
        page.page.wait_for_selector("#viewer[open]")
        first = [cell[2] for t in records[0]["t"] for cell in t["m"] if cell]
        assert page.page.locator("#viewer a.nifti").evaluate_all(links) == first
        assert page.all_images_load() == []
        assert page.problems == []
    finally:
        page.close()


def test_without_javascript_the_first_page_is_readable(browser, run_out):
    page = Page(browser, (run_out / "report" / "index.html").as_uri(), javascript=False)
    try:
        assert page.cards() == list(range(len(report_data(run_out)["images"])))
        assert page.page.locator("#controls").is_hidden() and page.page.locator("#pager").is_hidden()
        assert page.page.locator("button.open").first.is_hidden()
        assert page.all_images_load() == []
        assert page.problems == []
    finally:
        page.close()


def test_pages_keep_the_dom_bounded(browser, run_out, tmp_path):
    """130 images: three pages of at most PAGE_SIZE cards, and the view survives a reload."""
    out = tmp_path / "out"
    shutil.copytree(run_out, out, ignore=shutil.ignore_patterns("report"))
    lines = (out / "results.jsonl").read_text().splitlines()
    ok = [json.loads(line) for line in lines if json.loads(line)["status"] == "ok"]
    (out / "results.jsonl").write_text("".join(json.dumps(ok[n % len(ok)]) + "\n" for n in range(130)))
    page = Page(browser, write_report(out).as_uri())
    try:
        assert len(page.cards()) == PAGE_SIZE
        counts = []
        for _ in range(3):
            counts.append(len(page.cards()))
            if page.page.locator("#next").is_enabled():
                page.page.click("#next")
        assert counts == [PAGE_SIZE, PAGE_SIZE, 130 - 2 * PAGE_SIZE]
        assert page.cards() == list(range(2 * PAGE_SIZE, 130))
        page.page.reload()
        page.page.wait_for_selector("html[data-ready]")
        assert page.cards() == list(range(2 * PAGE_SIZE, 130)) and "page=3" in page.page.url
        assert page.problems == []
    finally:
        page.close()


@pytest.fixture(scope="module")
def many_out(tmp_path_factory, run_out) -> Path:
    """150 inputs in chunks of about 8 (CHUNK_MEAN patched), so that a page spans several chunks."""
    return reported_in_small_chunks(many_inputs(run_out, tmp_path_factory.mktemp("many") / "out", 150))


def chunk_of(data: dict) -> list[int]:
    """The chunk of each input."""
    return [c for c, (_, count) in enumerate(data["chunks"]) for _ in range(count)]


def test_a_page_beyond_the_first_chunk(browser, many_out):
    data = report_data(many_out)
    assert len(data["chunks"]) > 6 and data["chunks"][0][1] < PAGE_SIZE
    page = Page(browser, (many_out / "report" / "index.html").as_uri())
    try:
        page.page.click("#next")
        shown = page.cards()
        assert shown == list(range(PAGE_SIZE, 2 * PAGE_SIZE)) and 0 not in {chunk_of(data)[i] for i in shown}
        names = page.page.locator("li.card h2.name").all_inner_texts()
        assert names == [data["images"][i]["n"] for i in shown]
        broken = [i for i in shown if data["images"][i]["s"] == "error"]
        for i in broken:
            assert page.page.locator(f"li.card[data-i='{i}'] .reason").inner_text() == data["images"][i]["e"]
        assert broken and page.all_images_load() == []
        loaded = page.page.eval_on_selector_all(
            "script[src^='cards/']", "s => s.map(x => x.getAttribute('src'))"
        )
        assert sorted(loaded) == sorted({f"cards/{data['chunks'][chunk_of(data)[i]][0]}.js" for i in shown})
        assert page.problems == []
    finally:
        page.close()


MISSING = 2.0  # sorts after every Pearson r and IoU


def lowest(image: dict, number: str) -> float:
    """The lowest of a number over an image's targets, MISSING when none has it."""
    values = [t[number] for t in image["t"] if t[number] is not None]
    return min(values) if values else MISSING


def test_a_sort_that_reorders_across_chunks(browser, many_out):
    data = report_data(many_out)
    page = Page(browser, (many_out / "report" / "index.html").as_uri())
    try:
        page.page.select_option("#sort", "probability")
        best = {i["i"]: max(t["p"] for t in i["t"]) for i in data["images"] if i.get("t")}
        expected = sorted(best, key=lambda i: (-best[i], i))
        expected += [i["i"] for i in data["images"] if i["i"] not in best]  # missing values last
        assert page.cards() == expected[:PAGE_SIZE]
        assert len({chunk_of(data)[i] for i in expected[:PAGE_SIZE]}) > 6
        probabilities = page.page.locator("li.card").first.locator(".prob").all_inner_texts()
        assert f"p {fixed(best[expected[0]], 3)}" in probabilities
        page.page.select_option("#sort", "disagreement")
        explained = [i for i in data["images"] if i.get("t")]
        r = {i["i"]: lowest(i, "r") for i in explained}
        order = sorted(r, key=lambda i: (r[i], lowest(data["images"][i], "u"), i))
        assert MISSING in r.values() and min(r.values()) < 0 and len(set(r.values())) < len(r)  # ties
        assert page.cards() == order[:PAGE_SIZE] and order[:PAGE_SIZE] != sorted(order[:PAGE_SIZE])
        page.page.select_option("#sort", "probability")
        page.page.click("#next")
        assert page.cards() == expected[PAGE_SIZE : 2 * PAGE_SIZE]
        page.page.reload()
        page.page.wait_for_selector("html[data-ready]")
        assert page.cards() == expected[PAGE_SIZE : 2 * PAGE_SIZE] and "page=2" in page.page.url
        last = page.page.locator("li.card").last
        last.click()
        expect(page.page.locator("#viewer-title")).to_have_text(
            data["images"][expected[2 * PAGE_SIZE - 1]]["n"]
        )
        assert page.all_images_load() == [] and page.problems == []
    finally:
        page.close()


def test_eval_page_shows_its_plot_without_errors(browser, tmp_path):
    from test_report import EVAL

    from hirescam_cli.report import write_eval_page

    page = Page(browser, write_eval_page(tmp_path, EVAL).as_uri())
    try:
        assert page.all_images_load() == []
        assert page.page.locator("img").count() == 1 and page.page.locator("table.metrics").count() == 2
        assert page.page.locator("li").first.inner_text() == "x/<script>.png: no usable mask"
        assert page.problems == [] and page.dialogs == []
    finally:
        page.close()
