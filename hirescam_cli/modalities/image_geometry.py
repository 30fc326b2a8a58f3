"""Where a picture's maps lie on the original, read from its summary alone (torch-free): what `hirescam
compare` needs to put two runs' maps of one picture on a common footing, whatever their grids and crops.

A map's grid spans the summary's `box` (x0, y0, x1, y1: the region of the original, in its pixels, that
the model input covered) evenly, and is read there bilinearly between cell centres, clamped at the border:
exactly how the overlays are drawn (image_overlays.register). The common footing is the original's pixels
inside both boxes (and inside the picture), sampled evenly, at most FOOTING_SIDE samples along its long
side (every pixel when the region is smaller).
"""

import math
from dataclasses import dataclass, field

import numpy as np

FOOTING_SIDE = 128  # samples along the common footing's long side, at most
FOOTING = (
    f"the original's pixels inside both crop boxes, sampled evenly (at most {FOOTING_SIDE} along the long "
    "side); maps read bilinearly through each side's box, as the overlays are drawn"
)


def _box(summary: dict) -> tuple[float, float, float, float]:
    """The summary's crop box; ValueError naming what is missing (a summary written before it was kept)."""
    box = summary.get("box")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
        raise ValueError(
            "a summary holds no crop box (written before summaries kept it: rerun `hirescam explain` with "
            "--overwrite)"
        )
    x0, y0, x1, y1 = map(float, box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"its summary's crop box {box} is empty")
    return x0, y0, x1, y1


def _samples(low: float, high: float, count: int) -> np.ndarray:
    """`count` evenly spaced sample centres over [low, high]."""
    return low + (np.arange(count) + 0.5) * (high - low) / count


def _weights(fractions: np.ndarray, cells: int) -> np.ndarray:
    """(len(fractions), cells): linear weights of the cell centres at `fractions` of the span, clamped at
    the border (grid_sample's bilinear, align_corners False, border padding)."""
    where = np.clip(fractions * cells - 0.5, 0, cells - 1)
    low = np.floor(where).astype(np.int64)
    high = np.minimum(low + 1, cells - 1)
    part = where - low
    weights = np.zeros((len(where), cells))
    rows = np.arange(len(where))
    np.add.at(weights, (rows, low), 1 - part)
    np.add.at(weights, (rows, high), part)
    return weights


@dataclass
class Footing:
    """The original's pixels both sides' maps cover, sampled evenly: each sample as fractions of each
    side's box, along x and y."""

    fractions: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # per side: (fx, fy)
    _weights: dict = field(default_factory=dict)

    def sample(self, side: int, grid: np.ndarray) -> np.ndarray:
        """A map over its grid (h, w), read at the footing's samples through side 0's (BASE) or side 1's
        (NEW) box -> (samples,)."""
        height, width = grid.shape
        key = (side, height, width)
        if key not in self._weights:
            fx, fy = self.fractions[side]
            self._weights[key] = (_weights(fy, height), _weights(fx, width))
        rows, columns = self._weights[key]
        return (rows @ grid.astype(np.float64) @ columns.T).ravel()


def footing(base: dict, new: dict) -> Footing | None:
    """The common footing of two summaries of one picture; None when their boxes share no pixel of it.
    ValueError when a summary lacks the geometry."""
    boxes = _box(base), _box(new)
    width, height = float(base["width"]), float(base["height"])
    x0, y0 = max(0.0, *(b[0] for b in boxes)), max(0.0, *(b[1] for b in boxes))
    x1, y1 = min(width, *(b[2] for b in boxes)), min(height, *(b[3] for b in boxes))
    if x1 <= x0 or y1 <= y0:
        return None
    long = max(x1 - x0, y1 - y0)
    columns = max(1, min(math.ceil(x1 - x0), round(FOOTING_SIDE * (x1 - x0) / long)))
    rows = max(1, min(math.ceil(y1 - y0), round(FOOTING_SIDE * (y1 - y0) / long)))
    xs, ys = _samples(x0, x1, columns), _samples(y0, y1, rows)
    fractions = tuple(((xs - b[0]) / (b[2] - b[0]), (ys - b[1]) / (b[3] - b[1])) for b in boxes)
    return Footing(fractions)


def peak_distance(base: dict, base_peak: list, new: dict, new_peak: list) -> float:
    """How far apart two maps' peaks ([x, y] in original pixels, as summaries give them) lie, in pixels."""
    return math.dist(base_peak, new_peak)
