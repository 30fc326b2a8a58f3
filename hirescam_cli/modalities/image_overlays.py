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
        tables = [render.colormap_table(config.render.colormap, device)]  # the palette's colormap 0
        if self.signed:  # and 1, HiResCAM's signed one
            tables.append(render.colormap_table(config.render.signed_colormap, device))
        self.tables = torch.stack(tables)

    def parts(self, result: Explanation, batch) -> Iterator[Part]:
        """The overlays of a batch (a batches.Batch) in order, in parts of at most PART_PIXELS pixels (one
        picture at least), each drawn in bands of rows of at most RENDER_PIXELS pixels. An image's picture
        is dropped from the batch's views once its overlays are drawn, so a batch of huge photos is not held
        whole."""
        targets = result.classes.shape[1]
        positions = []
        for name in self.methods:
            signed = self.signed and name == "hirescam"
            normalised = (render.normalize_signed if signed else render.normalize)(result.maps[name])
            positions.append(render.palette_positions(normalised, signed, table=int(signed)))
        maps = torch.cat(positions, 1)  # (B, methods x T, h, w): channel c is target c % T of method c // T
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
            self._draw(maps, rows, channels, boxes, images, canvas)
            yield self.handover.part(rows, channels, targets, canvas, sizes[rows.start : rows.stop])

    def _draw(self, maps, rows, channels, boxes, images, canvas) -> None:
        """Draw `channels` of the maps' palette positions (B, methods x targets, h, w) for images `rows` into
        canvas (n, len(channels), H, W, 3), in bands of rows, all channels at once."""
        maps = maps[rows.start : rows.stop, channels.start : channels.stop]
        boxes = boxes[rows.start : rows.stop]
        height, width = images.shape[2:]
        band = max(1, RENDER_PIXELS // (len(rows) * len(channels) * width))
        for top in range(0, height, band):
            lines = slice(top, min(height, top + band))
            positions = register(maps, boxes, range(lines.start, lines.stop), width)
            canvas[:, :, lines] = render.overlay(positions, images[:, :, lines], self.tables, self.alpha)


def _coordinates(boxes: Tensor, rows: range, width: int) -> tuple[Tensor, Tensor]:
    """Where the centres of `rows` and of `width` columns of picture pixels lie in each crop box (N, 4), in
    the map's [-1, 1] (grid_sample's convention): down (N, len(rows)) and across (N, width)."""
    x0, y0, x1, y1 = boxes.to(torch.float32).unbind(1)
    ys = torch.arange(rows.start, rows.stop, device=boxes.device, dtype=torch.float32)
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32)
    down = 2 * (ys[None] + 0.5 - y0[:, None]) / (y1 - y0)[:, None] - 1
    across = 2 * (xs[None] + 0.5 - x0[:, None]) / (x1 - x0)[:, None] - 1
    return down, across


def _weights(at: Tensor, cells: int) -> Tensor:
    """The bilinear weights (N, P, cells) of a map's cell centres at coordinates `at` (N, P) in [-1, 1],
    clamped to the border cells (grid_sample's bilinear, align_corners False, border padding), and zero
    outside [-1, 1]."""
    where = (((at + 1) * cells - 1) / 2).clamp_(0, cells - 1)
    below = where.floor()
    part = (where - below).unsqueeze(-1)
    below = below.long().unsqueeze(-1)
    weights = torch.zeros((*at.shape, cells), device=at.device)
    weights.scatter_add_(-1, below, 1 - part).scatter_add_(-1, (below + 1).clamp_(max=cells - 1), part)
    return weights.mul_((at.abs() <= 1).unsqueeze(-1))


def register(maps: Tensor, boxes: Tensor, rows: range, width: int) -> Tensor:
    """Resample maps (N, C, h, w) onto `rows` of (N, C, H, width) picture pixels through each crop box.

    `boxes` (N, 4) holds (x0, y0, x1, y1): the region of the picture, in its pixels, that the model input
    (and so each of the image's C maps) covers. Bilinear between cell centres inside the box (clamped to
    the border cells), 0 outside it (see `covered`): two small batched matrix products, down then across.
    Every pixel is a sum over the same cells in the same order, so any cut into rows, channels or images
    gives the same bits.
    """
    down, across = _coordinates(boxes.to(maps.device), rows, width)
    h, w = maps.shape[2:]
    return _weights(down, h)[:, None] @ maps.float() @ _weights(across, w).transpose(1, 2)[:, None]


def covered(boxes: Tensor, rows: range, width: int) -> Tensor:
    """Which of `rows` x `width` picture pixels (N, len(rows), width) each crop box (N, 4) covers."""
    down, across = _coordinates(boxes, rows, width)
    return (down.abs() <= 1)[:, :, None] & (across.abs() <= 1)[:, None, :]
