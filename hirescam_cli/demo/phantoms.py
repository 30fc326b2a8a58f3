"""Deterministic synthetic CT-like volumes with ground-truth lesion masks, for the 3-D demo.

A phantom is drawn from (seed, index) alone and defined in world millimetres (RAS), so it can be sampled on
any voxel grid: a body (soft tissue with a fat rim), two lungs, a liver, two kidneys and a spine, at
realistic Hounsfield units, noise, and lesions of four kinds, each placed in its organ:

    lung_nodule   a solid nodule (+40 HU) in a lung (-850 HU)
    liver_lesion  a hypodense lesion (-30 HU) in the liver (+70 HU)
    kidney_cyst   a cyst (+5 HU) in an enhancing kidney (+160 HU)
    bone_lesion   a lytic lesion (+100 HU) in a vertebra (+700 HU)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES: tuple[str, ...] = ("lung_nodule", "liver_lesion", "kidney_cyst", "bone_lesion")
PRESENCE = 0.4  # each lesion kind is present with this probability
FIELD_MM = 160.0  # the phantom fits in a cube of this side, centred on the origin
AIR, FAT, SOFT, LUNG, LIVER, KIDNEY, BONE = -1000.0, -100.0, 40.0, -850.0, 70.0, 160.0, 700.0
LESION_HU = {"lung_nodule": 40.0, "liver_lesion": -30.0, "kidney_cyst": 5.0, "bone_lesion": 100.0}
NOISE_HU = 12.0


@dataclass(frozen=True)
class Ellipsoid:
    centre: tuple[float, float, float]  # mm
    axes: tuple[float, float, float]  # semi-axes, mm

    def inside(self, points: np.ndarray) -> np.ndarray:
        """Which of the points (..., 3) in mm lie inside."""
        scaled = (points - np.asarray(self.centre)) / np.asarray(self.axes)
        return (scaled**2).sum(-1) <= 1.0


@dataclass(frozen=True)
class Phantom:
    """One synthetic patient: organs, the lesions present, and the seed of its noise."""

    body: Ellipsoid
    lungs: tuple[Ellipsoid, Ellipsoid]
    liver: Ellipsoid
    kidneys: tuple[Ellipsoid, Ellipsoid]
    spine: tuple[float, float, float]  # x, y and radius of the vertebral column (along z), mm
    lesions: dict[str, Ellipsoid]
    noise_seed: int

    @property
    def labels(self) -> np.ndarray:
        """Multi-hot float32 labels over CLASSES."""
        return np.array([name in self.lesions for name in CLASSES], np.float32)


def _jitter(rng: np.random.Generator, values, spread: float) -> tuple[float, ...]:
    return tuple(
        float(v) for v in np.asarray(values, float) * (1 + rng.uniform(-spread, spread, len(values)))
    )


def _point_in(rng: np.random.Generator, organ: Ellipsoid, margin: float) -> tuple[float, float, float]:
    """A random point well inside an ellipsoid (at most 1 - margin of its radius out)."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    radius = (1 - margin) * rng.uniform(0, 1) ** (1 / 3)
    return tuple(
        float(c + a * d * radius) for c, a, d in zip(organ.centre, organ.axes, direction, strict=True)
    )


def draw(seed: int, index: int) -> Phantom:
    """The phantom of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    body = Ellipsoid((0.0, 0.0, 0.0), _jitter(rng, (68, 52, 78), 0.08))
    lungs = tuple(
        Ellipsoid(_jitter(rng, (side * 28, 6, 32), 0.1), _jitter(rng, (20, 30, 36), 0.1)) for side in (1, -1)
    )
    liver = Ellipsoid(_jitter(rng, (24, 6, -26), 0.1), _jitter(rng, (28, 32, 22), 0.1))
    kidneys = tuple(
        Ellipsoid(_jitter(rng, (side * 34, -24, -38), 0.08), _jitter(rng, (11, 13, 20), 0.1))
        for side in (1, -1)
    )
    spine = (float(rng.uniform(-3, 3)), float(rng.uniform(-42, -36)), float(rng.uniform(10, 13)))
    lesions = {}
    for name in CLASSES:
        if rng.uniform() >= PRESENCE:
            continue
        radius = float(rng.uniform(8, 13))
        if name == "lung_nodule":
            centre = _point_in(rng, lungs[int(rng.integers(2))], 0.45)
        elif name == "liver_lesion":
            centre = _point_in(rng, liver, 0.45)
        elif name == "kidney_cyst":
            radius = float(rng.uniform(7, 10))
            centre = _point_in(rng, kidneys[int(rng.integers(2))], 0.5)
        else:
            radius = float(rng.uniform(7, 9))
            x, y, _ = spine
            centre = (x, y, float(rng.uniform(-50, 50)))
        lesions[name] = Ellipsoid(centre, (radius, radius, radius))
    return Phantom(body, lungs, liver, kidneys, spine, lesions, int(rng.integers(2**31)))


def world_points(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """The world position (I, J, K, 3) in mm of every voxel centre of a grid."""
    voxels = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"), -1)
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def render(phantom: Phantom, shape: tuple[int, int, int], affine: np.ndarray) -> tuple[np.ndarray, dict]:
    """The phantom on a voxel grid: float32 HU (I, J, K) and a bool mask per lesion present."""
    points = world_points(shape, affine)
    hu = np.full(shape, AIR, np.float32)
    inner = Ellipsoid(phantom.body.centre, tuple(a - 7 for a in phantom.body.axes))
    hu[phantom.body.inside(points)] = FAT
    hu[inner.inside(points)] = SOFT
    for lung in phantom.lungs:
        hu[lung.inside(points) & inner.inside(points)] = LUNG
    hu[phantom.liver.inside(points)] = LIVER
    for kidney in phantom.kidneys:
        hu[kidney.inside(points)] = KIDNEY
    x, y, radius = phantom.spine
    spine = ((points[..., 0] - x) ** 2 + (points[..., 1] - y) ** 2 <= radius**2) & inner.inside(points)
    hu[spine] = BONE
    masks = {}
    for name, lesion in phantom.lesions.items():
        masks[name] = lesion.inside(points)
        hu[masks[name]] = LESION_HU[name]
    noise = np.random.default_rng(phantom.noise_seed).normal(0, NOISE_HU, shape).astype(np.float32)
    return hu + noise, masks


def model_grid(side: int, spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """A RAS grid of side^3 voxels of `spacing` mm centred on the origin: (shape, affine)."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (side - 1) / 2
    return (side, side, side), affine
