"""Overlays of 2-D maps on their pictures: registered through the crop box, colour-mapped and blended,
batched on the device, in parts of bounded size (a batch of huge photos is never held whole)."""

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from .. import render
from ..config import Config
from ..engine.explainer import Explanation
from ..formats import PictureFormat
from ..render import Part

PART_PIXELS = 2**24  # overlay pixels handed to the writers at once (48 MiB; one 4096 x 4096 picture)
RENDER_PIXELS = 2**21  # overlay pixels drawn at once on the device (about 30 bytes each while drawn)


class Renderer:
    """Raw maps of a batch -> overlays on the images' overlay pictures, batched on the device, in parts."""

    def __init__(self, config: Config, device: torch.device):
        self.device = device
        output = config.output
        self.handover = render.Handover(PictureFormat(output.format, output.quality, output.png), device)
        self.methods = config.explain.methods
        self.alpha = config.render.alpha
        self.signed = config.render.signed
        self.table = render.colormap_table(config.render.colormap, device)
        self.signed_table = render.colormap_table(config.render.signed_colormap, device)

    def parts(self, result: Explanation, batch) -> Iterator[Part]:
        """The overlays of a batch (a batches.Batch) in order, in parts of at most PART_PIXELS pixels (one
        picture at least), each drawn in bands of rows of at most RENDER_PIXELS pixels. An image's picture
        is dropped from the batch's views once its overlays are drawn, so a batch of huge photos is not held
        whole."""
        targets = result.classes.shape[1]
        normalised = []
        for name in self.methods:
            signed = self.signed and name == "hirescam"
            normalised.append((render.normalize_signed if signed else render.normalize)(result.maps[name]))
        maps = torch.cat(normalised, 1)  # (B, methods x T, h, w): channel c is target c % T of method c // T
        views = batch.views
        sizes = [tuple(image.shape[1:]) for image in views.pictures]
        scale = [(w / W, h / H) for (h, w), (H, W) in zip(sizes, views.sizes, strict=True)]
        boxes = (views.boxes * torch.tensor(scale, dtype=torch.float64).repeat(1, 2)).to(self.device)
        everything, drawn_on = len(self.methods) * targets, None
        for rows, channels in render.plan_parts(sizes, everything, PART_PIXELS):
            own = views.pictures[rows.start : rows.stop]
            if channels.stop == everything:  # the images' last part
                views.pictures[rows.start : rows.stop] = [None] * len(rows)
            if not channels:  # no image of the batch has a target
                yield Part(rows, channels, targets, np.zeros((len(rows), 0, 0, 0, 3), np.uint8))
                continue
            if rows != drawn_on:  # an image cut into parts goes to the device once
                images, drawn_on = render.pad_images(own, self.device), rows
            size = (len(rows), len(channels), *images.shape[2:], 3)
            canvas = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._draw(maps, targets, rows, channels, boxes, images, canvas)
            yield self.handover.part(rows, channels, targets, canvas, sizes[rows.start : rows.stop])

    def _draw(self, maps, targets, rows, channels, boxes, images, canvas) -> None:
        """Draw `channels` of the normalised maps (B, methods x targets, h, w) for images `rows` into canvas
        (n, len(channels), H, W, 3), in bands of rows: each band's pixels are registered once for all the
        channels, then coloured method by method."""
        maps = maps[rows.start : rows.stop, channels.start : channels.stop]
        boxes = boxes[rows.start : rows.stop]
        spans = []  # (method, its channels' slice of the part)
        for method in range(channels.start // targets, (channels.stop - 1) // targets + 1):
            low, high = max(channels.start, method * targets), min(channels.stop, (method + 1) * targets)
            spans.append((self.methods[method], slice(low - channels.start, high - channels.start)))
        height, width = images.shape[2:]
        band = max(1, RENDER_PIXELS // (len(rows) * len(channels) * width))
        for top in range(0, height, band):
            lines = range(top, min(height, top + band))
            resampled, inside = register(maps, boxes, lines, width)
            under = images[:, :, lines.start : lines.stop]
            for name, span in spans:
                signed = self.signed and name == "hirescam"
                table = self.signed_table if signed else self.table
                drawn = render.overlay(resampled[:, span], under, inside, table, self.alpha, signed)
                canvas[:, span, lines.start : lines.stop] = drawn


def register(maps: Tensor, boxes: Tensor, rows: range, width: int) -> tuple[Tensor, Tensor]:
    """Resample maps (N, C, h, w) onto `rows` of (N, C, H, width) picture pixels through each crop box.

    `boxes` (N, 4) holds (x0, y0, x1, y1): the region of the picture, in its pixels, that the model input
    (and so each of the image's C maps) covers. Returns the resampled maps (N, C, len(rows), width) and a
    mask (N, len(rows), width) of the pixels inside the box; bilinear inside, nothing outside. Every pixel is
    computed on its own, so any cut into rows, channels or images gives the same bits.
    """
    boxes = boxes.to(maps.device, torch.float32)
    x0, y0, x1, y1 = boxes.unbind(1)
    xs = torch.arange(width, device=maps.device, dtype=torch.float32) + 0.5
    ys = torch.arange(rows.start, rows.stop, device=maps.device, dtype=torch.float32) + 0.5
    gx = 2 * (xs[None] - x0[:, None]) / (x1 - x0)[:, None] - 1  # (N, W) in the map's [-1, 1]
    gy = 2 * (ys[None] - y0[:, None]) / (y1 - y0)[:, None] - 1  # (N, rows)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    resampled = torch.nn.functional.grid_sample(
        maps.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    inside = (gx.abs() <= 1)[:, None, :] & (gy.abs() <= 1)[:, :, None]
    return resampled, inside
