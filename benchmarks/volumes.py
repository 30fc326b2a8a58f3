"""Volumes: the Explainer against a plain inference forward and MONAI's GradCAM, and end-to-end volumes/s.

    python benchmarks/volumes.py [--side 96] [--rounds 3] [--volumes 40 4]

A MONAI DenseNet121 (3-D, one input channel, 4 classes, random weights) on 1 x SIDE^3 volumes, at the
layer MONAI's examples use (class_layers.relu). Every variant runs once per round, interleaved, and the
table reports the median per volume and each round's ratio to that round's plain forward. MONAI's
GradCAM backpropagates through the whole network for one class per call; "HiResCAM from MONAI's hooks"
is what it takes to get HiResCAM's map out of MONAI by hand (its ModelWithHooks: forward, full
backward, then sum(G * A)), per class. Then `hirescam explain` on NIfTI volumes end to end, and its
peak memory, for two folder sizes (the memory should stay flat).
CPU-heavy: a few rounds take minutes on 2 cores; note `uptime` beside the figures.
"""

import argparse
import copy
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timing import each_round

from hirescam_cli import Explainer

LAYER = "class_layers.relu"
CLASSES = 4


def densenet() -> torch.nn.Module:
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    return DenseNet121(spatial_dims=3, in_channels=1, out_channels=CLASSES).eval()


def engine_table(side: int, rounds: int) -> None:
    """The cost of every variant per volume, as a ratio to a plain inference forward."""
    from monai.visualize import GradCAM
    from monai.visualize.class_activation_maps import ModelWithHooks

    device = torch.device("cpu")
    model = densenet()
    x = torch.randn(1, 1, side, side, side, generator=torch.Generator().manual_seed(0))
    top3 = model(x).topk(3).indices[0].tolist()
    # MONAI's hooks stay on the modules they are given: each gets a copy of its own, the same weights
    monai_gradcam = GradCAM(nn_module=copy.deepcopy(model), target_layers=LAYER)
    hooks = ModelWithHooks(copy.deepcopy(model), LAYER, register_forward=True, register_backward=True)

    def plain():
        with torch.inference_mode():
            model(x)

    def monai_per_class(classes):
        for c in classes:
            monai_gradcam(x, class_idx=c)

    def hirescam_by_hand(classes):
        for c in classes:
            hooks(x, class_idx=c)
            acts, grads = hooks.activations[LAYER], hooks.gradients[LAYER]
            (grads * acts).sum(1)

    with Explainer(model, LAYER) as explainer:
        calls = {
            "plain inference forward": plain,
            "hirescam+gradcam top-1": lambda: explainer(x, methods=("hirescam", "gradcam"), top_k=1),
            "hirescam+gradcam top-3": lambda: explainer(x, methods=("hirescam", "gradcam"), top_k=3),
            "MONAI GradCAM, 1 class": lambda: monai_per_class(top3[:1]),
            "MONAI GradCAM, 3 classes": lambda: monai_per_class(top3),
            "HiResCAM from MONAI hooks, 1": lambda: hirescam_by_hand(top3[:1]),
            "HiResCAM from MONAI hooks, 3": lambda: hirescam_by_hand(top3),
        }
        times = each_round(calls, rounds, device, 1)
    plain_times = times["plain inference forward"]
    base = statistics.median(plain_times)
    print(f"\nMONAI DenseNet121 3-D, 1 x {side}^3, layer {LAYER}, cpu, median of {rounds} (load {load()})")
    print(f"{'variant':32s} {'s/volume':>9s} {'ratio':>7s}   each round's ratio to that round's forward")
    for name, values in times.items():
        median = statistics.median(values)
        each = " ".join(f"{v / p:.2f}x" for v, p in zip(values, plain_times, strict=True))
        print(f"{name:32s} {median:9.3f} {median / base:6.2f}x   {each}")


CONFIG = """
[input]
kind = "volumes"
[model]
arch = "monai:DenseNet121"
weights = "none"
target_layer = "{layer}"
[model.kwargs]
spatial_dims = 3
in_channels = 1
out_channels = {classes}
[preprocess]
window = [-1000, 400]
resize = [{side}, {side}, {side}]
[explain]
device = "cpu"
"""


def end_to_end(side: int, counts: list[int]) -> None:
    """volumes/s and peak memory of `hirescam explain` over folders of `counts` NIfTI volumes."""
    import nibabel as nib

    print(f"\nhirescam explain, MONAI DenseNet121, {side}^3 NIfTI volumes (load {load()})")
    print(f"{'volumes':>8s} {'seconds':>8s} {'volumes/s':>10s} {'peak RSS MB':>12s}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "config.toml"
        config.write_text(CONFIG.format(layer=LAYER, classes=CLASSES, side=side))
        rng = np.random.default_rng(0)
        for count in counts:
            folder = root / f"in{count}"
            folder.mkdir()
            for i in range(count):
                data = rng.normal(0, 300, (side, side, side)).astype(np.int16)
                nib.save(
                    nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0])), str(folder / f"v{i:03d}.nii.gz")
                )
            command = [sys.executable, "-m", "hirescam_cli", "explain", folder, "-o", root / f"out{count}"]
            start = time.perf_counter()
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            subprocess.run([*map(str, command), "-c", str(config), "-q"], check=True, env=os.environ.copy())
            seconds = time.perf_counter() - start
            peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
            print(f"{count:8d} {seconds:8.1f} {count / seconds:10.3f} {peak:12.0f}")


def load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--volumes", type=int, nargs="+", default=[4, 40])
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    engine_table(args.side, args.rounds)
    if not args.skip_end_to_end:
        end_to_end(args.side, args.volumes)


if __name__ == "__main__":
    main()
