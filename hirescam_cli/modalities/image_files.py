"""Image files: which names are pictures, Pillow decoding of any of them to uint8 RGB, and the header of
a plain JPEG, which a CUDA device then decodes itself (images.py).

Imports no torch: folder walks ask `accepts` before the model loads, and the report makes its
thumbnails through `rgb_array`, the one conversion of every Pillow mode the run uses too.
"""

import contextlib
import functools
import io
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import InputFailure

# Pillow formats that are not raster images we can decode: write-only (PDF, PALM), stubs without a
# decoder (BUFR, GRIB, HDF5, WMF), video (MPEG) and PostScript, which would run Ghostscript on the data.
NOT_DECODABLE = frozenset({"BUFR", "EPS", "GRIB", "HDF5", "MPEG", "PALM", "PDF", "WMF"})


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (".jpg") of the image formats Pillow can decode here."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt not in NOT_DECODABLE)


def accepts(name: str) -> bool:
    """Whether a file name found in a folder walk is a picture (its extension, case-insensitive)."""
    return os.path.splitext(name)[1].lower() in image_extensions()


# Pillow's decoding limits are process-wide globals; decode() sets them for its own use under this lock.
_PILLOW_LOCK = threading.Lock()


class ImageError(InputFailure):
    """One image could not be used; str(error) is a one-line human reason."""


@functools.cache
def _decodable_formats() -> tuple[str, ...]:
    """The Pillow formats decode() tries, identified by content."""
    Image.init()
    return tuple(fmt for fmt in Image.OPEN if fmt not in NOT_DECODABLE)


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def _pillow_limits() -> Iterator[None]:
    """Own Pillow's process-wide settings for one decode (bombs and truncation fail), then restore them."""
    with _PILLOW_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _check_resized(width: int, height: int, resize: int | None, max_pixels: int | None) -> None:
    """Refuse an aspect ratio so extreme that resizing its shorter side to `resize` would exceed max_pixels
    (a 1 x 100000 strip at 256 is 256 x 25,600,000), before any pixel is decoded."""
    if max_pixels is None or not isinstance(resize, int):
        return
    scale = resize / max(1, min(width, height))
    resized_w, resized_h = round(width * scale), round(height * scale)
    if resized_w * resized_h > max_pixels:
        raise ImageError(
            f"{width} x {height}: aspect ratio too extreme (resized to {resized_w} x {resized_h}, over the "
            f"limit of {max_pixels} pixels, --max-pixels)"
        )


def _load(data: bytes, max_pixels: int | None, resize: int | None = None) -> Image.Image:
    """Identify the image, check its header size against max_pixels, then decode its first frame fully."""
    with _pillow_limits():
        Image.MAX_IMAGE_PIXELS = None  # the header size is checked below, naming the dimensions
        try:
            image = Image.open(io.BytesIO(data), formats=_decodable_formats())
        except Image.UnidentifiedImageError:
            raise ImageError("not an image (cannot identify format)") from None
        except Exception as error:  # plugins raise many types on bad data
            raise ImageError(f"corrupt image header: {_one_line(error)}") from None
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            size = f"{width} x {height} = {width * height} pixels"
            raise ImageError(f"{size} exceeds the limit of {max_pixels} pixels (--max-pixels)")
        _check_resized(width, height, resize, max_pixels)
        Image.MAX_IMAGE_PIXELS = max_pixels  # for Pillow's checks inside decoders (ICO entries...)
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            limit = f"the limit of {max_pixels} pixels (--max-pixels)"
            raise ImageError(f"{width} x {height} image decodes to more than {limit}") from None
        except Exception as error:  # decoders raise many types on bad data
            raise ImageError(f"corrupt or truncated image data: {_one_line(error)}") from None
    return image


@dataclass(frozen=True)
class JpegHeader:
    """What the header of a JPEG that a device can decode says: its upright size and EXIF orientation."""

    size: tuple[int, int]  # (H, W) once upright
    orientation: int  # EXIF orientation 1..8 (1: upright as stored)


DEVICE_MODES = ("RGB", "L")  # JPEG colour spaces a device decodes to RGB (YCbCr, grey); not CMYK


def jpeg_header(data: bytes, max_pixels: int | None, resize: int | None = None) -> JpegHeader | None:
    """The header of a JPEG in a colour space a device decodes, its size checked as `decode` checks it (an
    ImageError beyond the limits); None for anything else (decode it with `decode`). Decodes no pixel."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    with _pillow_limits():
        Image.MAX_IMAGE_PIXELS = None  # the header size is checked below, as decode() does
        try:
            image = Image.open(io.BytesIO(data), formats=("JPEG",))
            mode, (width, height) = image.mode, image.size
            orientation = image.getexif().get(ORIENTATION, 1)
        except Exception:  # let decode() tell what is wrong with it
            return None
    if mode not in DEVICE_MODES or orientation not in range(1, 9):
        return None
    if max_pixels is not None and width * height > max_pixels:
        size = f"{width} x {height} = {width * height} pixels"
        raise ImageError(f"{size} exceeds the limit of {max_pixels} pixels (--max-pixels)")
    _check_resized(width, height, resize if isinstance(resize, int) else None, max_pixels)
    upright = (width, height) if orientation >= 5 else (height, width)  # 5..8 turn it a quarter
    return JpegHeader(upright, orientation)


ORIENTATION = 0x0112  # the EXIF tag


def decode(data: bytes, max_pixels: int | None, resize: int | tuple[int, int] | None = None) -> np.ndarray:
    """Decode image bytes to an upright (EXIF orientation applied) uint8 RGB (3, H, W) array or ImageError:
    a view of (H, W, 3) memory, as Pillow decodes it and the overlays are blended (no transposing copy).

    Takes the first frame of animations; converts every mode to RGB (see ``rgb_array``). ``max_pixels``
    (None: no limit) is checked on the header size before any pixel is decoded, and so is the size the
    shorter-side `resize` (an int) would give.
    """
    if not data:
        raise ImageError("empty file")
    image = _load(data, max_pixels, resize if isinstance(resize, int) else None)
    try:
        ImageOps.exif_transpose(image, in_place=True)
        rgb = rgb_array(image)
    except Exception as error:  # e.g. a mode with no RGB conversion
        raise ImageError(f"cannot convert {image.mode} image to RGB: {_one_line(error)}") from None
    image.close()  # frees the decoded pixels before a read-only array is copied
    return np.require(rgb, requirements=["C", "W"]).transpose(2, 0, 1)


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
