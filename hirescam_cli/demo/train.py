"""Train the demo model on freshly generated shapes: python -m hirescam_cli.demo.train."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from hirescam_cli.demo.net import WEIGHTS_PATH, DemoNet, normalise, resize_input
from hirescam_cli.demo.synthetic import ShapesDataset


def render_pool(seed: int, count: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate `count` samples of stream `seed` as uint8 model-size images and multi-hot labels."""
    dataset = ShapesDataset(seed, count, resize_input)
    loader = DataLoader(dataset, batch_size=128, num_workers=workers)
    images, labels = [], []
    for x, y in tqdm(loader, desc="generating", unit="batch"):
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and transposes per image: every class is closed under these symmetries."""
    flips = torch.rand(3, len(images), generator=generator) < 0.5
    images = torch.where(flips[0, :, None, None, None], images.flip(-1), images)
    images = torch.where(flips[1, :, None, None, None], images.flip(-2), images)
    return torch.where(flips[2, :, None, None, None], images.transpose(-1, -2), images)


def train(seed: int, images: int, epochs: int, batch_size: int, lr: float, workers: int) -> nn.Module:
    """Train DemoNet multi-label with BCE on a generated pool with symmetry augmentation."""
    torch.manual_seed(seed)
    pool, targets = render_pool(seed, images, workers)
    generator = torch.Generator().manual_seed(seed)
    model = DemoNet().to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    per_epoch = images // batch_size
    steps = epochs * per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    with tqdm(total=steps, desc="training", unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(images, generator=generator)
            for batch in order[: per_epoch * batch_size].view(-1, batch_size):
                x = normalise(augment(pool[batch], generator))
                loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)), targets[batch])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.to(memory_format=torch.contiguous_format).eval()


def save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state_dict via a temporary file and os.replace, so no half-written file remains."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def main() -> None:
    """Parse arguments, train, and write the weights."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="weights file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data stream, init and order")
    parser.add_argument("--images", type=int, default=10000, help="generated training images")
    parser.add_argument("--epochs", type=int, default=6, help="passes over the images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--workers", type=int, default=2, help="data generation processes")
    args = parser.parse_args()
    start = time.perf_counter()
    model = train(args.seed, args.images, args.epochs, args.batch_size, args.lr, args.workers)
    save_atomic(model.state_dict(), args.out)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
