"""Image decoding and preprocessing that keeps the geometry back to the original image.

Data flows: ``discovery`` (arguments -> sorted ``InputItem``s) -> ``ImageDataset`` (read, hash, decode,
preprocess; never raises for a bad image) -> ``collate`` (good / skipped / failed) -> ``Batch``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import os
import signal
import stat
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler
from torchvision.transforms import InterpolationMode

from .discovery import NOT_DECODABLE, InputItem
from .pixels import rgb_array

# Pillow's decoding limits are process-wide globals; decode() sets them for its own use under this lock.
_PILLOW_LOCK = threading.Lock()


class ImageError(Exception):
    """One image could not be used; str(error) is a one-line human reason."""


# ---------------------------------------------------------------------------------------------------
# decoding


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


def decode(data: bytes, max_pixels: int | None, resize: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Decode image bytes to an upright (EXIF orientation applied) uint8 RGB (3, H, W) tensor or ImageError.

    Takes the first frame of animations; converts every mode to RGB (see ``pixels.rgb_array``). ``max_pixels``
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
    image.close()  # frees the decoded pixels before the (3, H, W) copy is made
    return torch.from_numpy(np.require(rgb.transpose(2, 0, 1), requirements=["C", "W"]))


def overlay_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The (h, w) of an image's overlays: its own size up to a long side of `max_side`, else scaled down
    so that the long side is `max_side` (aspect kept: the short side rounded to whole pixels, at least 1)."""
    long = max(height, width)
    if long <= max_side:
        return height, width
    return tuple(max(1, (2 * side * max_side + long) // (2 * long)) for side in (height, width))


def overlay_image(image: torch.Tensor, max_side: int) -> torch.Tensor:
    """The uint8 (3, h, w) picture an image's overlays are drawn on: the image itself, or, beyond `max_side`,
    an antialiased bilinear reduction to `overlay_size`."""
    size = overlay_size(image.shape[1], image.shape[2], max_side)
    if size == tuple(image.shape[1:]):
        return image
    return TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


# ---------------------------------------------------------------------------------------------------
# preprocessing


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """An (h, w) pair from an int (square) or a pair."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def _is_size(value: object) -> bool:
    """Whether a value is a positive int or an (h, w) pair of them."""
    pair = (value, value) if isinstance(value, int) else value
    return (
        isinstance(pair, tuple | list)
        and len(pair) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)
    )


def _crop_start(size: int, crop: int) -> int:
    """Where torchvision's center_crop starts along one axis (negative when it pads)."""
    if crop > size:
        return -((crop - size) // 2)
    return round((size - crop) / 2.0)


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocess:
    """Resize (antialiased), centre-crop and normalise a uint8 image, keeping the covered region."""

    resize: int | tuple[int, int] | None  # int: shorter side (aspect kept); (h, w): exact size
    crop: int | tuple[int, int] | None  # centre crop after the resize; zero-padded when larger
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # of the resize: bilinear or bicubic (antialiased), or nearest

    def __post_init__(self) -> None:
        """Reject sizes and statistics that cannot work."""
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and not _is_size(value):
                raise ValueError(f"{name} must be a positive int or (h, w) pair of them, got {value!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {self.mean!r}, {self.std!r}")
        if self.interpolation not in INTERPOLATIONS:
            allowed = ", ".join(INTERPOLATIONS)
            raise ValueError(f"interpolation must be one of {allowed}; got {self.interpolation!r}")

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The (h, w) of every model input when fixed (a crop, or an exact resize), else None."""
        if self.crop is not None:
            return _pair(self.crop)
        if self.resize is not None and not isinstance(self.resize, int):
            return _pair(self.resize)
        return None

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
        """Return the normalised float (3, h, w) model input and the box (x0, y0, x1, y1) it covers.

        The box is in the original image's pixel coordinates (edges, not centres): model input pixel
        column j spans x0 + j * (x1 - x0) / w .. x0 + (j + 1) * (x1 - x0) / w. It extends beyond the image
        where the crop pads.
        """
        height, width = image.shape[-2:]
        if self.resize is not None:
            size = [self.resize] if isinstance(self.resize, int) else list(self.resize)
            mode = InterpolationMode(self.interpolation)
            image = TF.resize(image, size, interpolation=mode, antialias=True)
        resized_h, resized_w = image.shape[-2:]
        top, left, out_h, out_w = 0, 0, resized_h, resized_w
        if self.crop is not None:
            out_h, out_w = _pair(self.crop)
            image = TF.center_crop(image, [out_h, out_w])
            top, left = _crop_start(resized_h, out_h), _crop_start(resized_w, out_w)
        box = (
            left * width / resized_w,
            top * height / resized_h,
            (left + out_w) * width / resized_w,
            (top + out_h) * height / resized_h,
        )
        tensor = TF.normalize(image.float().div_(255), list(self.mean), list(self.std), inplace=True)
        return tensor, box


# ---------------------------------------------------------------------------------------------------
# dataset and batches


@dataclass
class Sample:
    """The result for one input: a model input with its box, original size and overlay picture, a skip, or an
    error."""

    index: int
    sha256: str | None = None
    input: torch.Tensor | None = None
    image: torch.Tensor | None = None  # the overlay picture (overlay_image), when the dataset makes them
    box: tuple[float, float, float, float] | None = None
    size: tuple[int, int] | None = None  # (H, W) of the original image
    error: str | None = None
    skipped: bool = False


def _read_error(path: Path, error: OSError) -> str:
    """A one-line reason why a file could not be read."""
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "is a directory"
    if isinstance(error, FileNotFoundError):
        return "broken symbolic link" if path.is_symlink() else "file not found"
    return f"cannot read: {error.strerror or _one_line(error)}"


def read_file(path: Path, max_bytes: int | None) -> bytes:
    """A regular file's bytes; ImageError for a device, pipe or socket (never read: it could be endless) or
    a file larger than `max_bytes`. OSError when it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the open
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"not a regular file but a {_file_kind(info.st_mode)}")
        if max_bytes is not None and info.st_size > max_bytes:
            raise ImageError(f"{info.st_size} bytes: larger than any image within --max-pixels could be")
        return file.read()


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISCHR: "character device", stat.S_ISBLK: "block device", stat.S_ISFIFO: "named pipe"}
    return next(
        (name for test, name in kinds.items() if test(mode)),
        "socket" if stat.S_ISSOCK(mode) else "special file",
    )


def file_limit(max_pixels: int | None) -> int | None:
    """The largest file an image within max_pixels can be: 8 bytes a pixel (16-bit RGBA, uncompressed)
    plus room for metadata."""
    return None if max_pixels is None else 8 * max_pixels + 2**24


class ImageDataset(Dataset[Sample]):
    """Reads, hashes, decodes and preprocesses inputs by index; a bad image is an error, never an exception.

    ``overlay_side``: the samples carry the picture their overlays are drawn on, scaled down to this long
    side (``overlay_image``; the model input is still made from the full image), and the full decode is
    dropped in the worker; None: no pictures (a run that draws no overlays).
    ``skip(item, sha256)`` (e.g. "outputs already complete") is asked after hashing and before decoding.
    It runs in the DataLoader workers, so it must be picklable under spawn and not rely on main-process
    state that changes after the workers start. Many inputs come as a ``discovery.Catalogue``, which
    workers read from its file rather than copying a large list.
    """

    def __init__(
        self,
        items: Sequence[InputItem],
        preprocess: Preprocess,
        max_pixels: int | None,
        skip: Callable[[InputItem, str], bool] | None = None,
        overlay_side: int | None = None,
    ) -> None:
        """Keep the items with the decoding settings."""
        self.items = items
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.skip = skip
        self.overlay_side = overlay_side

    def __len__(self) -> int:
        """Number of inputs."""
        return len(self.items)

    def item(self, index: int) -> InputItem:
        """The input at an index."""
        return self.items[index]

    def __getitem__(self, index: int) -> Sample:
        """Load one input into a Sample (skipped, failed or ready)."""
        item = self.item(index)
        try:
            data = read_file(item.path, file_limit(self.max_pixels))
        except OSError as error:
            return Sample(index, error=_read_error(item.path, error))
        except ImageError as error:
            return Sample(index, error=str(error))
        sha256 = hashlib.sha256(data).hexdigest()
        if self.skip is not None and self.skip(item, sha256):
            return Sample(index, sha256, skipped=True)
        try:
            image = decode(data, self.max_pixels, self.preprocess.resize)
            del data
            tensor, box = self.preprocess(image)
            size = (image.shape[1], image.shape[2])
            picture = None if self.overlay_side is None else overlay_image(image, self.overlay_side)
        except ImageError as error:
            return Sample(index, sha256, error=str(error))
        except Exception as error:  # e.g. out of memory on an extreme aspect ratio
            reason = f"cannot process image: {type(error).__name__}: {_one_line(error)}"
            return Sample(index, sha256, error=reason)
        return Sample(index, sha256, tensor, picture, box, size)


@dataclass
class Batch:
    """A collated batch: stacked inputs of the good samples, plus the skipped and failed indices."""

    indices: list[int]
    inputs: torch.Tensor  # (N, 3, h, w) float; an empty tensor when N = 0
    images: list[torch.Tensor]  # the overlay pictures, uint8 (3, h, w) (none when the dataset makes none)
    boxes: torch.Tensor  # (N, 4) float64, (x0, y0, x1, y1) in original pixels
    sizes: list[tuple[int, int]]  # (H, W) of the originals
    sha256: list[str]
    skipped: list[tuple[int, str]]  # (index, sha256)
    failed: list[tuple[int, str]]  # (index, error)

    def pin_memory(self) -> Batch:
        """Copy the tensors into page-locked memory (DataLoader(pin_memory=True) calls this)."""
        return dataclasses.replace(
            self, inputs=self.inputs.pin_memory(), images=[image.pin_memory() for image in self.images]
        )


def collate(samples: list[Sample]) -> Batch:
    """Stack the good samples and list the skipped and failed ones; ValueError if input sizes differ."""
    good = [s for s in samples if s.input is not None]
    sizes = sorted({tuple(s.input.shape[-2:]) for s in good})
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes)
        raise ValueError(
            f"cannot batch model inputs of different sizes ({shown}): set a crop or an exact (h, w) resize, "
            "or use batch size 1"
        )
    return Batch(
        indices=[s.index for s in good],
        inputs=torch.stack([s.input for s in good]) if good else torch.empty(0),
        images=[s.image for s in good if s.image is not None],
        boxes=torch.tensor([s.box for s in good], dtype=torch.float64).reshape(-1, 4),
        sizes=[s.size for s in good],
        sha256=[s.sha256 for s in good],
        skipped=[(s.index, s.sha256) for s in samples if s.skipped],
        failed=[(s.index, s.error) for s in samples if s.error is not None],
    )


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    batches: Iterable[list[int]] | None = None,
) -> DataLoader:
    """A DataLoader yielding Batches in input order, decoding in `workers` processes (0: in this one).

    `batches` (index lists) replaces the default: consecutive batches of `batch_size` over every input.
    """
    if batches is None:
        batches = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=_ignore_interrupts,
    )


def _ignore_interrupts(_worker_id: int) -> None:
    """Workers leave Ctrl-C and SIGTERM to the main process, which stops the run at a batch boundary
    (workers exit when it does)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
