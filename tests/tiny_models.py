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
