"""Peak resident memory of `hirescam explain`: flat over a 10x larger folder, bounded on huge photos.

    python benchmarks/memory.py [--counts 200 2000] [--model tiny|resnet18] [--workers 2] [--batch-size 16]
                                [--discovery-counts 2000 200000] [--photos 8] [--photo-size 6000x4000]
                                [--only explain|discovery|photos]

Generates the images (64x48 PNGs, smooth colour fields with noise) in a temp folder, then runs
`python -m hirescam_cli explain FOLDER -o OUT -c CONFIG -q` for each count as a subprocess, through a
small wrapper that prints the process's peak RSS (getrusage RUSAGE_SELF) and the largest peak RSS of its
waited-for children, the DataLoader workers (RUSAGE_CHILDREN). Prints both and their ratios, last count
over first; streaming keeps memory bounded by the batch, so the goal is a ratio <= 1.2. Since the imports
alone hold most of the main process's RSS, it also prints the growth above them per extra image.

Discovery: the same wrapper idea around input discovery alone (``discovery.catalogue``) over folders of
empty files (1,000 per subfolder), 2,000 against 200,000: the extra peak RSS per input, whose goal is at
most 150 bytes (a million inputs at most 150 MB more than a thousand).

Photos: a folder of `--photos` JPEGs of 6000 x 4000 (smooth gradients and shapes plus mild noise, quality
90), explained with the default resources of this machine (the config sets neither workers nor batch size)
and the tiny model: the default methods, and all six methods with --top-k 3, each with writer threads (the
CPU default) and with 2 writer processes (as on a GPU; `resources.default_writers` patched). A sampler
thread in the run's process reads the peak RSS (VmHWM, a high-water mark) of each DataLoader worker and
writer process every 20 ms (only growth in a child's last 20 ms could be missed); the main process's is
read exactly at the end. Each is checked against the goal of 2 GB per process. (RUSAGE_CHILDREN would
mislead: the resource tracker, forked and exec'd, inherits the main process's high-water mark.) Shared
memory in flight (batches between workers and the main process, pictures waiting for writer processes)
belongs to no process until mapped: the peak growth of the machine's Shmem (/proc/meminfo; other users'
shared memory counts too) is printed beside. Also prints the PNGs' sizes.

Models: "tiny" is tests/tiny_models.py:tiny_net (16x16 inputs, put on PYTHONPATH), where the model adds
almost nothing to the imports and the pipeline; "resnet18" is torchvision's with random weights and
10 classes, 64x64 inputs.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from hirescam_cli.engine.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
GOAL = 1.2
DISCOVERY_GOAL = 150  # bytes of peak RSS per extra input
PHOTO_GOAL = 2e9  # bytes of peak RSS of any one process of a run over huge photos

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
    "resnet18": (
        '[model]\narch = "resnet18"\nweights = "none"\nnum_classes = 10\n'
        "[preprocess]\nresize = 64\ncrop = 64\n"
    ),
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


# Runs the CLI in this process (settings as JSON in argv[1]: writer processes), sampling the peak RSS of this
# process and of its DataLoader workers and writer processes; prints them in KiB on the last stderr line.
PHOTO_WRAPPER = """
import json, multiprocessing, resource, sys, threading
settings = json.loads(sys.argv.pop(1))
if settings["writers"]:
    from hirescam_cli import resources
    resources.default_writers = lambda device, cores: settings["writers"]
from hirescam_cli.cli import main

ROLES = {"_worker_loop": "worker", "_process_worker": "writer"}
roles, peaks = {}, {}  # pid -> role, pid -> peak KiB
start = multiprocessing.process.BaseProcess.start

def start_noting_the_role(process):
    role = ROLES.get(getattr(process._target, "__name__", ""), "other")  # start() drops _target
    start(process)
    roles[process.pid] = role

multiprocessing.process.BaseProcess.start = start_noting_the_role
shmem = {"start": None, "peak": 0}

def field(path, name):
    try:
        with open(path) as lines:
            return next(int(line.split()[1]) for line in lines if line.startswith(name))
    except (OSError, StopIteration):
        return None

def sample():
    for pid in list(roles):
        peak = field(f"/proc/{pid}/status", "VmHWM:")
        if peak is not None:
            peaks[pid] = max(peak, peaks.get(pid, 0))
    shared = field("/proc/meminfo", "Shmem:")
    shmem["start"] = shared if shmem["start"] is None else shmem["start"]
    shmem["peak"] = max(shmem["peak"], shared - shmem["start"])

stop = threading.Event()
def sampler():
    while not stop.wait(0.02):
        try:
            sample()
        except RuntimeError:  # the dict of roles changed while being copied
            pass

sample()
thread = threading.Thread(target=sampler, daemon=True)
thread.start()
try:
    main()
except SystemExit as e:
    code = e.code or 0
else:
    code = 0
stop.set()
thread.join()
by_role = {}
for pid, peak in peaks.items():
    by_role.setdefault(roles[pid], []).append(peak)
result = {
    "code": code,
    "main_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "roles": by_role,
    "shmem_kib": shmem["peak"],
}
print("MEMORY " + json.dumps(result), file=sys.stderr)
"""
SIX_TOP3 = ["--methods", ",".join(METHODS), "--top-k", "3"]
PHOTO_RUNS = {  # name -> (title, flags, writer processes)
    "defaults": ("defaults (hirescam, gradcam; top-1)", [], 0),
    "six-top3": ("all six methods, --top-k 3", SIX_TOP3, 0),
    "processes": ("defaults, 2 writer processes", [], 2),
    "processes-six-top3": ("six methods, top-3, 2 writer processes", SIX_TOP3, 2),
}


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


def make_photo(path: Path, width: int, height: int, seed: int) -> None:
    """A photo-like JPEG (quality 90): a colour gradient and soft shapes, upscaled, plus mild noise."""
    rng = np.random.default_rng(seed)
    small_w, small_h = max(1, width // 10), max(1, height // 10)
    ramp = np.linspace(0, 1, small_w)[None, :, None]
    start, end = rng.integers(0, 256, (2, 1, 1, 3))
    sky = np.broadcast_to(start + (end - start) * ramp, (small_h, small_w, 3)).astype(np.uint8)
    canvas = Image.fromarray(np.ascontiguousarray(sky))
    draw = ImageDraw.Draw(canvas)
    for _ in range(12):
        x, y = rng.integers(0, small_w), rng.integers(0, small_h)
        rx = rng.integers(small_w // 20 + 1, small_w // 4 + 2)
        ry = rng.integers(small_h // 20 + 1, small_h // 4 + 2)
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    full = np.asarray(canvas.filter(ImageFilter.GaussianBlur(3)).resize((width, height), Image.BICUBIC))
    pixels = np.empty_like(full)
    for top in range(0, height, 500):  # the noise in bands, to keep this process small
        band = full[top : top + 500].astype(np.int16) + rng.integers(-6, 7, full[top : top + 500].shape)
        pixels[top : top + 500] = np.clip(band, 0, 255)
    Image.fromarray(pixels).save(path, quality=90)


def run_wrapped(wrapper: str, args: list[str]) -> dict:
    """Run the CLI through a wrapper in a fresh interpreter; returns its MEMORY line and the seconds."""
    path = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *args], env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    lines = [line for line in done.stderr.splitlines() if line.startswith("MEMORY ")]
    if not lines:
        sys.exit(f"the run failed (exit {done.returncode}):\n{done.stderr}")
    result = json.loads(lines[-1].removeprefix("MEMORY "))
    if result["code"] != 0:
        sys.exit(f"the run exited {result['code']}:\n{done.stderr}")
    return {**result, "seconds": seconds}


def measure(folder: Path, out: Path, config: Path) -> dict:
    """Run the CLI on a folder in a fresh interpreter; returns exit code, peak RSS (KiB) and seconds."""
    return run_wrapped(WRAPPER, ["explain", str(folder), "-o", str(out), "-c", str(config), "-q"])


def png_sizes(out: Path) -> str:
    """Count, total and largest size of the PNGs under `out`, and their pixel sizes."""
    pngs = sorted(out.rglob("*.png"))
    sizes = [p.stat().st_size for p in pngs]
    shapes = sorted({Image.open(p).size for p in pngs})
    shown = ", ".join(f"{w}x{h}" for w, h in shapes)
    return f"{len(pngs)} PNGs of {shown}: {sum(sizes) / 1e6:.1f} MB in all, largest {max(sizes) / 1e6:.1f} MB"


def photos(count: int, size: tuple[int, int], runs: list[str]) -> None:
    """Peak RSS of every process of runs over `count` huge JPEGs, against PHOTO_GOAL."""
    width, height = size
    with tempfile.TemporaryDirectory(prefix="hirescam-photos-") as temp:
        temp = Path(temp)
        folder = temp / "photos"
        folder.mkdir()
        for i in range(count):
            make_photo(folder / f"photo_{i:02d}.jpg", width, height, i)
        jpeg_mb = sum(p.stat().st_size for p in folder.iterdir()) / count / 1e6
        config = temp / "config.toml"
        config.write_text(MODELS["tiny"])  # workers and batch size: the defaults of this machine
        print(f"{count} JPEGs of {width}x{height} ({jpeg_mb:.1f} MB each), tiny model, default resources")
        columns = ("main MiB", "workers MiB", "writers MiB", "shm MiB", "s")
        print(f"{'run':38s}", *(f"{c:>{max(9, len(c))}}" for c in columns))
        for name in runs:
            title, flags, writers = PHOTO_RUNS[name]
            out = temp / "out"
            args = ["explain", str(folder), "-o", str(out), "-c", str(config), "-q", *flags]
            result = run_wrapped(PHOTO_WRAPPER, [json.dumps({"writers": writers}), *args])
            roles = {role: max(peaks) / 1024 for role, peaks in result["roles"].items()}
            main_mib = result["main_kib"] / 1024
            worst = max(main_mib, *roles.values()) * 2**20
            verdict = "ok" if worst <= PHOTO_GOAL else f"ABOVE the goal of {PHOTO_GOAL / 1e9:.0f} GB"
            workers_mib, writers_mib = roles.get("worker", 0), roles.get("writer", 0)
            shm_mib = result["shmem_kib"] / 1024
            print(
                f"{title:38s} {main_mib:>9.1f} {workers_mib:>11.1f} {writers_mib:>11.1f}"
                f" {shm_mib:>9.1f} {result['seconds']:>9.1f}  {verdict}",
                flush=True,
            )
            print(f"{'':38s} {png_sizes(out)}", flush=True)
            shutil.rmtree(out)


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
    parser.add_argument("--photos", type=int, default=8, help="huge JPEGs to generate")
    parser.add_argument("--photo-size", default="6000x4000", help="WIDTHxHEIGHT of the huge JPEGs")
    parser.add_argument("--photo-runs", nargs="+", choices=list(PHOTO_RUNS), default=list(PHOTO_RUNS))
    parser.add_argument("--only", choices=["explain", "discovery", "photos"])
    args = parser.parse_args()
    if args.only in (None, "discovery"):
        discovery(args.discovery_counts)
    if args.only in (None, "photos"):
        photos(args.photos, tuple(int(v) for v in args.photo_size.lower().split("x")), args.photo_runs)
    if args.only not in (None, "explain"):
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
