"""Time `hirescam compare` of two 2,000-input runs, and its page in headless Chromium.

    python benchmarks/compare.py [--images 2000] [--loads 5]

Explains the 20 shipped sample images with the demo model (BASE) and with the sparse demo model (NEW),
then builds two synthetic OUT folders of `--images` inputs each by copying those inputs and outputs
(benchmarks/report.py's `synthetic_out`, 1% failed inputs), so that input n is the same picture on both
sides. Times, as the user runs them (a subprocess: imports included):
  - `hirescam compare BASE NEW` (the Markdown summary only);
  - with `-o DIR` from scratch (compare.json, compare.html and its thumbnails), then again with nothing
    changed (thumbnails kept);
  - the page in headless Chromium: navigation to compare.js ready, median of `--loads` loads.
Prints the sizes of summary.json (with and without the grid maps compare reads), compare.json, data.js.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from report import CHROMIUM, base_run, hirescam, synthetic_out

ROOT = Path(__file__).resolve().parent.parent


def page_ready(page: Path, loads: int) -> float:
    from playwright.sync_api import sync_playwright

    ready = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        for _ in range(loads):
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            start = time.perf_counter()
            tab.goto(page.as_uri(), wait_until="commit")
            tab.wait_for_selector("html[data-ready]", state="attached")
            ready.append(time.perf_counter() - start)
            tab.close()
        browser.close()
    return statistics.median(ready)


def summary_sizes(out: Path) -> tuple[float, float]:
    """Mean size of a run's summaries in bytes, as written and without their grid maps and box."""
    sizes, without = [], []
    for path in out.rglob("summary.json"):
        summary = json.loads(path.read_text())
        sizes.append(path.stat().st_size)
        for target in summary["targets"]:
            for entry in target["maps"].values():
                entry.pop("grid", None)
        summary.pop("box", None)
        without.append(len((json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode()))
    return statistics.fmean(sizes), statistics.fmean(without)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        (work / "base").mkdir()
        (work / "new").mkdir()
        demo = base_run(work / "base", 0)
        base = synthetic_out(demo, work / "base", args.images)
        sparse = work / "new" / "run"
        config = ROOT / "configs" / "demo_sparse.toml"
        hirescam("explain", work / "base" / "base-images", "-o", sparse, "-c", config, "-q", "--workers", "0")
        new = synthetic_out(sparse, work / "new", args.images)
        with_maps, without = summary_sizes(demo)
        print(
            f"{args.images} inputs per side, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
            f"summary.json {with_maps / 1024:.1f} KB ({without / 1024:.1f} KB without the grid maps and box)"
        )
        markdown = hirescam("compare", base, new)
        full = hirescam("compare", base, new, "-o", work / "cmp")
        again = hirescam("compare", base, new, "-o", work / "cmp")
        print(f"{'hirescam compare BASE NEW':36s} wall s  CPU s (all its processes)")
        print(f"{'Markdown summary only':36s} {markdown[0]:6.2f}  {markdown[1]:6.2f}")
        print(f"{'-o DIR, from scratch':36s} {full[0]:6.2f}  {full[1]:6.2f}")
        print(f"{'-o DIR, nothing changed':36s} {again[0]:6.2f}  {again[1]:6.2f}")
        sizes = {
            name: (work / "cmp" / name).stat().st_size / 1024
            for name in ("compare.json", "compare.html", "compare-files/data.js")
        }
        print(", ".join(f"{name} {kb:.0f} KB" for name, kb in sizes.items()))
        if Path(CHROMIUM).exists():
            ready = page_ready(work / "cmp" / "compare.html", args.loads)
            print(f"page, navigation -> interactive {ready * 1000:6.0f} ms (median of {args.loads})")
        else:
            print(f"{CHROMIUM} missing: no browser timing")
        print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
