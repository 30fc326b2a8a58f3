"""Make docs/report.png: the report of the shipped samples, sorted by disagreement, in headless Chromium.

    python docs/screenshot.py [--chromium /usr/bin/chromium]

Runs `hirescam explain sample_images -o TMP --report` with the demo model, opens TMP/report/index.html
with Playwright (as tests/test_report_browser.py does), waits for every picture, and saves the view.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "report.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        out = Path(temp) / "out"
        command = ["-m", "hirescam_cli", "explain", ROOT / "sample_images", "-o", out, "--report", "-q"]
        subprocess.run([sys.executable, *map(str, command)], check=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium)
            page = browser.new_page(viewport={"width": 1280, "height": 1010})
            page.goto((out / "report" / "index.html").as_uri() + "#sort=disagreement")
            page.wait_for_selector("html[data-ready]")
            page.wait_for_selector("#cards[aria-busy='false']", state="attached")  # the sorted cards are in
            page.evaluate(
                "Promise.all([...document.images].map(i => { i.loading = 'eager'; return i.decode(); }))"
            )
            page.screenshot(path=str(args.output))
            browser.close()
    print(args.output)


if __name__ == "__main__":
    main()
