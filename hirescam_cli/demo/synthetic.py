"""Deterministic synthetic shapes: multi-label RGB images with a ground-truth mask per class.

Every image is reproducible from (seed, index) alone. The data is built so that a model can
be right for the wrong reasons: each class prefers a colour, that colour also appears in
non-class clutter (rings, blobs, striped patches, lines, dots), and some classes usually come
with another (a cross mostly comes with a circle, a star with a triangle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

PALETTE = np.array(
    [
        (225, 45, 40),  # red
        (40, 85, 225),  # blue
        (45, 185, 65),  # green
        (235, 215, 45),  # yellow
        (205, 55, 205),  # magenta
        (45, 205, 215),  # cyan
        (245, 135, 35),  # orange
        (240, 240, 240),  # white
    ],
    dtype=np.float32,
)
PREFERRED_COLOUR: dict[str, int] = {"circle": 0, "square": 1, "triangle": 2, "star": 3, "cross": 4}
PARTNERS: dict[str, tuple[str, float]] = {"cross": ("circle", 0.75), "star": ("triangle", 0.6)}
MIN_SIDE, MAX_SIDE = 128, 224

SDF = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Sample:
    """One generated image, its multi-hot labels over CLASSES and a mask per present class."""

    image: Image.Image
    labels: torch.Tensor
    masks: dict[str, np.ndarray]

    @property
    def names(self) -> list[str]:
        """Names of the classes present, in CLASSES order."""
        return [name for name in CLASSES if name in self.masks]


def _circle_sdf(radius: float) -> SDF:
    """Signed distance to a disc centred on the origin."""
    return lambda dx, dy: np.hypot(dx, dy) - radius


def _ring_sdf(radius: float, thickness: float) -> SDF:
    """Signed distance to an annulus (a hollow circle)."""
    return lambda dx, dy: np.abs(np.hypot(dx, dy) - radius) - thickness / 2


def _segment_sdf(ax: float, ay: float, bx: float, by: float, thickness: float) -> SDF:
    """Signed distance to a thick line segment from a to b."""
    ex, ey = bx - ax, by - ay
    length2 = max(ex * ex + ey * ey, 1e-6)

    def sdf(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        wx, wy = dx - ax, dy - ay
        t = np.clip((wx * ex + wy * ey) / length2, 0.0, 1.0)
        return np.hypot(wx - ex * t, wy - ey * t) - thickness / 2

    return sdf


def _blob_sdf(radius: float, amplitudes: np.ndarray, phases: np.ndarray) -> SDF:
    """Approximate signed distance to an irregular star-convex blob."""
    orders = np.arange(2, 2 + len(amplitudes), dtype=np.float32)

    def sdf(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        theta = np.arctan2(dy, dx)[..., None]
        wobble = (amplitudes * np.cos(orders * theta + phases)).sum(-1)
        return np.hypot(dx, dy) - radius * (1 + wobble)

    return sdf


def _polygon_sdf(vertices: np.ndarray) -> SDF:
    """Signed distance to a simple polygon (vertices (V, 2) in order, any convexity)."""
    ax, ay = vertices[:, 0], vertices[:, 1]
    bx, by = np.roll(ax, -1), np.roll(ay, -1)
    ex, ey = bx - ax, by - ay
    length2 = ex * ex + ey * ey
    safe_ey = np.where(ey == 0, 1.0, ey)

    def sdf(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        px, py = dx[..., None], dy[..., None]
        wx, wy = px - ax, py - ay
        t = np.clip((wx * ex + wy * ey) / length2, 0.0, 1.0)
        distance = np.sqrt(((wx - ex * t) ** 2 + (wy - ey * t) ** 2).min(-1))
        crossing = ((ay > py) != (by > py)) & (px < ex * (py - ay) / safe_ey + ax)
        inside = crossing.sum(-1) % 2 == 1
        return np.where(inside, -distance, distance)

    return sdf


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """Rotate (V, 2) points about the origin."""
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float32)


def _star_vertices(points: int, inner: float) -> np.ndarray:
    """Unit star polygon with alternating outer (1) and inner radii."""
    angles = np.arange(2 * points) * np.pi / points - np.pi / 2
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1).astype(np.float32)


def _cross_vertices(half_width: float, arm: float) -> np.ndarray:
    """Plus-shaped polygon with arms of the given length and half-width."""
    w, a = half_width, arm
    return np.array(
        [
            (w, a),
            (w, w),
            (a, w),
            (a, -w),
            (w, -w),
            (w, -a),
            (-w, -a),
            (-w, -w),
            (-a, -w),
            (-a, w),
            (-w, w),
            (-w, a),
        ],
        dtype=np.float32,
    )


def _class_sdf(name: str, radius: float, rng: np.random.Generator) -> SDF:
    """Signed distance of a randomly rotated object of class `name` within `radius`."""
    angle = rng.uniform(0, 2 * np.pi)
    if name == "circle":
        return _circle_sdf(0.85 * radius)
    if name == "square":
        unit = _star_vertices(4, 1.0)[::2]
    elif name == "triangle":
        unit = _star_vertices(3, 0.5)[::2]
    elif name == "star":
        unit = _star_vertices(5, rng.uniform(0.38, 0.5))
    elif name == "cross":
        unit = _cross_vertices(rng.uniform(0.22, 0.3), 0.92)
    else:
        raise ValueError(f"unknown class {name!r}")
    return _polygon_sdf(_rotate(unit, angle) * radius)


def _paint(
    canvas: np.ndarray,
    sdf: SDF,
    centre: tuple[float, float],
    extent: float,
    colour: np.ndarray,
    opacity: float = 1.0,
    shading: tuple[float, float] = (0.0, 0.0),
    stripe_period: float = 0.0,
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Alpha-blend an anti-aliased shape onto the canvas; return its box and inside mask."""
    h, w, _ = canvas.shape
    cx, cy = centre
    x0, x1 = max(int(cx - extent) - 1, 0), min(int(cx + extent) + 2, w)
    y0, y1 = max(int(cy - extent) - 1, 0), min(int(cy + extent) + 2, h)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    distance = np.broadcast_to(sdf(dx, dy), (y1 - y0, x1 - x0))
    alpha = np.clip(0.5 - distance, 0.0, 1.0) * opacity
    if stripe_period:
        alpha = alpha * (0.5 + 0.5 * np.sin((dx + dy) * (2 * np.pi / stripe_period)))
    light = 1 + (shading[0] * dx + shading[1] * dy) / max(extent, 1.0)
    region = canvas[y0:y1, x0:x1]
    region += alpha[..., None] * (colour * light[..., None] - region)
    return (slice(y0, y1), slice(x0, x1)), distance <= 0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A muted, textured background: smooth waves, stripes or a checker, plus a light gradient."""
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    base = (rng.uniform(55, 165) + rng.uniform(-25, 25, 3)).astype(np.float32)
    kind = rng.integers(3)
    texture = np.zeros((h, w), dtype=np.float32)
    if kind == 0:
        for _ in range(3):
            angle, period = rng.uniform(0, 2 * np.pi), rng.uniform(30, 150)
            phase = rng.uniform(0, 2 * np.pi)
            wave = (np.cos(angle) * xx + np.sin(angle) * yy) * (2 * np.pi / period) + phase
            texture += rng.uniform(6, 16) * np.sin(wave)
    elif kind == 1:
        angle, period = rng.uniform(0, 2 * np.pi), rng.uniform(5, 16)
        wave = (np.cos(angle) * xx + np.sin(angle) * yy) * (2 * np.pi / period)
        texture += rng.uniform(8, 22) * np.sin(wave)
    else:
        period = rng.uniform(8, 22)
        texture += rng.uniform(8, 22) * np.sign(
            np.sin(xx * (2 * np.pi / period)) * np.sin(yy * (2 * np.pi / period))
        )
    gradient = (rng.uniform(-0.25, 0.25, 2) / (w, h)).astype(np.float32)
    light = 1 + gradient[0] * (xx - w / 2) + gradient[1] * (yy - h / 2)
    tint = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    return (base + texture[..., None] * tint) * light[..., None]


def _sample_classes(rng: np.random.Generator) -> list[str]:
    """Pick 1 to 3 distinct classes, adding a class's usual partner most of the time."""
    count = rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25])
    present: list[str] = []
    while len(present) < count:
        name = str(rng.choice([c for c in CLASSES if c not in present]))
        present.append(name)
        partner = PARTNERS.get(name)
        if partner and partner[0] not in present and len(present) < 3 and rng.random() < partner[1]:
            present.append(partner[0])
    return present


def _place(rng: np.random.Generator, count: int, h: int, w: int) -> list[tuple[float, float, float]]:
    """Non-overlapping (cx, cy, radius) placements that fit fully inside the image."""
    side = min(h, w)
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(200):
            radius = rng.uniform(0.1, 0.2) * side
            cx = rng.uniform(radius + 2, w - radius - 2)
            cy = rng.uniform(radius + 2, h - radius - 2)
            if all(np.hypot(cx - x, cy - y) > radius + r + 3 for x, y, r in placed):
                placed.append((cx, cy, radius))
                if len(placed) == count:
                    return placed
        side *= 0.9


def _object_colour(rng: np.random.Generator, name: str) -> np.ndarray:
    """The class's preferred colour half the time, otherwise any palette colour, jittered."""
    index = PREFERRED_COLOUR[name] if rng.random() < 0.5 else rng.integers(len(PALETTE))
    return np.clip(PALETTE[index] + rng.uniform(-20, 20, 3), 0, 255).astype(np.float32)


def _clutter_colour(rng: np.random.Generator) -> np.ndarray:
    """A class-preferred colour most of the time, so colour alone is a misleading cue."""
    preferred = rng.random() < 0.7
    index = PREFERRED_COLOUR[str(rng.choice(CLASSES))] if preferred else rng.integers(len(PALETTE))
    return np.clip(PALETTE[index] + rng.uniform(-20, 20, 3), 0, 255).astype(np.float32)


def _free_centre(
    rng: np.random.Generator, h: int, w: int, radius: float, objects: list[tuple[float, float, float]]
) -> tuple[float, float]:
    """A random centre whose clutter of this radius mostly keeps clear of the objects."""
    for _ in range(20):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        if all(np.hypot(cx - x, cy - y) > r + 0.6 * radius for x, y, r in objects):
            break
    return cx, cy


def _paint_clutter(
    rng: np.random.Generator, canvas: np.ndarray, objects: list[tuple[float, float, float]]
) -> None:
    """Draw one non-class distractor: ring, blob, striped patch, line or a few dots."""
    h, w, _ = canvas.shape
    side = min(h, w)
    kind = rng.integers(5)
    colour = _clutter_colour(rng)
    if kind == 0:
        radius = rng.uniform(0.08, 0.18) * side
        cx, cy = _free_centre(rng, h, w, radius, objects)
        _paint(canvas, _ring_sdf(radius, rng.uniform(2, 4.5)), (cx, cy), radius + 4, colour)
    elif kind == 1:
        radius = rng.uniform(0.07, 0.15) * side
        cx, cy = _free_centre(rng, h, w, radius * 1.5, objects)
        amplitudes = rng.uniform(0.15, 0.3, 3).astype(np.float32)
        phases = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
        _paint(
            canvas,
            _blob_sdf(radius, amplitudes, phases),
            (cx, cy),
            radius * 1.9,
            colour,
            shading=tuple(rng.uniform(-0.3, 0.3, 2)),
        )
    elif kind == 2:
        half = rng.uniform(0.1, 0.25, 2) * side
        cx, cy = _free_centre(rng, h, w, float(half.max()), objects)
        corners = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float32) * half
        box = _polygon_sdf(_rotate(corners, rng.uniform(0, np.pi)))
        _paint(
            canvas,
            box,
            (cx, cy),
            float(np.hypot(*half)) + 1,
            colour,
            opacity=rng.uniform(0.35, 0.7),
            stripe_period=rng.uniform(5, 12),
        )
    elif kind == 3:
        length, angle = rng.uniform(0.15, 0.5) * side, rng.uniform(0, np.pi)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        ex, ey = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        segment = _segment_sdf(-ex, -ey, ex, ey, rng.uniform(1.5, 4))
        _paint(canvas, segment, (cx, cy), length / 2 + 3, colour)
    else:
        for _ in range(rng.integers(3, 9)):
            radius = rng.uniform(1.5, 4)
            centre = (rng.uniform(0, w), rng.uniform(0, h))
            _paint(canvas, _circle_sdf(radius), centre, radius + 2, colour)


def generate(seed: int, index: int) -> Sample:
    """Generate sample `index` of the stream `seed`; the same pair always gives the same sample."""
    rng = np.random.default_rng([seed, index])
    h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    canvas = _background(rng, h, w)
    present = _sample_classes(rng)
    objects = _place(rng, len(present), h, w)
    for _ in range(rng.integers(2, 7)):
        _paint_clutter(rng, canvas, objects)
    masks: dict[str, np.ndarray] = {}
    for name, (cx, cy, radius) in zip(present, objects, strict=True):
        box, inside = _paint(
            canvas,
            _class_sdf(name, radius, rng),
            (cx, cy),
            radius,
            _object_colour(rng, name),
            shading=tuple(rng.uniform(-0.3, 0.3, 2)),
        )
        masks[name] = np.zeros((h, w), dtype=bool)
        masks[name][box] = inside
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(3, 10)
    pixels = np.clip(canvas, 0, 255).round().astype(np.uint8)
    labels = torch.tensor([name in masks for name in CLASSES], dtype=torch.float32)
    return Sample(Image.fromarray(pixels, "RGB"), labels, masks)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W) tensor, as the CLI decodes a PNG."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


class ShapesDataset(Dataset):
    """Samples `offset .. offset + length - 1` of stream `seed` as (transform(uint8 CHW), labels)."""

    def __init__(
        self,
        seed: int,
        length: int,
        transform: Callable[[torch.Tensor], torch.Tensor],
        offset: int = 0,
    ) -> None:
        self.seed, self.length, self.transform, self.offset = seed, length, transform, offset

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = generate(self.seed, self.offset + index)
        return self.transform(to_tensor(sample.image)), sample.labels
