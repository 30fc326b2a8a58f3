"""Train the 3-D demo model and its sparse-head variant on fresh phantoms, and measure them on held-out
scans as the command line prepares them: python -m hirescam_cli.demo.volume_train."""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from hirescam_cli.demo.phantoms import CLASSES, draw, model_grid, render
from hirescam_cli.demo.quality import average_precision, f1_score
from hirescam_cli.demo.train import save_atomic
from hirescam_cli.demo.volume_net import (
    SIDE,
    SPACING,
    SPARSE_WEIGHTS_PATH,
    WEIGHTS_PATH,
    WINDOW,
    VolumeNet,
    load_volume_model,
    read_cells,
    window,
)

HELD_OUT_SEED = 1_000_003  # training uses small seeds; this stream is disjoint
NATIVE_SHAPE = (56, 48, 36)  # held-out and sample scans: anisotropic voxels, stored LPS
NATIVE_SPACING = (3.0, 3.5, 4.5)


def native_grid() -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid of the held-out and sample scans: LPS-stored (x and y flipped), anisotropic, centred."""
    affine = np.diag([-NATIVE_SPACING[0], -NATIVE_SPACING[1], NATIVE_SPACING[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(NATIVE_SHAPE) - 1) / 2)
    return NATIVE_SHAPE, affine


def settings():
    """The demo config's preprocessing (configs/demo3d.toml)."""
    from hirescam_cli.modalities.volume_settings import VolumePreprocess

    return VolumePreprocess(spacing=(SPACING,) * 3, window=WINDOW, crop=(SIDE,) * 3)


def training_pool(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` phantoms of stream `seed` on the model's grid, windowed (float16), and their labels."""
    shape, affine = model_grid(SIDE, SPACING)
    volumes = torch.empty((count, 1, *shape), dtype=torch.float16)
    labels = torch.empty((count, len(CLASSES)))
    for i in range(count):
        phantom = draw(seed, i)
        volumes[i, 0] = window(torch.from_numpy(render(phantom, shape, affine)[0]))
        labels[i] = torch.from_numpy(phantom.labels)
    return volumes, labels


def held_out(count: int, seed: int = HELD_OUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh phantoms on the native grid, through the command line's own preprocessing, and their labels."""
    from hirescam_cli.modalities.volumes import prepare

    shape, affine = native_grid()
    inputs, labels = [], []
    for i in range(count):
        phantom = draw(seed, i)
        hu = render(phantom, shape, affine)[0]
        inputs.append(prepare(torch.from_numpy(hu), affine, settings())[0])
        labels.append(torch.from_numpy(phantom.labels))
    return torch.stack(inputs), torch.stack(labels)


def train(seed: int, count: int, epochs: int, batch_size: int, lr: float, resume: bool = False) -> VolumeNet:
    """VolumeNet trained multi-label with BCE on a pool of fresh phantoms: its features first under a
    global-average-pool head (quick to learn, the same wherever a lesion lies), then its flatten + linear
    head started as that pooled head's exact equivalent and fitted on the frozen features, so it reads
    each cell with weights of its own (from the shipped weights when `resume`)."""
    torch.manual_seed(seed)
    pool, targets = training_pool(seed, count)
    generator = torch.Generator().manual_seed(seed)
    net = load_volume_model() if resume else VolumeNet()
    pooled = nn.Linear(net.head[1].in_features // read_cells().numel(), net.head[1].out_features)
    model = nn.Sequential(net.features, nn.AdaptiveAvgPool3d(1), nn.Flatten(), pooled)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    per_epoch = count // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, lr, total_steps=epochs * per_epoch, pct_start=0.2
    )
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator)
        total = 0.0
        for batch in order[: per_epoch * batch_size].view(-1, batch_size):
            loss = loss_fn(model(pool[batch].float()), targets[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
        print(f"epoch {epoch + 1}/{epochs}: loss {total / per_epoch:.4f}", flush=True)
    net.eval()
    with torch.no_grad():
        net.head[1].weight.copy_(
            pooled.weight.repeat_interleave(read_cells().numel(), 1) / read_cells().numel()
        )
        net.head[1].bias.copy_(pooled.bias)
    return fit_head(net, pool, targets, torch.ones(read_cells().shape, dtype=torch.bool))


def fit_head(model: VolumeNet, pool, targets, cells: torch.Tensor, steps: int = 300, scale: float = 1.0):
    """The model with its linear head fitted (BCE, full batch) on its frozen features of `pool`, reading only
    the grid cells `cells` (its weights exactly zero on the others), started from its head times `scale`."""
    with torch.no_grad():
        features = torch.cat([model.features(pool[i : i + 100].float()) for i in range(0, len(pool), 100)])
    features = features.flatten(1)
    keep = cells.expand(features.shape[1] // cells.numel(), -1, -1, -1).flatten()
    start = model.head[1]
    head = nn.Linear(start.in_features, start.out_features)
    with torch.no_grad():
        head.weight.copy_(start.weight * keep * scale)
        head.bias.copy_(start.bias)
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(steps):
        loss = loss_fn(nn.functional.linear(features, head.weight * keep, head.bias), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        head.weight.mul_(keep)
    fitted = VolumeNet()
    fitted.load_state_dict(model.state_dict())
    fitted.head[1] = head
    return fitted.eval()


def fit_sparse_head(model: VolumeNet, count: int, seed: int) -> VolumeNet:
    """The model with a head refitted to read only the checkerboard cells (exactly zero on the others)."""
    pool, targets = training_pool(seed + 1, count)
    return fit_head(model, pool, targets, read_cells(), scale=2.0)


@torch.inference_mode()
def measure(model: nn.Module, count: int = 200) -> dict[str, dict[str, float]]:
    """Held-out average precision and F1 at probability 0.5 per class, on scans prepared as the CLI does."""
    inputs, labels = held_out(count)
    logits = torch.cat([model(inputs[i : i + 50]) for i in range(0, count, 50)])
    targets = labels.bool()
    return {
        name: {
            "ap": average_precision(logits[:, i], targets[:, i]),
            "f1": f1_score(logits[:, i] > 0, targets[:, i]),
        }
        for i, name in enumerate(CLASSES)
    }


def report(name: str, quality: dict[str, dict[str, float]]) -> None:
    mean_ap = float(np.nanmean([q["ap"] for q in quality.values()]))
    print(
        f"{name}: held-out mAP {mean_ap:.3f}; "
        + ", ".join(f"{c} AP {q['ap']:.3f} F1 {q['f1']:.3f}" for c, q in quality.items())
    )


def main() -> None:
    """Train, fit the sparse head, write both weights files and print their held-out quality."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--volumes", type=int, default=1600, help="training phantoms")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--measure-only", action="store_true", help="measure the shipped weights")
    parser.add_argument("--resume", action="store_true", help="train on from the shipped weights")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.measure_only:
        from hirescam_cli.demo.volume_net import load_sparse_volume_model

        report("volume_net", measure(load_volume_model()))
        report("volume_sparse_net", measure(load_sparse_volume_model()))
        return
    model = train(args.seed, args.volumes, args.epochs, args.batch_size, args.lr, args.resume)
    save_atomic(model.state_dict(), WEIGHTS_PATH)
    sparse = fit_sparse_head(model, 1200, args.seed)
    save_atomic(sparse.state_dict(), SPARSE_WEIGHTS_PATH)
    print(f"wrote {WEIGHTS_PATH.name} and {SPARSE_WEIGHTS_PATH.name} in {time.perf_counter() - start:.0f} s")
    report("volume_net", measure(model))
    report("volume_sparse_net", measure(sparse))


if __name__ == "__main__":
    main()
