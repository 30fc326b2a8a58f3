"""Turning raw maps into pictures: normalisation, colormaps, overlays on the original image."""

import torch
from torch import Tensor


def normalize(maps: Tensor) -> Tensor:
    """ReLU then min-max to [0, 1] over the last two axes; a map with no positive part is 0."""
    positive = maps.clamp_min(0)
    low = positive.amin((-2, -1), keepdim=True)
    high = positive.amax((-2, -1), keepdim=True)
    span = high - low
    return torch.where(span > 0, (positive - low) / torch.where(span > 0, span, 1.0), 0.0)


def normalize_signed(maps: Tensor) -> Tensor:
    """Scale to [-1, 1] by the largest magnitude, keeping zero at zero; an all-zero map stays 0."""
    peak = maps.abs().amax((-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / torch.where(peak > 0, peak, 1.0), 0.0)
