"""The GPU table in one command: full-run images/s against the inference-only loop, same decoder.

    python benchmarks/gpu.py [--images 1024] [--rounds 2] [--batch-size N] [--workers N]
                             [--models resnet50 vit_b_16] [--writers 3 5 8] [--device cuda]

Generates 640x480 JPEGs once, then for each model, precision (fp32, --amp) and overlay format (PNG,
JPEG) alternates the inference-only loop and the full run as benchmarks/pipeline.py does (on CUDA
both decode the JPEGs on the device, in batches), and prints one row as soon as it is measured:
images/s of each and their ratio, against the goals (PNG >= 0.6x, JPEG >= 0.85x of the loop's
images/s). With --writers, every row is taken once per count of writer processes (default: what the
run chooses, resources.default_writers), to choose that default by measurement. First the loader
alone (read, decode, preprocess) and the explainer alone on device-resident batches, for context.
`--device cpu --images 16 --models resnet18` makes a quick dry run without a GPU (fp32 only). Without
CUDA (and no `--device cpu`) it stops with one line.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from pipeline import add_arguments, compare, config_for, make_images

from hirescam_cli import resources
from hirescam_cli.batches import InputDataset, make_loader
from hirescam_cli.config import ConfigError
from hirescam_cli.discovery import discover
from hirescam_cli.session import Session, pick_device

GOALS = {"png": 0.6, "jpeg": 0.85}  # full-run images/s over the inference-only loop's, at least


def loader_alone(config, folder: Path) -> float:
    """Images/s of reading, decoding and preprocessing alone (the run's loader and decoder)."""
    session = Session.open(config, explainer=False, pictures=False)
    device, chosen = session.device, session.resources
    items = discover([str(folder)])
    loader = make_loader(
        InputDataset(items, session.modality), chosen.batch_size, chosen.workers, device.type == "cuda"
    )
    start = time.perf_counter()
    for batch in loader:
        batch = session.modality.finish(batch, device)
        batch.inputs.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = len(items) / (time.perf_counter() - start)
    session.close()
    return rate


def explainer_alone(config, batches: int = 10) -> tuple[float, float]:
    """Images/s of the explainer (both maps, top-1) and of a plain forward on device-resident batches."""
    session = Session.open(config)
    chosen, device = session.resources, session.device
    x = torch.randn((chosen.batch_size, *session.modality.input_shape()), device=device)
    amp = torch.autocast(device.type, enabled=config.explain.amp and device.type == "cuda")

    def plain() -> None:
        with torch.inference_mode(), amp:
            session.loaded.module(x)

    rates = []
    for call in (plain, lambda: session.explain(x)):
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(batches * chosen.batch_size / (time.perf_counter() - start))
    session.close()
    return rates[1], rates[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(images=1024, device="cuda")
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    parser.add_argument("--writers", nargs="+", type=int, help="writer processes to try (default: the run's)")
    args = parser.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        sys.exit("gpu.py: no CUDA device here (for a dry run: --device cpu --images 16 --models resnet18)")
    try:
        device = pick_device(args.device)
    except ConfigError as error:
        sys.exit(f"gpu.py: {error}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    chosen = resources.choose(device, args.workers, args.batch_size)
    print(
        f"{name}; torch {torch.__version__}; {chosen.cores} cores; batch {chosen.batch_size}, "
        f"{chosen.workers} decoding workers, {chosen.writers} writer processes by default",
        flush=True,
    )
    precisions = (False, True) if device.type == "cuda" else (False,)  # --amp: a CUDA forward only
    default_writers = resources.default_writers
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        make_images(folder, args.images)
        args.amp, args.format = False, "png"
        print(
            f"loader alone: {loader_alone(config_for(args, args.models[0]), folder):.1f} images/s", flush=True
        )
        for arch in args.models:
            for amp in precisions:
                args.amp = amp
                explained, plain = explainer_alone(config_for(args, arch))
                print(
                    f"{arch}, amp {amp}: explainer alone {explained:.0f} images/s, plain forward "
                    f"{plain:.0f} images/s (device-resident batches)",
                    flush=True,
                )
        print(
            f"\n{'model':10s} {'precision':9s} {'overlays':8s} {'writers':>7s} {'loop img/s':>10s} "
            f"{'full img/s':>10s} {'ratio':>6s}  goal",
            flush=True,
        )
        for arch in args.models:
            for amp in precisions:
                for picture_format in ("png", "jpeg"):
                    for writers in args.writers or [None]:
                        count = default_writers if writers is None else (lambda _d, _c, n=writers: n)
                        resources.default_writers = count
                        args.amp, args.format = amp, picture_format
                        config = config_for(args, arch)
                        plain, full = compare(config, folder, Path(tmp) / "out", args.rounds)
                        loop = args.images / statistics.median(plain)
                        run = args.images / statistics.median(full)
                        shown = resources.choose(device, args.workers, args.batch_size).writers
                        goal = GOALS[picture_format]
                        verdict = "met" if run / loop >= goal else "missed"
                        print(
                            f"{arch:10s} {'amp' if amp else 'fp32':9s} {picture_format:8s} {shown:7d} "
                            f"{loop:10.1f} {run:10.1f} {run / loop:5.2f}x  >= {goal}x {verdict}",
                            flush=True,
                        )
        resources.default_writers = default_writers


if __name__ == "__main__":
    main()
