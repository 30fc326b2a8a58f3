"""Measure the demo model on fresh held-out shapes: python -m hirescam_cli.demo.quality."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from hirescam_cli.demo.net import load_demo_model, preprocess
from hirescam_cli.demo.synthetic import CLASSES, ShapesDataset

HELD_OUT_SEED = 1_000_003  # training uses small seeds (default 0); this stream is disjoint


@dataclass(frozen=True)
class Quality:
    """Held-out quality: macro mean average precision, per-class AP and F1 at probability 0.5."""

    mean_ap: float
    ap: dict[str, float]
    f1: dict[str, float]
    n: int


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Area under the precision-recall step curve (tied scores form one threshold); NaN without positives."""
    order = torch.argsort(scores, descending=True, stable=True)
    ranked, hits = scores[order], targets[order].double()
    true_positives = hits.cumsum(0)
    if true_positives[-1] == 0:
        return float("nan")
    last_of_tie = torch.ones_like(ranked, dtype=torch.bool)
    last_of_tie[:-1] = ranked[1:] != ranked[:-1]
    seen = torch.arange(1, len(ranked) + 1, dtype=torch.float64)[last_of_tie]
    true_positives = true_positives[last_of_tie]
    recall_gain = torch.diff(true_positives, prepend=true_positives.new_zeros(1))
    return float((true_positives / seen * recall_gain).sum() / true_positives[-1])


def f1_score(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    """F1 of boolean predictions against boolean targets; NaN when both are empty."""
    true_positives = (predicted & targets).sum().item()
    total = predicted.sum().item() + targets.sum().item()
    return 2 * true_positives / total if total else float("nan")


@torch.inference_mode()
def predict(
    model: nn.Module, n: int, seed: int, batch_size: int = 100, workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, classes) of `model` on samples 0..n-1 of stream `seed`, with their labels."""
    loader = DataLoader(ShapesDataset(seed, n, preprocess), batch_size=batch_size, num_workers=workers)
    logits, labels = zip(*((model(x), y) for x, y in loader), strict=True)
    return torch.cat(logits), torch.cat(labels)


def measure(
    model: nn.Module | None = None, n: int = 1000, seed: int = HELD_OUT_SEED, workers: int = 0
) -> Quality:
    """Quality of `model` (default: the shipped one) on n fresh images of stream `seed`."""
    model = load_demo_model() if model is None else model.eval()
    logits, labels = predict(model, n, seed, workers=workers)
    targets = labels.bool()
    ap = {c: average_precision(logits[:, i], targets[:, i]) for i, c in enumerate(CLASSES)}
    f1 = {c: f1_score(logits[:, i] > 0, targets[:, i]) for i, c in enumerate(CLASSES)}
    mean_ap = float(torch.tensor(list(ap.values())).nanmean())
    return Quality(mean_ap, ap, f1, n)


def main() -> None:
    """Print mAP and per-class AP / F1 of the shipped model on held-out images."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="held-out images to generate")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="held-out data stream")
    parser.add_argument("--workers", type=int, default=2, help="data generation processes")
    args = parser.parse_args()
    quality = measure(n=args.n, seed=args.seed, workers=args.workers)
    print(f"held-out images: {quality.n} (seed {args.seed})")
    print(f"mAP (macro): {quality.mean_ap:.4f}")
    print(f"{'class':<10} {'AP':>7} {'F1@0.5':>7}")
    for name in CLASSES:
        print(f"{name:<10} {quality.ap[name]:>7.4f} {quality.f1[name]:>7.4f}")


if __name__ == "__main__":
    main()
