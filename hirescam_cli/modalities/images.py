"""The first modality: 2-D pictures. Pillow decoding (image_files.py), resize and centre crop with the
crop box kept, so a map cell lands on the pixels its input came from, and overlays drawn on the
original at its size up to `output.max_side` (image_overlays.py).

On a CUDA device the loader's workers only read a plain JPEG's header and hand its bytes through; the
main process decodes the batch's JPEGs there at once (nvJPEG, `finish`), turns them upright and
preprocesses them on the device. Any other file, and a JPEG the device cannot decode, is decoded with
Pillow on the CPU, one by one, as everywhere else.
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from ..batches import Batch, one_line, stack
from ..config import Config, ConfigError, PreprocessConfig
from .image_files import ImageError, decode, jpeg_header

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Pending:
    """A JPEG the workers left to the device: its bytes and EXIF orientation."""

    data: Tensor  # uint8 (n,): the file
    orientation: int  # 1..8


@dataclass(frozen=True)
class PictureView:
    """One picture as the outputs need it: its original size, the box the model input covers, and the
    picture its overlays are drawn on (None where no overlays are drawn, or until `finish` decodes it)."""

    size: tuple[int, int]  # (H, W) of the original
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in original pixels
    picture: Tensor | None  # uint8 (3, h, w): the original, scaled down beyond max_side
    pending: Pending | None = None  # a JPEG to decode on the device: no input, box or picture yet


@dataclass
class PictureViews:
    """A batch's pictures: what `Images.collate` makes of its PictureViews."""

    sizes: list[tuple[int, int]]
    boxes: Tensor  # (N, 4) float64
    pictures: list[Tensor | None]  # emptied as the overlays are drawn; [] where none are drawn
    pending: list[Pending | None]  # the JPEGs `Images.finish` decodes on the device

    def pin_memory(self) -> "PictureViews":
        """Page-locked pictures, for quick copies to a GPU."""
        pinned = [p.pin_memory() if p is not None else None for p in self.pictures]
        return replace(self, pictures=pinned)


@dataclass(frozen=True)
class Images:
    """2-D pictures in, overlays registered on the original out (see the `modalities` package)."""

    kind: ClassVar[str] = "images"
    noun: ClassVar[str] = "image"  # what one input is, in messages
    limit: ClassVar[str] = "any image within --max-pixels"  # what max_bytes stands for, in messages
    preprocess: "Preprocess"
    max_pixels: int | None = None  # larger pictures are refused (decompression bombs)
    max_side: int | None = None  # overlay pictures' long side at most; None: no overlay pictures
    jpeg_on_device: bool = False  # the workers hand plain JPEGs through for `finish` to decode

    @classmethod
    def from_config(cls, config: Config, transforms: Any, pictures: bool = True) -> "Images":
        """The config's preprocessing (the model's preset where the config is silent) and output size."""
        preprocess = make_preprocess(config.preprocess, transforms)
        return cls(preprocess, config.preprocess.max_pixels, config.output.max_side if pictures else None)

    def __str__(self) -> str:
        return str(self.preprocess)

    def for_device(self, device: torch.device) -> "Images":
        """The modality as the loader's workers run it for batches bound to `device`: on CUDA, JPEGs
        reach `finish` undecoded, to be decoded there."""
        return replace(self, jpeg_on_device=device.type == "cuda")

    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of every model input."""
        return (3, *self.preprocess.input_size)

    def max_bytes(self) -> int | None:
        """The largest file a picture within max_pixels can be: 8 bytes a pixel (16-bit RGBA,
        uncompressed) plus room for metadata."""
        return None if self.max_pixels is None else 8 * self.max_pixels + 2**24

    def load(self, data: bytes) -> tuple[Tensor | None, PictureView]:
        """The model input and the view of one file's bytes (no input yet for a JPEG left to the device);
        ImageError (an InputFailure) for a bad one."""
        header = jpeg_header(data, self.max_pixels, self.preprocess.resize) if self.jpeg_on_device else None
        if header is not None:
            file = Pending(torch.frombuffer(bytearray(data), dtype=torch.uint8), header.orientation)
            return None, PictureView(header.size, (0.0, 0.0, 0.0, 0.0), None, file)
        image = torch.from_numpy(decode(data, self.max_pixels, self.preprocess.resize))
        del data
        tensor, box = self.preprocess(image)
        picture = None if self.max_side is None else overlay_image(image, self.max_side)
        return tensor, PictureView((image.shape[1], image.shape[2]), box, picture)

    def numbers(self, result, views: PictureViews) -> dict[str, Tensor]:
        """No summary numbers beyond the common ones."""
        return {}

    def map_files(self, save_raw: bool) -> dict[str, str]:
        """No files per map beyond its picture and raw array."""
        return {}

    def collate(self, views: Sequence[PictureView]) -> PictureViews:
        return PictureViews(
            sizes=[v.size for v in views],
            boxes=torch.tensor([v.box for v in views], dtype=torch.float64).reshape(-1, 4),
            # one per view where overlays are drawn (None until `finish` decodes a pending one)
            pictures=[v.picture for v in views if v.picture is not None or self.max_side is not None],
            pending=[v.pending for v in views],
        )

    def finish(self, batch: Batch, device: torch.device) -> Batch:
        """The batch ready for the model: the JPEGs the workers left undecoded are decoded on `device` at
        once, turned upright and preprocessed there (their overlay pictures made); one that the device
        cannot decode is decoded on the CPU instead, and one that is corrupt fails alone."""
        views = batch.views
        rows = [row for row, pending in enumerate(views.pending) if pending is not None]
        if not rows:
            return batch
        inputs, boxes, pictures = list(batch.inputs), views.boxes.clone(), list(views.pictures)
        sizes, failed = list(views.sizes), []
        for row, image in zip(rows, self._decode([views.pending[r] for r in rows], device), strict=True):
            if isinstance(image, str):
                failed.append((batch.indices[row], image))
                continue
            inputs[row], box = self.preprocess(image)
            boxes[row], sizes[row] = torch.tensor(box, dtype=torch.float64), tuple(image.shape[1:])
            if self.max_side is not None:
                pictures[row] = overlay_image(image, self.max_side)
        good = [row for row, tensor in enumerate(inputs) if tensor is not None]
        views = PictureViews(
            sizes=[sizes[r] for r in good],
            boxes=boxes[good],
            pictures=[pictures[r] for r in good] if self.max_side is not None else [],
            pending=[None] * len(good),
        )
        return replace(
            batch,
            indices=[batch.indices[r] for r in good],
            inputs=stack([inputs[r].to(device, non_blocking=True) for r in good]),
            views=views,
            sha256=[batch.sha256[r] for r in good],
            failed=batch.failed + failed,
        )

    def _decode(self, pending: list[Pending], device: torch.device) -> list[Tensor | str]:
        """Upright uint8 (3, H, W) pictures of JPEGs on `device`, in one batch where it decodes them all,
        else one by one; where it cannot, decoded on the CPU (Pillow), or the reason that failed too."""
        files = [p.data for p in pending]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision points to torchcodec
            try:
                decoded: list[Tensor | None] = device_decode(files, device)
            except Exception:  # one corrupt file fails the batch: find it
                decoded = [_or_none(device_decode, [file], device) for file in files]
        pictures: list[Tensor | str] = []
        for image, one in zip(decoded, pending, strict=True):
            if image is not None:
                pictures.append(upright(image, one.orientation))
                continue
            try:
                on_cpu = decode(one.data.numpy().tobytes(), self.max_pixels, self.preprocess.resize)
                pictures.append(torch.from_numpy(on_cpu).to(device))
            except ImageError as error:
                pictures.append(str(error))
            except Exception as error:
                pictures.append(f"cannot process image: {type(error).__name__}: {one_line(error)}")
        return pictures

    def describe(self, views: PictureViews, row: int) -> dict:
        """The summary fields of one picture: its size, its overlays' (the PNGs') size and scale, and the box
        of the original its maps cover (what image_geometry registers them through)."""
        (height, width), (shown_height, shown_width) = views.sizes[row], views.pictures[row].shape[1:]
        return {
            "width": int(width),
            "height": int(height),
            "overlay": {
                "width": int(shown_width),
                "height": int(shown_height),
                "scale": max(shown_width, shown_height) / max(width, height),
            },
            "box": [float(v) for v in views.boxes[row].tolist()],
        }

    def locate(self, maps: Tensor, views: PictureViews) -> Tensor:
        """Peak of each map (B, T, h, w) as (x, y) in original-image pixels -> (B, T, 2)."""
        height, width = maps.shape[-2:]
        flat = maps.flatten(-2).argmax(-1)
        row, col = flat // width, flat % width
        boxes = views.boxes.to(maps.device, torch.float32)[:, None]  # (B, 1, 4)
        x = boxes[..., 0] + (col + 0.5) / width * (boxes[..., 2] - boxes[..., 0])
        y = boxes[..., 1] + (row + 0.5) / height * (boxes[..., 3] - boxes[..., 1])
        return torch.stack([x, y], -1).floor()

    def renderer(self, config: Config, device: torch.device, labels: list[str] | None = None):
        """What draws a batch's overlays, in parts (image_overlays.Renderer; pictures carry no labels)."""
        from .image_overlays import Renderer

        return Renderer(config, device)

    def mask_folder(self, key: str) -> str:
        """Where eval finds an input's masks, under MASKS: `a/x.png` -> `a/x`."""
        return Path(key).with_suffix("").as_posix()

    def load_masks(
        self,
        folder: Path,
        labels: list[str],
        views: PictureViews,
        row: int,
        problems: list[str],
        empty: list[Path],
    ) -> dict[int, np.ndarray]:
        """{class id: bool (H, W)} of every non-empty FOLDER/<label>.png of the picture's size; the empty
        ones (the class is absent) go to `empty`, what cannot be used to `problems`."""
        from PIL import Image

        found = {}
        size = views.sizes[row]
        for path in sorted(folder.glob("*.png")):
            if path.stem not in labels:
                problems.append(f"{path}: {path.stem!r} is not a label of the model")
                continue
            try:
                with Image.open(path) as image:
                    mask = np.asarray(image.convert("L")) > 127
            except OSError as e:
                problems.append(f"{path}: cannot read ({e})")
                continue
            if mask.shape != size:
                shown = f"{mask.shape[1]}x{mask.shape[0]}, image is {size[1]}x{size[0]}"
                problems.append(f"{path}: mask is {shown}")
                continue
            if not mask.any():
                empty.append(path)
                continue
            found[labels.index(path.stem)] = mask
        return found

    def to_original(self, maps: Tensor, views: PictureViews, rows: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Maps (N, h, w) registered onto the original pictures of batch rows `rows` through the crop box,
        as the overlays are (bilinear, `image_overlays.register`): (N, H, W) over the largest of those
        pictures, NaN on pixels the model input does not cover; and bool (N, H, W), each picture's own
        pixels (False on the padding beyond a smaller one)."""
        from .image_overlays import covered, register

        sizes = torch.tensor([views.sizes[row] for row in rows], device=maps.device).view(-1, 2)
        height, width = sizes.amax(0).tolist()
        boxes = views.boxes[list(rows)].to(maps.device)
        resampled = register(maps[:, None], boxes, range(height), width)
        inside = covered(boxes, range(height), width)
        ys = torch.arange(height, device=maps.device)[None, :, None]
        xs = torch.arange(width, device=maps.device)[None, None, :]
        pixels = (ys < sizes[:, 0, None, None]) & (xs < sizes[:, 1, None, None])
        return resampled[:, 0].masked_fill(~inside, torch.nan), pixels


def device_decode(files: list[Tensor], device: torch.device) -> list[Tensor]:
    """JPEG files (uint8 (n,) on the host) decoded to RGB on `device` in one call: nvJPEG on CUDA."""
    return torchvision.io.decode_jpeg(files, mode=torchvision.io.ImageReadMode.RGB, device=device)


def _or_none(decode_files, files: list[Tensor], device: torch.device) -> Tensor | None:
    """The one picture `decode_files` makes of `files`, or None where it fails."""
    try:
        return decode_files(files, device)[0]
    except Exception:
        return None


def upright(image: Tensor, orientation: int) -> Tensor:
    """A (C, H, W) picture as stored turned upright by its EXIF orientation (as Pillow's exif_transpose)."""
    turns = {
        2: lambda t: t.flip(-1),
        3: lambda t: t.flip(-1, -2),
        4: lambda t: t.flip(-2),
        5: lambda t: t.transpose(-1, -2),
        6: lambda t: t.rot90(-1, (-2, -1)),
        7: lambda t: t.transpose(-1, -2).flip(-1, -2),
        8: lambda t: t.rot90(1, (-2, -1)),
    }
    return turns[orientation](image).contiguous() if orientation in turns else image


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


def _crop_start(size: int, crop: int, rounding: str = "round") -> int:
    """Where a centre crop starts along one axis (negative when it pads): torchvision's center_crop rounds
    half the margin to even ("round"), Hugging Face's image processors take its floor ("floor")."""
    if crop > size:
        return -((crop - size) // 2)
    return (size - crop) // 2 if rounding == "floor" else round((size - crop) / 2.0)


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
CROP_ROUNDINGS = ("round", "floor")


@dataclass(frozen=True)
class Preprocess:
    """Resize (antialiased), centre-crop and normalise a uint8 image, keeping the covered region."""

    resize: int | tuple[int, int] | None  # int: shorter side (aspect kept); (h, w): exact size
    crop: int | tuple[int, int] | None  # centre crop after the resize; zero-padded when larger
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # of the resize: bilinear or bicubic (antialiased), or nearest
    crop_rounding: str = "round"  # where an odd margin puts the crop: round (torchvision) or floor (HF)

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
        if self.crop_rounding not in CROP_ROUNDINGS:
            raise ValueError(f"crop_rounding must be round or floor; got {self.crop_rounding!r}")

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
            top = _crop_start(resized_h, out_h, self.crop_rounding)
            left = _crop_start(resized_w, out_w, self.crop_rounding)
            image = TF.crop(image, top, left, out_h, out_w)  # zero-padded where the crop is larger
        box = (
            left * width / resized_w,
            top * height / resized_h,
            (left + out_w) * width / resized_w,
            (top + out_h) * height / resized_h,
        )
        tensor = image.to(torch.float32, memory_format=torch.contiguous_format).div_(255)  # planar input
        tensor = TF.normalize(tensor, list(self.mean), list(self.std), inplace=True)
        return tensor, box


def make_preprocess(config: PreprocessConfig, transforms: Any) -> "Preprocess":
    """Config values, else the model's preset (torchvision weights, timm, Hugging Face), else ImageNet's
    256 / 224.

    A preset has resize_size, crop_size (None: no crop), mean, std and interpolation, and may have
    crop_rounding (where an odd margin puts the centre crop; torchvision's rounding otherwise).
    """
    resize = config.resize or (_preset_size(transforms.resize_size) if transforms else 256)
    crop = config.crop
    if crop is None and not isinstance(config.resize, tuple):  # an exact resize in the config: no crop
        crop = _preset_size(transforms.crop_size) if transforms else 224
    mean = config.mean or (tuple(transforms.mean) if transforms else IMAGENET_MEAN)
    std = config.std or (tuple(transforms.std) if transforms else IMAGENET_STD)
    preset = getattr(transforms, "interpolation", "bilinear")
    interpolation = config.interpolation or getattr(preset, "value", preset)  # torchvision's is an enum
    if interpolation not in INTERPOLATIONS:  # a Hugging Face processor's lanczos, say
        raise ConfigError(
            f"the model's preprocessing resamples with {interpolation}, which this one does not have: set "
            "preprocess.interpolation (bilinear, bicubic or nearest)"
        )
    rounding = getattr(transforms, "crop_rounding", "round")
    _check_crop(config, resize, crop, "the model's preset" if transforms else "the default")
    return Preprocess(resize, crop, mean, std, interpolation, rounding)


def _check_crop(config: PreprocessConfig, resize, crop, origin: str) -> None:
    """Refuse a crop larger than the resized picture: the model would see zero padding round every picture."""
    if crop is None or resize is None:
        return
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
    if isinstance(resize, int):
        larger = max(crop_h, crop_w) > resize  # the shorter side is `resize`, whichever way up the picture is
    else:
        larger = crop_h > resize[0] or crop_w > resize[1]
    if not larger:
        return
    crop_text = (
        f"preprocess.crop = {_size_text(crop)}"
        if config.crop
        else f"the crop of {_size_text(crop)} ({origin})"
    )
    resize_text = (
        f"preprocess.resize = {_size_text(resize)}"
        if config.resize
        else f"the resize of {_size_text(resize)} ({origin})"
    )
    raise ConfigError(
        f"{crop_text} is larger than {resize_text}: the model would see zero padding round every picture; "
        "make the crop at most the resize"
    )


def _size_text(size) -> str:
    return str(size) if isinstance(size, int) else str(list(size))


def _preset_size(size: list[int] | None) -> int | tuple[int, int] | None:
    """A preset's [side] or [h, w] as the Preprocess size (None: none)."""
    if size is None:
        return None
    return size[0] if len(size) == 1 else (size[0], size[1])
