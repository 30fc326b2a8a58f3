"""Turning raw maps into pictures: normalisation, colormaps, overlays on the original image."""

import matplotlib
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


UNEXPLAINED = 128  # grey laid over the parts of the image the model never saw (cut by a crop)
ALPHA_BITS = 7  # alpha is applied in 1/128 steps, in int16 arithmetic (255 * 128 fits)


def colormap_table(name: str, device: torch.device | str = "cpu") -> Tensor:
    """The 256-entry RGB lookup table of a matplotlib colormap, as uint8 (256, 3)."""
    table = matplotlib.colormaps[name](torch.linspace(0, 1, 256).numpy())[:, :3]
    return torch.as_tensor(table * 255, dtype=torch.float32).round().to(torch.uint8).to(device)


def pad_images(images: list[Tensor], device: torch.device | str) -> Tensor:
    """Originals (3, H_i, W_i) uint8 into one zero-padded (N, 3, H_max, W_max) uint8 batch."""
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = torch.zeros((len(images), 3, height, width), dtype=torch.uint8, device=device)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[1], : image.shape[2]] = image.to(device, non_blocking=True)
    return batch


def register(maps: Tensor, boxes: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Resample maps (P, h, w) onto (P, height, width) image pixels through each crop box.

    `boxes` (P, 4) holds (x0, y0, x1, y1): the region of the original image, in its pixels,
    that the model input (and so the map) covers. Returns the resampled maps and a mask of the
    pixels inside the box; bilinear inside, nothing outside.
    """
    boxes = boxes.to(maps.device, torch.float32)
    x0, y0, x1, y1 = boxes.unbind(1)
    xs = torch.arange(width, device=maps.device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=maps.device, dtype=torch.float32) + 0.5
    gx = 2 * (xs[None] - x0[:, None]) / (x1 - x0)[:, None] - 1  # (P, W) in the map's [-1, 1]
    gy = 2 * (ys[None] - y0[:, None]) / (y1 - y0)[:, None] - 1  # (P, H)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    resampled = torch.nn.functional.grid_sample(
        maps[:, None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )[:, 0]
    inside = (gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None]
    return resampled, inside


def overlay(
    values: Tensor, images: Tensor, inside: Tensor, table: Tensor, alpha: float, signed: bool
) -> Tensor:
    """Blend colour-mapped values (P, H, W) over images (P, 3, H, W) uint8 -> (P, H, W, 3) uint8.

    Values lie in [0, 1], or in [-1, 1] when `signed` (zero at the colormap's centre); pixels
    outside `inside` get grey instead of a colour.
    """
    index = ((values + 1) / 2 if signed else values).clamp(0, 1).mul(255).round().long()
    heat = torch.where(inside[..., None], table[index], UNEXPLAINED).to(torch.int16)
    steps = 1 << ALPHA_BITS
    weight = round(alpha * steps)
    image = images.permute(0, 2, 3, 1).to(torch.int16)
    blended = (image * (steps - weight) + heat * weight + steps // 2) >> ALPHA_BITS
    return blended.to(torch.uint8)
