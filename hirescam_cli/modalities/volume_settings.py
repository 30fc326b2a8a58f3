"""The `[preprocess]` table of volumes (`[input] kind = "volumes"`): its keys, defaults and validators.

Imports no torch: the config is checked before the model loads. The steps run in this order, each an
affine map of voxel coordinates that the geometry keeps (volumes.py): reorient, resample to a spacing,
window and scale the intensities, resize, centre-crop or pad.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..config import _choice, _fail, _positive

AXES = ("LR", "PA", "IS")  # nibabel's axis-code pairs: each axis is one letter of a pair, each pair once
INTERPOLATIONS = ("trilinear", "nearest")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _orientation(key: str, value: Any, _base: Path) -> str:
    text = value.upper() if isinstance(value, str) else value
    ok = isinstance(text, str) and (text == "NONE" or _axis_codes(text))
    if not ok:
        raise _fail(
            key, value, 'three axis codes, one of each of L/R, P/A, I/S (e.g. "RAS", "LPS"), or "none"'
        )
    return "none" if text == "NONE" else text


def _axis_codes(text: str) -> bool:
    return len(text) == 3 and sorted(next((i for i, p in enumerate(AXES) if c in p), 9) for c in text) == [
        0,
        1,
        2,
    ]


def _spacing(key: str, value: Any, _base: Path) -> tuple[float, float, float]:
    values = [value] * 3 if _number(value) else value
    ok = isinstance(values, list | tuple) and len(values) == 3 and all(_number(v) and v > 0 for v in values)
    if not ok:
        raise _fail(
            key, value, "a positive number of millimetres, or three of them [x, y, z] for the voxel axes"
        )
    return tuple(float(v) for v in values)


def _window(key: str, value: Any, _base: Path) -> tuple[float, float]:
    ok = isinstance(value, list | tuple) and len(value) == 2 and all(_number(v) for v in value)
    if not ok or value[0] >= value[1]:
        raise _fail(key, value, "[low, high] with low < high, in the input's units (CT: Hounsfield units)")
    return float(value[0]), float(value[1])


def _float(key: str, value: Any, _base: Path) -> float:
    if not _number(value):
        raise _fail(key, value, "a finite number")
    return float(value)


def _positive_float(key: str, value: Any, base: Path) -> float:
    number = _float(key, value, base)
    if number <= 0:
        raise _fail(key, value, "a positive number")
    return number


def _size(key: str, value: Any, _base: Path) -> tuple[int, int, int]:
    values = [value] * 3 if isinstance(value, int) and not isinstance(value, bool) else value
    ok = isinstance(values, list | tuple) and len(values) == 3
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    if not ok:
        raise _fail(key, value, "a positive integer, or three of them [i, j, k] for the voxel axes")
    return tuple(values)


@dataclass(frozen=True)
class VolumePreprocess:
    """How a volume becomes the model input; every step is kept in the geometry (volumes.Geometry)."""

    orientation: str = "RAS"  # reorient to these axis codes (the closest canonical: flips and permutations)
    spacing: tuple[float, float, float] | None = None  # resample to this voxel size in mm; None: keep
    window: tuple[float, float] | None = None  # clip to [low, high] (CT: HU), then map it to [0, 1]
    mean: float = 0.0  # then (x - mean) / std
    std: float = 1.0
    resize: tuple[int, int, int] | None = None  # resize to exactly this size (voxels)
    crop: tuple[int, int, int] | None = None  # then centre-crop, or pad with the window's low end, to this
    interpolation: str = "trilinear"  # of the resampling and the resize
    uneven_slices: str = "error"  # DICOM slices unevenly spaced or missing: an error line, or "resample"
    max_voxels: int = 2**28  # larger volumes are refused (one error line)

    KEYS: ClassVar[dict] = {
        "orientation": _orientation,
        "spacing": _spacing,
        "window": _window,
        "mean": _float,
        "std": _positive_float,
        "resize": _size,
        "crop": _size,
        "interpolation": _choice(*INTERPOLATIONS),
        "uneven_slices": _choice("error", "resample"),
        "max_voxels": _positive,
    }

    @property
    def input_size(self) -> tuple[int, int, int] | None:
        """The model input's size in voxels when fixed (a crop, or a resize), else None."""
        return self.crop or self.resize

    def __str__(self) -> str:
        steps = [f"orientation {self.orientation}"]
        steps += [f"spacing {list(self.spacing)} mm"] if self.spacing else []
        steps += [f"window {list(self.window)}"] if self.window else []
        steps += [f"mean {self.mean:g}, std {self.std:g}"]
        steps += [f"resize {list(self.resize)} ({self.interpolation})"] if self.resize else []
        steps += [f"crop {list(self.crop)}"] if self.crop else []
        return "volumes: " + ", ".join(steps)
