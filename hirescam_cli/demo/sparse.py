"""A second demo model that ignores half of its grid: python -m hirescam_cli.demo.sparse.

DemoNet's trained features with a new linear head that reads only the positions (i, j) of the
8 x 8 map where i + j is even (a checkerboard): its weights are exactly zero on the other 32
positions. Everything after the target layer is still affine, so HiResCAM must put no mass on
the ignored positions, while Grad-CAM, which averages the gradient over the grid, spreads mass
onto every position that has activations. The head is fitted on frozen features in seconds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from hirescam_cli.demo.net import DemoNet, load_demo_model, normalise
from hirescam_cli.demo.train import render_pool, save_atomic

WEIGHTS_PATH = Path(__file__).with_name("demo_sparse_net.pt")


def read_positions(side: int = 8) -> torch.Tensor:
    """bool (side, side): the checkerboard of positions the sparse head reads."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return (rows + cols) % 2 == 0


@torch.no_grad()
def features_of(model: DemoNet, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """Frozen features (N, 64, 8, 8) of uint8 model-size images."""
    return torch.cat([model.features(normalise(images[i : i + batch])) for i in range(0, len(images), batch)])


def fit_head(
    features: torch.Tensor, targets: torch.Tensor, start: nn.Linear, steps: int, seed: int
) -> nn.Linear:
    """Fit a linear head on the checkerboard positions only (BCE, full batch, AdamW)."""
    torch.manual_seed(seed)
    keep = read_positions(features.shape[-1]).expand(features.shape[1], -1, -1).flatten()
    head = nn.Linear(start.in_features, start.out_features)
    with torch.no_grad():
        head.weight.copy_(start.weight * keep * 2)  # the kept half carries what the whole did
        head.bias.copy_(start.bias)
    inputs = features.flatten(1)
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(steps):
        loss = loss_fn(nn.functional.linear(inputs, head.weight * keep, head.bias), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        head.weight.mul_(keep)  # exactly zero where the head does not read
    return head


def load_sparse_model() -> nn.Module:
    """The shipped sparse-head DemoNet in eval mode on the CPU."""
    model = DemoNet()
    model.load_state_dict(torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True))
    return model.eval()


def main() -> None:
    """Fit the sparse head on frozen features of freshly generated images and write the weights."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="weights file to write")
    parser.add_argument("--seed", type=int, default=0, help="data stream and init")
    parser.add_argument("--images", type=int, default=4000, help="generated training images")
    parser.add_argument("--steps", type=int, default=400, help="full-batch optimiser steps")
    parser.add_argument("--workers", type=int, default=2, help="data generation processes")
    args = parser.parse_args()
    start = time.perf_counter()
    model = load_demo_model()
    pool, targets = render_pool(args.seed, args.images, args.workers)
    features = features_of(model, pool)
    model.head[1] = fit_head(features, targets.float(), model.head[1], args.steps, args.seed)
    save_atomic(model.state_dict(), args.out)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
