"""Picture formats of the overlays: PNG (lossless, the default), JPEG and WebP (lossy, at `output.quality`).

A summary lists each map's picture under its format's name ({"png": "a/cat.jpg/hirescam-281.png"}, or
"jpeg", "webp"). The writers encode pixels on the host: PNG with fpng (or zlib, `output.png = "small"`),
JPEG with Pillow's libjpeg-turbo, WebP with Pillow's libwebp at its quickest method (files a few
percent larger than its default method's, in a third of the time); on a CUDA device render.py encodes
JPEG there instead, and the writers only write the bytes. Imports no torch: writer processes and the
report use it.
"""

import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

try:
    import fpng
except ImportError:  # the fast encoder is optional: PNGs then come from zlib (--png small)
    fpng = None

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}  # output.format -> the files' extension
WEBP_METHOD = 0  # libwebp's quickest: about 3x faster than its default (4), files about 3% larger


@dataclass(frozen=True)
class PictureFormat:
    """How the overlays are written: `output.format`, `output.quality` and `output.png`."""

    name: str = "png"
    quality: int = 90  # JPEG and WebP, 1..100
    png: str = "fast"  # the PNG encoder: fast (fpng) or small (zlib)

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.name]

    def encode(self, pixels: np.ndarray) -> bytes:
        """The file bytes of an (H, W, 3) uint8 picture."""
        if self.name == "png":
            return encode_png(pixels, self.png)
        buffer = io.BytesIO()
        options = {"method": WEBP_METHOD} if self.name == "webp" else {}
        Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(
            buffer, format=self.name.upper(), quality=self.quality, **options
        )
        return buffer.getvalue()

    def encoder(self) -> str:
        """What encodes this format's pictures on the host (run.json records it)."""
        return (
            png_encoder(self.png)
            if self.name == "png"
            else {"jpeg": "libjpeg-turbo", "webp": "libwebp"}[self.name]
        )


def file_bytes(picture: np.ndarray | bytes, picture_format: PictureFormat) -> bytes:
    """A picture's file bytes: encoded already (on the device), or encoded now from its pixels."""
    return picture if isinstance(picture, bytes) else picture_format.encode(picture)


def picture_of(files: dict) -> str | None:
    """The picture a summary lists for a map, whatever its format (None: none)."""
    return next((files[name] for name in EXTENSIONS if files.get(name)), None)


def encode_png(pixels: np.ndarray, kind: str = "fast") -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array: "fast" with fpng (~20x quicker, ~35% larger files),
    "small" with zlib through Pillow (run-length strategy: quicker than the default, and smaller)."""
    if kind == "fast" and fpng is not None:
        return fpng.from_ndarray(np.ascontiguousarray(pixels))
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buffer.getvalue()


def png_encoder(kind: str) -> str:
    """The encoder `kind` gets here: "fpng", or "zlib" (asked for, or fpng cannot be imported)."""
    return "fpng" if kind == "fast" and fpng is not None else "zlib"
