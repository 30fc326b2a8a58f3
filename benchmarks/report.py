"""Time `hirescam report` over a 2,000-image run, and its first page in headless Chromium.

    python benchmarks/report.py [--images 2000] [--side 0] [--changed 20] [--loads 5]

Explains the 20 shipped sample images once (demo model), then builds a synthetic OUT of `--images`
inputs by copying those inputs and outputs with varied numbers (probabilities, agreement, gaps;
1% failed inputs), so the report sees a run of that size. `--side N` first scales the sample images
to a longest side of N pixels (e.g. 640, photo-sized PNG overlays). Times, as the user runs them:
  - `hirescam report OUT` from scratch (a subprocess: imports included), then again with nothing
    changed, then with `--changed` overlays rewritten (incremental thumbnails);
  - the first page in headless Chromium (Debian's /usr/bin/chromium through Playwright): from
    navigation to report.js ready (sorting and filtering work), and to the load event, median of
    `--loads` loads; then one re-sort of all images by disagreement, in the page.
Goals (issue 10): report under 20 s on 2 cores; first page interactive under 1 s.
"""

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def timed(*command: object) -> tuple[float, float]:
    """Run a command; returns its wall time and CPU time (its processes together) in seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([*map(str, command)], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def hirescam(*args: object) -> tuple[float, float]:
    return timed(sys.executable, "-m", "hirescam_cli", *args)


def base_run(work: Path, side: int) -> Path:
    """The shipped samples (scaled to `side` when given), explained with the demo model."""
    images = work / "base-images"
    images.mkdir()
    for path in sorted((ROOT / "sample_images").glob("*.png")):
        with Image.open(path) as image:
            if side:
                scale = side / max(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            image.save(images / path.name)
    hirescam("explain", images, "-o", work / "base", "-q", "--workers", "0")
    return work / "base"


def synthetic_out(base: Path, work: Path, count: int) -> Path:
    """OUT with `count` inputs: copies of the base run's inputs and outputs, numbers varied."""
    rng = random.Random(0)
    out, inputs = work / "out", work / "inputs"
    inputs.mkdir()
    records = [json.loads(line) for line in (base / "results.jsonl").read_text().splitlines()]
    summaries = [json.loads((base / r["summary"]).read_text()) for r in records if r["status"] == "ok"]
    lines = []
    for n in range(count):
        key = f"batch{n // 500}/img_{n:05d}.png"
        if n % 100 == 57:
            lines.append(
                {"input": str(inputs / key), "status": "error", "error": "corrupt image header: synthetic"}
            )
            continue
        summary = json.loads(json.dumps(summaries[n % len(summaries)]))
        source = Path(summary["input"])
        (inputs / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, inputs / key)
        folder = out / key
        folder.mkdir(parents=True)
        for target in summary["targets"]:
            target["probability"] = round(rng.uniform(0.5, 1.0), 6)
            target["completeness_gap"] = rng.gauss(0, 1e-6)
            target["agreement"] = {
                "pearson": round(rng.uniform(0.2, 1.0), 6),
                "top20_iou": round(rng.random(), 6),
            }
            for method, entry in target["maps"].items():
                name = f"{method}-{target['class']}.png"
                shutil.copy(base / entry["png"], folder / name)
                entry["png"] = f"{key}/{name}"
        summary |= {"input": str(inputs / key), "key": key}
        (folder / "summary.json").write_text(json.dumps(summary))
        lines.append({"input": str(inputs / key), "status": "ok", "summary": f"{key}/summary.json"})
    (out / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = json.loads((base / "run.json").read_text())
    errors = sum(line["status"] == "error" for line in lines)
    run["counts"] = {"inputs": count, "ok": count - errors, "skipped": 0, "error": errors, "not_reached": 0}
    (out / "run.json").write_text(json.dumps(run))
    return out


def browser_timings(index: Path, loads: int) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    ready, in_page, loaded, sort = [], [], [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        for _ in range(loads):
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            start = time.perf_counter()
            page.goto(index.as_uri(), wait_until="commit")
            page.wait_for_selector("html[data-ready]", state="attached")
            ready.append(time.perf_counter() - start)
            in_page.append(float(page.get_attribute("html", "data-ready")) / 1000)
            page.wait_for_load_state("load")
            loaded.append(time.perf_counter() - start)
            sort.append(
                page.evaluate(
                    """() => { const s = document.getElementById("sort"), t = performance.now();
                    s.value = "disagreement"; s.dispatchEvent(new Event("change"));
                    return (performance.now() - t) / 1000; }"""
                )
            )
            page.close()
        browser.close()
    times = {"ready": ready, "in_page": in_page, "load": loaded, "sort": sort}
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=0, help="scale the samples to this longest side first")
    parser.add_argument(
        "--changed", type=int, default=20, help="overlays rewritten before the incremental run"
    )
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="build the synthetic OUT in this (new) folder and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        work = args.keep or Path(temp) / "work"
        work.mkdir(parents=True, exist_ok=False)
        out = synthetic_out(base_run(work, args.side), work, args.images)
        pictures = sorted(p for p in out.rglob("*.png") if p.is_file())
        width, height = Image.open(pictures[0]).size
        print(
            f"{args.images} inputs, {len(pictures)} overlays (e.g. {width}x{height}), {os.cpu_count()} CPUs"
        )
        full = hirescam("report", out)
        thumbs = sorted((out / "report" / "thumbs").rglob("*.jpg"))
        size_kb = sum(p.stat().st_size for p in thumbs) / len(thumbs) / 1024
        again = hirescam("report", out)
        for png in pictures[: args.changed]:
            os.utime(png, ns=(time.time_ns(), time.time_ns()))  # as a rerun rewriting them would
        changed = hirescam("report", out)
        report = out / "report"
        imports = timed(sys.executable, "-c", "import hirescam_cli.cli")
        print(f"{'hirescam report OUT':32s} wall s  CPU s (all its processes)")
        print(
            f"{'from scratch':32s} {full[0]:6.2f}  {full[1]:6.2f}   {len(thumbs)} pictures, {size_kb:.1f} KB"
        )
        print(f"{'nothing changed':32s} {again[0]:6.2f}  {again[1]:6.2f}")
        print(f"{f'{args.changed} overlays changed':32s} {changed[0]:6.2f}  {changed[1]:6.2f}")
        print(f"{'of which imports (torch...)':32s} {imports[0]:6.2f}  {imports[1]:6.2f}")
        kib = {name: (report / name).stat().st_size / 1024 for name in ("data.js", "index.html")}
        print(f"data.js {kib['data.js']:.0f} KB, index.html {kib['index.html']:.0f} KB")
        if not Path(CHROMIUM).exists():
            print(f"{CHROMIUM} missing: no browser timings")
            return
        times = browser_timings(report / "index.html", args.loads)
        print(
            f"first page, navigation -> interactive  {times['ready'] * 1000:6.0f} ms (median of {args.loads})"
        )
        print(f"  the same by the page's own clock      {times['in_page'] * 1000:6.0f} ms")
        print(f"first page, navigation -> load event   {times['load'] * 1000:6.0f} ms")
        print(f"re-sort of all {args.images} by disagreement {times['sort'] * 1000:6.1f} ms")


if __name__ == "__main__":
    main()
