"""Turning raw maps into pictures, whatever the modality: normalisation, colormaps, blending, the cut
of a batch's pictures into parts of bounded size, and their handover to the sink (what the modalities'
renderers yield): pixels on the host, or file bytes encoded on the device where it can (JPEG on CUDA)."""

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np
import torch
import torchvision
from torch import Tensor

from .formats import PictureFormat


def _grid_axes(maps: Tensor) -> tuple[int, ...]:
    """The axes of a (B, T, *grid) map's grid, whatever its rank."""
    return tuple(range(2, maps.ndim))


def normalize(maps: Tensor) -> Tensor:
    """ReLU then min-max to [0, 1] over the grid of (B, T, *grid) maps; a map with no positive part is 0."""
    positive = maps.clamp_min(0)
    low = positive.amin(_grid_axes(maps), keepdim=True)
    high = positive.amax(_grid_axes(maps), keepdim=True)
    span = high - low
    return torch.where(span > 0, (positive - low) / torch.where(span > 0, span, 1.0), 0.0)


def normalize_signed(maps: Tensor) -> Tensor:
    """Scale (B, T, *grid) maps to [-1, 1] by the largest magnitude, keeping zero at zero; an all-zero map
    stays 0."""
    peak = maps.abs().amax(_grid_axes(maps), keepdim=True)
    return torch.where(peak > 0, maps / torch.where(peak > 0, peak, 1.0), 0.0)


@dataclass(frozen=True)
class Part:
    """Some of a batch's pictures (see ``plan_parts``): channel c of an input is target c % targets of method
    c // targets (methods in config order). `files` holds the modality's other files of these maps (its
    `map_files`): (row of the batch, channel) -> {summary field: payload}, a payload being a picklable
    object with `encode() -> bytes` (run by a writer) and `nbytes` (what it holds until then)."""

    rows: range  # the inputs, rows of the batch
    channels: range
    targets: int  # T, the batch's targets per input
    # uint8 (len(rows), len(channels), H, W, 3) on the host, padded to the largest; or, encoded on the
    # device, pictures[i][c] is the file of row i's channel c (bytes)
    pictures: np.ndarray | list[list[bytes]]
    files: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)


DeviceEncoder = Callable[[Tensor, Sequence[tuple[int, int]]], list[list[bytes]]]


def device_encoder(picture_format: PictureFormat, device: torch.device) -> DeviceEncoder | None:
    """What encodes the format's pictures on the device itself (JPEG on CUDA: nvJPEG through torchvision),
    else None: the writers encode them on the host."""
    if picture_format.name != "jpeg" or device.type != "cuda":
        return None
    return lambda canvas, sizes: encode_jpeg(canvas, sizes, picture_format.quality)


def encode_jpeg(canvas: Tensor, sizes: Sequence[tuple[int, int]], quality: int) -> list[list[bytes]]:
    """JPEG files of a part's pictures, uint8 (n, k, H, W, 3) padded to the largest, each cut to its image's
    (h, w) first: one batched encode where the canvas is (on CUDA, nvJPEG), and one copy of the bytes."""
    n, k = canvas.shape[:2]
    pictures = [
        canvas[i, c, :h, :w].permute(2, 0, 1).contiguous() for i, (h, w) in enumerate(sizes) for c in range(k)
    ]
    files = torchvision.io.encode_jpeg(pictures, quality=quality) if pictures else []
    lengths = [int(f.numel()) for f in files]
    data = torch.cat(files).cpu().numpy().tobytes() if files else b""
    flat = [data[start:end] for start, end in itertools.pairwise(np.cumsum([0, *lengths]))]
    return [flat[i * k : (i + 1) * k] for i in range(n)]


class Handover:
    """Hands a part's pictures, drawn on the device, to the sink: encoded there where the device can,
    else copied to the host as pixels for the writers to encode."""

    def __init__(
        self, picture_format: PictureFormat, device: torch.device, encode: DeviceEncoder | None = None
    ):
        self.device = device
        self.encode = encode or device_encoder(picture_format, device)

    def part(self, rows: range, channels: range, targets: int, canvas: Tensor, sizes) -> Part:
        """The Part of `canvas`, uint8 (len(rows), len(channels), H, W, 3); image i's pictures: sizes[i]."""
        if self.encode is not None:
            return Part(rows, channels, targets, self.encode(canvas, sizes))
        pictures = to_host(canvas)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return Part(rows, channels, targets, pictures.numpy())


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor copied to host memory: page-locked from CUDA (several times faster); call
    `torch.cuda.current_stream().synchronize()` before reading it."""
    if tensor.device.type != "cuda":
        return tensor.cpu()
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)


UNEXPLAINED = 128  # grey laid over the parts of the image the model never saw (cut by a crop)
ALPHA_BITS = 7  # alpha is applied in 1/128 steps


def colormap_table(name: str, device: torch.device | str = "cpu") -> Tensor:
    """The 256-entry RGB lookup table of a matplotlib colormap, as uint8 (256, 3)."""
    table = matplotlib.colormaps[name](torch.linspace(0, 1, 256).numpy())[:, :3]
    return torch.as_tensor(table * 255, dtype=torch.float32).round().to(torch.uint8).to(device)


def palette_positions(values: Tensor, signed: bool, table: int = 0) -> Tensor:
    """Values in [0, 1], or in [-1, 1] when `signed` (zero at the colormap's centre), as float positions on
    the overlay's palette (see `overlay`), on its colormap number `table`: the integer part is 1 + 256 x
    table + the colormap's entry (rounded), 0 being the grey of what the model never saw. Affine in the
    values, so it commutes with bilinear registration: positions are computed on the map's grid, then
    registered, and come out 0 wherever nothing is registered. NaN -> the colormap's first entry."""
    values = values.nan_to_num(0.0)
    if signed:
        values = (values + 1) / 2
    return values.clamp(0, 1) * 255 + (1.5 + 256 * table)


def overlay(positions: Tensor, images: Tensor, tables: Tensor, alpha: float) -> Tensor:
    """Blend the colours at palette positions (N, C, H, W) (see `palette_positions`) over images
    (N, 3, H, W) uint8 -> (N, C, H, W, 3) uint8; the palette: the grey, then the colormaps `tables`
    (K, 256, 3) uint8.

    A pixel is the image's share (1 - alpha), rounded down, plus the colour's share (alpha), rounded to
    nearest: never above 255, so both are added as bytes, and the palette is read once a pixel. Within one
    step of the blend rounded once.
    """
    steps = 1 << ALPHA_BITS
    weight = round(alpha * steps)
    grey = torch.full((1, 3), UNEXPLAINED, dtype=tables.dtype, device=tables.device)
    palette = torch.cat([grey, tables.flatten(0, 1)]).to(torch.int16).mul_(weight).add_(steps // 2)
    kept = images.permute(0, 2, 3, 1).to(torch.int16).mul_(steps - weight).bitwise_right_shift_(ALPHA_BITS)
    index = positions.to(torch.int32).flatten()  # truncation: positions are never negative
    blended = (palette >> ALPHA_BITS).to(torch.uint8).index_select(0, index).view(*positions.shape, 3)
    return blended.add_(kept.to(torch.uint8).contiguous()[:, None])  # no copy when channels last


def pad_images(images: list[Tensor], device: torch.device | str) -> Tensor:
    """Pictures (3, H_i, W_i) uint8 into one zero-padded (N, 3, H_max, W_max) uint8 batch on `device`, laid
    out channels last (as the overlays are blended)."""
    if len(images) == 1:
        return images[0].to(device, non_blocking=True)[None]  # no copy on the CPU
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = torch.zeros((len(images), height, width, 3), dtype=torch.uint8, device=device)
    for i, image in enumerate(images):
        batch[i, : image.shape[1], : image.shape[2]] = image.to(device, non_blocking=True).permute(1, 2, 0)
    return batch.permute(0, 3, 1, 2)


def plan_parts(sizes: Sequence[tuple[int, int]], channels: int, budget: int) -> list[tuple[range, range]]:
    """Cut a batch's pictures into parts of at most `budget` pixels, in order: (images, channels) ranges.

    Image i has `channels` pictures of sizes[i] = (h, w). A part is a run of consecutive images with all their
    channels, counted padded to the largest of them; an image whose channels alone exceed the budget is cut
    into runs of its channels (one picture at least, whatever its size).
    """
    parts: list[tuple[range, range]] = []
    start, height, width = 0, 0, 0
    for i, (h, w) in enumerate(sizes):
        height, width = max(height, h), max(width, w)
        if i > start and (i + 1 - start) * channels * height * width > budget:
            parts.append((range(start, i), range(channels)))
            start, height, width = i, h, w
        if channels * h * w > budget:  # alone in its part (the test above closed the run before it)
            step = max(1, budget // (h * w))
            parts += [(range(i, i + 1), range(c, min(c + step, channels))) for c in range(0, channels, step)]
            start, height, width = i + 1, 0, 0
    if start < len(sizes):
        parts.append((range(start, len(sizes)), range(channels)))
    return parts
