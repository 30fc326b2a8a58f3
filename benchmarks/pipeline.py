"""End-to-end images/s of `hirescam explain` against a decode + preprocess + inference-only loop.

    python benchmarks/pipeline.py [--images 256] [--arch resnet50] [--rounds 2] [--workers N]
                                  [--batch-size N] [--device auto|cpu|cuda] [--amp] [--png fast|small]
                                  [--format png|jpeg|webp]

Generates a folder of 640x480 JPEGs, then alternates the two runs over the same DataLoader
settings and the same decoder (on a CUDA device the JPEGs are decoded there, in batches): the
inference-only loop (build the model, read, decode, preprocess, forward under inference_mode) and the full run
(both maps, overlays, JSON summaries, results.jsonl). Prints the ratio of the medians and of each
round. Workers, torch threads and batch size default to what `hirescam explain` chooses on this
machine (resources.py); both sides use the same values.
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hirescam_cli import resources
from hirescam_cli.batches import InputDataset, make_loader
from hirescam_cli.config import build
from hirescam_cli.discovery import discover
from hirescam_cli.run import run_explain
from hirescam_cli.session import Session, pick_device


def make_images(folder: Path, count: int) -> None:
    """Smooth random colour fields with some texture, as JPEGs (so decoding costs what a photo costs)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
        noise = rng.integers(-20, 20, (480, 640, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:04d}.jpg", quality=90)


def inference_only(config, inputs: list[str]) -> float:
    """Seconds for the same loader (same workers, threads, batch size) feeding a plain inference forward,
    building the model included (as the full run's seconds include it). It opens the run's session: the
    same device, resources, heap settings and model."""
    start = time.perf_counter()
    session = Session.open(config, explainer=False, pictures=False)
    device, chosen, model = session.device, session.resources, session.loaded.module
    dataset = InputDataset(discover(inputs), session.modality)
    loader = make_loader(dataset, chosen.batch_size, chosen.workers, pin_memory=device.type == "cuda")
    amp = torch.autocast(device.type, enabled=config.explain.amp and device.type == "cuda")
    with torch.inference_mode(), amp:
        for batch in loader:
            batch = session.modality.finish(batch, device)  # the run's decoder: JPEGs on a CUDA device
            model(batch.inputs.to(device, non_blocking=True)).argmax(1).cpu()
    return time.perf_counter() - start


def full_run(config, inputs: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    code = run_explain(config, inputs, out, overwrite=True, quiet=True)
    assert code == 0, code
    return time.perf_counter() - start


def config_for(args: argparse.Namespace, arch: str | None = None):
    """The run's config: random weights (seeded: no download), the flags' resources and pictures."""
    explain = {"batch_size": args.batch_size, "workers": args.workers, "device": args.device, "amp": args.amp}
    raw = {
        "model": {"arch": arch or args.arch, "weights": "none"},
        "explain": {k: v for k, v in explain.items() if v is not None},
        "output": {"png": args.png, "format": args.format},
    }
    return build(raw, Path.cwd())


def compare(config, folder: Path, out: Path, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of the inference-only loop and of the full run, `rounds` of each, interleaved."""
    inference_only(config, [str(folder)])  # warm-up: page cache, allocator, thread pools
    plain, full = [], []
    for _ in range(rounds):
        plain.append(inference_only(config, [str(folder)]))
        full.append(full_run(config, [str(folder)], out))
    return plain, full


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags pipeline.py and gpu.py share."""
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, help="default: by device, as hirescam explain")
    parser.add_argument("--workers", type=int, help="default: by cores and device, as hirescam explain")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--png", default="fast", choices=["fast", "small"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--amp", action="store_true", help="mixed precision forward (CUDA), both sides")
    parser.add_argument("--format", default="png", choices=["png", "jpeg", "webp"], help="the overlays'")
    args = parser.parse_args()
    config = config_for(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        make_images(folder, args.images)
        plain, full = compare(config, folder, Path(tmp) / "out", args.rounds)
    n = args.images
    p, f = statistics.median(plain), statistics.median(full)
    device = pick_device(args.device)
    chosen = resources.choose(device, args.workers, args.batch_size)
    setup = f"batch {chosen.batch_size}, {chosen.workers} workers, {chosen.threads} threads"
    print(f"{args.arch}, {n} JPEGs 640x480, {setup} ({chosen.cores} usable cores), {device}, amp {args.amp}")
    print(f"inference-only loop : {p:7.2f} s  {n / p:6.2f} images/s")
    pictures = f"{args.png} PNGs" if args.format == "png" else f"{args.format} overlays"
    print(f"full explain run    : {f:7.2f} s  {n / f:6.2f} images/s  (hirescam+gradcam, {pictures}, JSON)")
    print(f"ratio full / inference-only: {f / p:.3f}x (time); throughput {p / f:.2f}x the loop's")
    rounds = ", ".join(f"{b / a:.3f}x" for a, b in zip(plain, full, strict=True))
    print(f"each round (full / the loop just before it): {rounds}")


if __name__ == "__main__":
    main()
