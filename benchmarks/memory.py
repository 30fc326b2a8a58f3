"""Peak resident memory of `hirescam explain` on a small and a 10x larger folder: it should not grow.

    python benchmarks/memory.py [--counts 200 2000] [--model tiny|resnet18] [--workers 2] [--batch-size 16]
                                [--discovery-counts 2000 200000] [--only explain|discovery]

Generates the images (64x48 PNGs, smooth colour fields with noise) in a temp folder, then runs
`python -m hirescam_cli explain FOLDER -o OUT -c CONFIG -q` for each count as a subprocess, through a
small wrapper that prints the process's peak RSS (getrusage RUSAGE_SELF) and the largest peak RSS of its
waited-for children, the DataLoader workers (RUSAGE_CHILDREN). Prints both and their ratios, last count
over first; streaming keeps memory bounded by the batch, so the goal is a ratio <= 1.2. Since the imports
alone hold most of the main process's RSS, it also prints the growth above them per extra image.

Discovery: the same wrapper idea around input discovery alone (``discovery.catalogue``) over folders of
empty files (1,000 per subfolder), 2,000 against 200,000: the extra peak RSS per input, whose goal is at
most 150 bytes (a million inputs at most 150 MB more than a thousand).

Models: "tiny" is tests/tiny_models.py:tiny_net (16x16 inputs, put on PYTHONPATH), where the model adds
almost nothing to the imports and the pipeline; "resnet18" is torchvision's with random weights and
10 classes, 64x64 inputs.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
GOAL = 1.2
DISCOVERY_GOAL = 150  # bytes of peak RSS per extra input

# Discovers the folder in argv[1], then prints peak RSS in KiB after the imports and after discovery.
DISCOVERY = """
import json, resource, sys, time
from hirescam_cli.discovery import catalogue
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
with catalogue([sys.argv[1]]) as found:
    count = len(found)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"count": count, "imported_kib": imported, "peak_kib": peak, "seconds": seconds}))
"""

MODELS = {
    "tiny": '[model]\nfactory = "tiny_models:tiny_net"\n[preprocess]\nresize = 16\ncrop = 16\n',
    "resnet18": '[model]\narch = "resnet18"\nnum_classes = 10\n[preprocess]\nresize = 64\ncrop = 64\n',
}

# Runs the CLI in this process, then reports peak RSS in KiB (Linux ru_maxrss unit) on the last stderr line:
# after the imports (torch and torchvision alone hold most of it), and for the whole run.
WRAPPER = """
import json, resource, sys
from hirescam_cli.cli import main
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    main()
except SystemExit as e:
    code = e.code or 0
else:
    code = 0
peak = {
    "code": code,
    "imported_kib": imported,
    "main_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "workers_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
}
print("MEMORY " + json.dumps(peak), file=sys.stderr)
"""


def make_images(folder: Path, count: int) -> None:
    """`count` distinct 64x48 PNGs: a random colour field upsampled, plus noise."""
    folder.mkdir()
    rng = np.random.default_rng(count)
    for i in range(count):
        field = Image.fromarray(rng.integers(0, 255, (3, 4, 3), dtype=np.uint8))
        small = field.resize((64, 48), Image.BICUBIC)
        noise = rng.integers(-25, 25, (48, 64, 3))
        pixels = np.clip(np.asarray(small, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:05d}.png", compress_level=1)


def measure(folder: Path, out: Path, config: Path) -> dict:
    """Run the CLI on a folder in a fresh interpreter; returns exit code, peak RSS (KiB) and seconds."""
    path = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    args = ["explain", str(folder), "-o", str(out), "-c", str(config), "-q"]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args], env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    lines = [line for line in done.stderr.splitlines() if line.startswith("MEMORY ")]
    if not lines:
        sys.exit(f"the run failed (exit {done.returncode}):\n{done.stderr}")
    result = json.loads(lines[-1].removeprefix("MEMORY "))
    if result["code"] != 0:
        sys.exit(f"the run exited {result['code']}:\n{done.stderr}")
    return {**result, "seconds": seconds}


def make_empty_files(folder: Path, count: int) -> None:
    """`count` empty .jpg files, 1,000 per subfolder."""
    for i in range(count):
        sub = folder / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"img_{i:07d}.jpg").touch()


def discovery(counts: list[int]) -> None:
    """Peak RSS of discovering `counts` empty files, in fresh interpreters; prints the extra per input."""
    print(f"discovery over empty files ({counts[0]:,} and {counts[1]:,}), 1,000 per folder")
    print(f"{'inputs':>9} {'peak MiB':>9} {'(imports)':>10} {'seconds':>8}")
    results = []
    with tempfile.TemporaryDirectory(prefix="hirescam-discovery-") as temp:
        for count in counts:
            folder = Path(temp) / f"files_{count}"
            make_empty_files(folder, count)
            done = subprocess.run(
                [sys.executable, "-c", DISCOVERY, str(folder)], capture_output=True, text=True, check=True
            )
            result = json.loads(done.stdout.splitlines()[-1])
            assert result["count"] == count, result
            results.append(result)
            print(
                f"{count:>9,} {result['peak_kib'] / 1024:>9.1f} {result['imported_kib'] / 1024:>10.1f}"
                f" {result['seconds']:>8.1f}",
                flush=True,
            )
    small, large = results
    per_input = (large["peak_kib"] - small["peak_kib"]) * 1024 / (counts[1] - counts[0])
    verdict = "ok" if per_input <= DISCOVERY_GOAL else f"ABOVE the goal of {DISCOVERY_GOAL}"
    print(
        f"discovery: {per_input:+.1f} bytes of peak RSS per extra input "
        f"({per_input * 1e6 / 2**20:.0f} MiB per million): {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs=2, default=[200, 2000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--discovery-counts", type=int, nargs=2, default=[2000, 200_000], metavar=("SMALL", "LARGE")
    )
    parser.add_argument("--only", choices=["explain", "discovery"])
    args = parser.parse_args()
    if args.only != "explain":
        discovery(args.discovery_counts)
    if args.only == "discovery":
        return
    with tempfile.TemporaryDirectory(prefix="hirescam-memory-") as temp:
        temp = Path(temp)
        config = temp / "config.toml"
        config.write_text(
            MODELS[args.model] + f"[explain]\nbatch_size = {args.batch_size}\nworkers = {args.workers}\n"
        )
        print(f"model {args.model}, batch size {args.batch_size}, {args.workers} workers, 64x48 PNGs")
        print(f"{'images':>7} {'main MiB':>9} {'(imports)':>10} {'worker MiB':>11} {'seconds':>8}")
        results = []
        for count in args.counts:
            folder = temp / f"images_{count}"
            make_images(folder, count)
            result = measure(folder, temp / f"out_{count}", config)
            results.append(result)
            mib = {key: result[key] / 1024 for key in ("main_kib", "imported_kib", "workers_kib")}
            print(
                f"{count:>7} {mib['main_kib']:>9.1f} {mib['imported_kib']:>10.1f} {mib['workers_kib']:>11.1f}"
                f" {result['seconds']:>8.1f}",
                flush=True,
            )
    small, large = results
    extra = args.counts[1] - args.counts[0]
    for name, key in (("main", "main_kib"), ("workers", "workers_kib")):
        ratio = large[key] / small[key] if small[key] else float("nan")
        per_image = (large[key] - small[key]) * 1024 / extra  # the imports cancel out
        verdict = "ok" if ratio <= GOAL else f"ABOVE the goal of {GOAL}"
        print(
            f"{name:8s} peak RSS ratio {args.counts[1]}/{args.counts[0]} = {ratio:.3f} "
            f"({per_image:+.0f} bytes per extra image): {verdict}"
        )


if __name__ == "__main__":
    main()
