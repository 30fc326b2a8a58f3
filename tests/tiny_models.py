"""Tiny models that test configs name as `factory = "tiny_models:..."`."""

import torch
from torch import nn


def tiny_net() -> nn.Module:
    """Conv features to an 8x8 map (for 16x16 inputs), then flatten + linear: HiResCAM's guarantee holds."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


def corner_net() -> nn.Module:
    """Like tiny_net, but every class reads only the top-left position of the map."""
    model = tiny_net()
    with torch.no_grad():
        model[5].weight.view(3, 4, 8, 8)[:, :, 1:, :] = 0
        model[5].weight.view(3, 4, 8, 8)[:, :, :, 1:] = 0
        model[5].weight.abs_()
        model[2].bias.fill_(1.0)
    return model


class _Slow(nn.Module):
    """Wraps a model and sleeps in every forward, so a test can interrupt a run midway."""

    def __init__(self, model: nn.Module, seconds: float):
        super().__init__()
        self.model, self.seconds = model, seconds

    def forward(self, x):
        import time

        time.sleep(self.seconds)
        return self.model(x)


def slow_net() -> nn.Module:
    """tiny_net that takes at least 0.2 s per batch."""
    return _Slow(tiny_net(), 0.2)


def gap_net() -> nn.Module:
    """tiny_net's features, then global average pooling + linear: HiResCAM == Grad-CAM at "3"."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
