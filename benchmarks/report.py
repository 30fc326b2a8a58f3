"""Time `hirescam report` over a large synthetic run, and its pages in headless Chromium.

    python benchmarks/report.py [--images 2000] [--side 0] [--changed 100] [--repeat 3] [--loads 5]
                                [--compare N] [--work DIR]

Explains the 20 shipped sample images once (demo model), then builds a synthetic OUT of `--images`
inputs from those inputs and outputs (hard links: 100,000 inputs take little disk) with varied
numbers (probabilities, agreement, gaps; 1% failed inputs), so the report sees a run of that size.
`--side N` first scales the sample images to a longest side of N pixels (e.g. 640: photo-sized
overlays). With `--work DIR` the run is built there once and kept: a later call with the same
`--images` reuses it (and its report), so only the incremental figures are measured again.

Times `hirescam report OUT` as the user runs it (a new process: imports included), with its wall and
CPU time (all its processes) and the peak RSS of its main process:
  - from scratch (once: thumbnails for every picture);
  - with nothing changed; with `--changed` inputs re-explained (their summaries and overlays written
    again, as a rerun does); with results.jsonl rewritten (a resumed run lists every input as
    skipped): `--repeat` rounds of the three, interleaved; medians;
  - with `--compare N` (default: a tenth of `--images`; 0: not), the unchanged report of a run of N
    inputs, for the memory in the number of inputs.
Then, in headless Chromium (Debian's /usr/bin/chromium through Playwright), median of `--loads`
loads: the first page from navigation to report.js ready (sorting and filtering work) and to the
load event; a re-sort of every input by disagreement (report.js's own work, until the page knows its
cards), then until the sorted page's cards are shown (their chunks loaded); the next page in input
order (beyond the first chunk) until shown. The 1-minute load average is printed beside each figure.
Goals (issue 21, 2 cores, 100,000 inputs): unchanged <= 2 s, 100 changed <= 3 s, first page
interactive <= 1 s, re-sort under 300 ms, memory flat in the number of inputs.
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
PEAK = (  # hirescam's CLI in this process, which writes its peak RSS (KiB) to $PEAK_FILE on exit
    "import atexit, os, resource, sys; atexit.register(lambda: open(os.environ['PEAK_FILE'], 'w')"
    ".write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))); "
    "from hirescam_cli.cli import main; sys.argv[0] = 'hirescam'; main()"
)


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


def measured(*args: object) -> dict[str, float]:
    """`hirescam ARGS`: wall s, CPU s (all its processes), peak RSS of its main process (MB), the load."""
    load = os.getloadavg()[0]
    with tempfile.NamedTemporaryFile() as peak:
        os.environ["PEAK_FILE"] = peak.name
        wall, cpu = timed(sys.executable, "-c", PEAK, *args)
        mb = int(Path(peak.name).read_text()) / 1024
    return {"wall": wall, "cpu": cpu, "mb": mb, "load": (load + os.getloadavg()[0]) / 2}


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
    """OUT with `count` inputs: the base run's inputs and outputs (hard links), numbers varied."""
    rng = random.Random(0)
    out, inputs = work / "out", work / "inputs"
    inputs.mkdir()
    records = [json.loads(line) for line in (base / "results.jsonl").read_text().splitlines()]
    summaries = [json.loads((base / r["summary"]).read_text()) for r in records if r["status"] == "ok"]
    lines = []
    for n in range(count):
        key = f"batch{n // 500:04d}/img_{n:06d}.png"  # the ledger in key order, as a run writes it
        if n % 100 == 57:
            lines.append(
                {"input": str(inputs / key), "status": "error", "error": "corrupt image header: synthetic"}
            )
            continue
        summary = json.loads(json.dumps(summaries[n % len(summaries)]))
        source = Path(summary["input"])
        (inputs / key).parent.mkdir(parents=True, exist_ok=True)
        os.link(source, inputs / key)
        folder = out / key
        folder.mkdir(parents=True)
        vary(summary, rng)
        for target in summary["targets"]:
            for method, entry in target["maps"].items():
                name = f"{method}-{target['class']}.png"
                os.link(base / entry["png"], folder / name)
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


def vary(summary: dict, rng: random.Random) -> None:
    """New numbers for every target of a summary."""
    for target in summary["targets"]:
        target["probability"] = round(rng.uniform(0.5, 1.0), 6)
        target["completeness_gap"] = rng.gauss(0, 1e-6)
        target["agreement"] = {
            "pearson": round(rng.uniform(0.2, 1.0), 6),
            "top20_iou": round(rng.random(), 6),
        }


def explain_again(out: Path, count: int, rng: random.Random) -> None:
    """`count` inputs re-explained, as a rerun writes them: new overlays and a new summary each."""
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for line in rng.sample([line for line in lines if line["status"] != "error"], count):
        path = out / line["summary"]
        summary = json.loads(path.read_text())
        vary(summary, rng)
        for target in summary["targets"]:
            for entry in target["maps"].values():
                png = out / entry["png"]
                shutil.copyfile(png, png.with_suffix(".new"))  # a file of its own: the others are links
                os.replace(png.with_suffix(".new"), png)
        path.write_text(json.dumps(summary))


def resume(out: Path, status: str) -> None:
    """results.jsonl as a resumed run writes it: every input done before listed with `status`."""
    path = out / "results.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        if line["status"] != "error":
            line["status"] = status
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def prepared(work: Path, count: int, side: int) -> tuple[Path, dict[str, float] | None]:
    """The synthetic OUT of `count` inputs in `work` with its report (made now: timed), or as kept."""
    out = work / "out"
    if (out / "report" / "manifest.json").is_file():
        return out, None
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base" if (work / "base").is_dir() else base_run(work, side)
    shutil.rmtree(work / "out", ignore_errors=True)
    shutil.rmtree(work / "inputs", ignore_errors=True)
    synthetic_out(base, work, count)
    return out, measured("report", out)


def browser_timings(index: Path, loads: int) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    shown = "#cards[aria-busy='false']"  # the page's cards are in place (the CSP forbids eval'd predicates)
    times: dict[str, list[float]] = {k: [] for k in ("ready", "in_page", "load", "sort", "sorted", "next")}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        for _ in range(loads):
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            start = time.perf_counter()
            page.goto(index.as_uri(), wait_until="commit")
            page.wait_for_selector("html[data-ready]", state="attached")
            times["ready"].append(time.perf_counter() - start)
            times["in_page"].append(float(page.get_attribute("html", "data-ready")) / 1000)
            page.wait_for_load_state("load")
            times["load"].append(time.perf_counter() - start)
            start = time.perf_counter()
            page.click("#next")
            page.wait_for_selector(shown, state="attached")
            times["next"].append(time.perf_counter() - start)
            page.select_option("#sort", "input")
            page.wait_for_selector(shown, state="attached")
            start = time.perf_counter()
            times["sort"].append(
                page.evaluate(
                    """() => { const s = document.getElementById("sort"), t = performance.now();
                    s.value = "disagreement"; s.dispatchEvent(new Event("change"));
                    return (performance.now() - t) / 1000; }"""
                )
            )
            page.wait_for_selector(shown, state="attached")
            times["sorted"].append(time.perf_counter() - start)
            page.close()
        browser.close()
    return {name: statistics.median(values) for name, values in times.items()}


def row(name: str, figures: dict[str, float] | list[dict[str, float]]) -> str:
    if isinstance(figures, list):
        figures = {k: statistics.median(f[k] for f in figures) for k in figures[0]}
    return (
        f"{name:40s} {figures['wall']:7.2f} {figures['cpu']:7.2f} {figures['mb']:8.1f} {figures['load']:6.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=0, help="scale the samples to this longest side first")
    parser.add_argument("--changed", type=int, default=100, help="inputs re-explained before a report")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the incremental reports")
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--compare", type=int, help="also an unchanged report of a run this size")
    parser.add_argument("--work", type=Path, help="build the synthetic runs here and keep them")
    args = parser.parse_args()
    compare = args.images // 10 if args.compare is None else args.compare
    with tempfile.TemporaryDirectory() as temp:
        work = args.work or Path(temp)
        out, full = prepared(work / str(args.images), args.images, args.side)
        batch = min(p for p in out.iterdir() if p.name.startswith("batch"))  # the first 500 inputs
        overlays = [p for p in batch.glob("*/*-*.png") if p.is_file()]
        pictures = round(len(overlays) * args.images / min(500, args.images))
        width, height = Image.open(overlays[0]).size
        print(
            f"{args.images} inputs, about {pictures} overlays (e.g. {width}x{height}), {os.cpu_count()} CPUs"
        )
        rng = random.Random(1)
        rounds: dict[str, list[dict[str, float]]] = {"unchanged": [], "changed": [], "resumed": []}
        for n in range(args.repeat):
            rounds["unchanged"].append(measured("report", out))
            explain_again(out, args.changed, rng)
            rounds["changed"].append(measured("report", out))
            resume(out, "skipped" if n % 2 == 0 else "ok")
            rounds["resumed"].append(measured("report", out))
        small = prepared(work / str(compare), compare, args.side)[0] if compare else None
        smaller = [measured("report", small) for _ in range(args.repeat)] if small else None
        imports = [measured("--version") for _ in range(args.repeat)]
        print(f"{'hirescam report OUT':40s} {'wall s':>7s} {'CPU s':>7s} {'peak MB':>8s} {'load':>6s}")
        if full:
            print(row("from scratch", full))
        print(row("nothing changed", rounds["unchanged"]))
        print(row(f"{args.changed} inputs re-explained", rounds["changed"]))
        print(row("results.jsonl rewritten (a resumed run)", rounds["resumed"]))
        if smaller:
            print(row(f"nothing changed, a run of {compare} inputs", smaller))
        print(row("hirescam --version (the imports)", imports))
        print(
            f"(medians of {args.repeat} rounds, interleaved; load: 1-minute load average during the command)"
        )
        report = out / "report"
        size = {
            name: sum(p.stat().st_size for p in (report / name).iterdir()) for name in ("cards", "chunks")
        }
        files = {name: len(os.listdir(report / name)) for name in size}
        index, html = (report / "index.js").stat().st_size, (report / "index.html").stat().st_size
        print(
            f"index.js {index / 2**20:.1f} MB ({index / args.images:.0f} bytes per input), "
            f"index.html {html / 1024:.0f} KB; cards: {files['cards']} files, "
            f"{size['cards'] / 2**20:.0f} MB; manifests: {size['chunks'] / 2**20:.0f} MB"
        )
        if not Path(CHROMIUM).exists():
            print(f"{CHROMIUM} missing: no browser timings")
            return
        load = os.getloadavg()[0]
        times = browser_timings(report / "index.html", args.loads)
        loads = f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
        print(f"in Chromium (median of {args.loads} loads; {loads}):")
        print(f"  first page, navigation -> interactive   {times['ready'] * 1000:7.0f} ms")
        print(f"    the same by the page's own clock       {times['in_page'] * 1000:7.0f} ms")
        print(f"  first page, navigation -> load event    {times['load'] * 1000:7.0f} ms")
        print(f"  next page (beyond the first chunk) shown {times['next'] * 1000:7.0f} ms")
        print(f"  re-sort of all {args.images} by disagreement  {times['sort'] * 1000:7.1f} ms")
        print(f"    until its first page is shown          {times['sorted'] * 1000:7.0f} ms")


if __name__ == "__main__":
    main()
