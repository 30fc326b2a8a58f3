"""Pillow images of any mode as uint8 RGB arrays: the one conversion the run and the report share.

Imports no torch, so the report (which makes thumbnails of the inputs) starts quickly.
"""

import numpy as np
from PIL import Image

# Transparent pixels are composited over this fixed background.
BACKGROUND = (255, 255, 255)


def _scale_to_uint8(image: Image.Image) -> np.ndarray:
    """Map a 16/32-bit integer or float single-channel image to uint8 (H, W).

    The nominal range (0..65535 for integers, 0..1 for floats) maps to 0..255 when every value lies in it,
    as image viewers show 16-bit files; otherwise the image's own min..max does. Never clips; NaN and
    infinities count as 0; a constant image outside the nominal range becomes 0.
    """
    values = np.asarray(image).astype(np.float64)
    values[~np.isfinite(values)] = 0.0
    low, high = 0.0, 1.0 if image.mode == "F" else 65535.0
    if values.min() < low or values.max() > high:
        low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def rgb_array(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to uint8 RGB (H, W, 3); transparency is composited over BACKGROUND."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return np.repeat(_scale_to_uint8(image)[:, :, None], 3, axis=2)
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # RGB: no copy to convert
