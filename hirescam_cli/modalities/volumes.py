"""The second modality: volumes (CT, MRI), NIfTI files and DICOM series (volume_files.py).

The declared preprocessing (volume_settings.py: reorient, resample to a spacing, window and scale, resize,
centre-crop or pad) is a chain of affine maps of voxel coordinates; their composition, `to_input`, takes a
model-input voxel to an input voxel, and the input's affine takes that to world millimetres (RAS), so
every map cell has a known place in the scan. Maps go back onto the input's own voxel grid, each voxel
taking the value of the cell it lies in, and are written with the input's affine (volume_maps.py: NIfTI
files and pictures of three planes and the most explained slices).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..batches import Batch
from ..config import Config, ConfigError
from .volume_files import read_volume
from .volume_settings import VolumePreprocess

DISPLAY_PERCENTILES = (
    1.0,
    99.0,
)  # the picture's window when neither render.window nor preprocess.window is set


@dataclass(frozen=True)
class VolumeView:
    """One volume as the outputs need it: its grid and geometry, what its NIfTI maps copy of its header,
    what the summary says of its source, and the windowed scan the pictures are drawn on."""

    shape: tuple[int, int, int]  # the input's voxel grid (I, J, K)
    affine: np.ndarray  # (4, 4): input voxel -> world RAS mm
    to_input: np.ndarray  # (4, 4): model-input voxel -> input voxel
    header: dict  # qform, sform and their codes, units
    facts: dict  # format, series
    scan: np.ndarray | None  # uint8 (I, J, K): the scan through the display window (None: no pictures)


@dataclass
class VolumeViews:
    """A batch's volumes: what `Volumes.collate` makes of its VolumeViews."""

    shapes: list[tuple[int, int, int]]
    affines: Tensor  # (N, 4, 4) float64
    to_input: Tensor  # (N, 4, 4) float64
    input_size: tuple[int, int, int]
    headers: list[dict]
    facts: list[dict]
    scans: list[Tensor | None]  # emptied as the pictures are drawn

    def pin_memory(self) -> "VolumeViews":
        """Page-locked scans, for quick copies to a GPU."""
        return replace(self, scans=[s.pin_memory() if s is not None else None for s in self.scans])


@dataclass(frozen=True)
class Volumes:
    """Volumes in, maps on the input's voxel grid out (see the `modalities` package)."""

    kind: ClassVar[str] = "volumes"
    noun: ClassVar[str] = "volume"
    limit: ClassVar[str] = "any volume within preprocess.max_voxels"
    preprocess: VolumePreprocess
    display: tuple[float, float] | None = None  # the pictures' window (render.window)
    pictures: bool = True

    @classmethod
    def from_config(cls, config: Config, transforms: Any, pictures: bool = True) -> "Volumes":
        """The config's volume preprocessing; a model input of a fixed size is required."""
        if config.preprocess.input_size is None:
            raise ConfigError(
                "volumes need the model's input size: set preprocess.resize or preprocess.crop (voxels)"
            )
        return cls(config.preprocess, config.render.window, pictures)

    def __str__(self) -> str:
        return str(self.preprocess)

    def for_device(self, device: torch.device) -> "Volumes":
        """The same on every device: the workers decode every volume themselves."""
        return self

    def input_shape(self) -> tuple[int, ...]:
        """(1, I, J, K) of every model input."""
        return (1, *self.preprocess.input_size)

    def max_bytes(self) -> int:
        """The most a volume within max_voxels can take on disk: 8 bytes a voxel, plus headers."""
        return 8 * self.preprocess.max_voxels + 2**26

    def load(self, data: bytes | list[tuple[str, bytes]]) -> tuple[Tensor, VolumeView]:
        """The model input and the view of one volume's bytes; VolumeError (an InputFailure) for a bad one."""
        settings = self.preprocess
        volume = read_volume(data, settings.max_voxels, settings.uneven_slices)
        del data
        tensor, to_input = prepare(torch.from_numpy(volume.data), volume.affine, settings)
        scan = display_scan(volume.data, self.display or settings.window) if self.pictures else None
        view = VolumeView(
            tuple(volume.data.shape), volume.affine, to_input, volume.header, volume.facts, scan
        )
        return tensor, view

    def collate(self, views: Sequence[VolumeView]) -> VolumeViews:
        return VolumeViews(
            shapes=[v.shape for v in views],
            affines=torch.tensor(np.array([v.affine for v in views]), dtype=torch.float64).reshape(-1, 4, 4),
            to_input=torch.tensor(np.array([v.to_input for v in views]), dtype=torch.float64).reshape(
                -1, 4, 4
            ),
            input_size=self.preprocess.input_size,
            headers=[v.header for v in views],
            facts=[v.facts for v in views],
            scans=[torch.from_numpy(v.scan) if v.scan is not None else None for v in views],
        )

    def finish(self, batch: Batch, device: torch.device) -> Batch:
        """The batch as the workers left it: nothing is left to decode on the device."""
        return batch

    def describe(self, views: VolumeViews, row: int) -> dict:
        """The summary fields of one volume: its grid, spacing, orientation and affine, where it came from,
        the geometry of the model input in it, and its pictures' size."""
        from nibabel.orientations import aff2axcodes

        from .volume_maps import picture_layout

        affine = views.affines[row].numpy()
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
        layout = picture_layout(views.shapes[row], affine)
        return {
            "shape": list(views.shapes[row]),
            "spacing": [_g(v) for v in spacing],
            "orientation": "".join(aff2axcodes(affine)),
            "affine": [[_g(v) for v in line] for line in affine],
            "source": views.facts[row],
            "geometry": {
                "input_size": list(views.input_size),
                "model_to_voxel": [[_g(v) for v in line] for line in views.to_input[row].numpy()],
            },
            "overlay": {"width": layout.width, "height": layout.height, "mm_per_pixel": _g(layout.mm)},
        }

    def cells_to_voxels(self, grid: Sequence[int], views: VolumeViews) -> Tensor:
        """(N, 4, 4): map cell index (homogeneous) -> input voxel, for maps over `grid`."""
        size = torch.tensor(views.input_size, dtype=torch.float64)
        step = size / torch.tensor(list(grid), dtype=torch.float64)
        cells = torch.eye(4, dtype=torch.float64)
        cells[:3, :3] = torch.diag(step)
        cells[:3, 3] = step / 2 - 0.5
        return views.to_input @ cells

    def locate(self, maps: Tensor, views: VolumeViews) -> Tensor:
        """Peak of each map (B, T, *grid) as the input voxel [i, j, k] of its cell's centre -> (B, T, 3)."""
        voxels = self._peak_voxels(maps, views)
        shapes = torch.tensor(views.shapes, device=maps.device, dtype=torch.float64).reshape(-1, 1, 3)
        return voxels.add(0.5).floor().clamp(torch.zeros_like(shapes), shapes - 1).float()  # halves round up

    def _peak_voxels(self, maps: Tensor, views: VolumeViews) -> Tensor:
        """The peak cell's centre of each (B, T, *grid) map in input voxels (continuous), (B, T, 3)."""
        grid = maps.shape[2:]
        flat = maps.flatten(2).argmax(-1)
        cell = torch.stack(torch.unravel_index(flat, grid), -1).double()  # (B, T, 3)
        transform = self.cells_to_voxels(grid, views).to(maps.device)[:, None]  # (B, 1, 4, 4)
        return (transform[..., :3, :3] @ cell[..., None])[..., 0] + transform[..., :3, 3]

    def numbers(self, result, views: VolumeViews) -> dict[str, Tensor]:
        """Each map's peak in world millimetres, and per target the share of HiResCAM's positive mass on each
        slice of the grid's slice axis (the one nearest the world's z), with the top 5 slices."""
        extra = {}
        affines = views.affines.to(result.logits.device)[:, None]  # (B, 1, 4, 4)
        for name, maps in result.maps.items():
            voxels = self.locate(maps, views).double()
            world = (affines[..., :3, :3] @ voxels[..., None])[..., 0] + affines[..., :3, 3]
            extra[f"{name}.peak_world"] = world.float()
        hires = result.maps.get("hirescam")
        if hires is None:
            return extra
        axes = slice_axes(self.cells_to_voxels(hires.shape[2:], views), views.affines)
        positive = hires.clamp_min(0)
        shares = []
        for row, axis in enumerate(axes):
            mass = positive[row].sum([a + 1 for a in range(3) if a != axis])  # (T, slices)
            total = mass.sum(-1, keepdim=True)
            shares.append(torch.where(total > 0, mass / torch.where(total > 0, total, 1.0), 0.0))
        longest = max(s.shape[-1] for s in shares)
        stacked = torch.stack([F.pad(s, (0, longest - s.shape[-1]), value=float("nan")) for s in shares])
        extra["slice_axis"] = torch.tensor(axes, device=hires.device)[:, None].expand(-1, hires.shape[1])
        extra["slice_shares"] = stacked
        top = min(5, longest)
        extra["top_slices"] = stacked.nan_to_num(-1.0).topk(top, dim=-1, sorted=True).indices
        return extra

    def map_files(self, save_raw: bool) -> dict[str, str]:
        """Every map as a NIfTI file on the input's grid; with --save-raw also the raw map on its own grid."""
        return {"nifti": ".nii.gz", **({"grid_nifti": ".grid.nii.gz"} if save_raw else {})}

    def renderer(self, config: Config, device: torch.device, labels: list[str] | None = None):
        """What writes a batch's maps as NIfTI files and pictures, in parts (volume_maps.Renderer)."""
        from .volume_maps import Renderer

        return Renderer(self, config, device, labels)

    def mask_folder(self, key: str) -> str:
        """Where eval finds an input's masks, under MASKS: `a/x.nii.gz` -> `a/x`; a DICOM series: its key."""
        for suffix in MASK_SUFFIXES:
            if key.lower().endswith(suffix):
                return key[: -len(suffix)]
        return key

    def load_masks(
        self,
        folder: Path,
        labels: list[str],
        views: VolumeViews,
        row: int,
        problems: list[str],
        empty: list[Path],
    ) -> dict[int, np.ndarray]:
        """{class id: bool (I, J, K)} of every non-empty FOLDER/<label>.nii(.gz) on the volume's grid (its
        shape, and its affine within 1e-3 mm): voxels above 0 are the lesion; the empty ones (the class is
        absent) go to `empty`, what cannot be used to `problems`."""
        import nibabel as nib

        found = {}
        shape, affine = views.shapes[row], views.affines[row].numpy()
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            label = next((path.name[: -len(s)] for s in MASK_SUFFIXES if path.name.lower().endswith(s)), None)
            if label is None:
                continue
            if label not in labels:
                problems.append(f"{path}: {label!r} is not a label of the model")
                continue
            try:
                image = nib.load(path)
                mask = np.asarray(image.dataobj) > 0
            except Exception as e:  # nibabel's errors for bad headers, truncated gzip or voxel data
                problems.append(f"{path}: cannot read ({e})")
                continue
            if mask.shape != shape:
                problems.append(f"{path}: mask is {_x(mask.shape)} voxels, the volume {_x(shape)}")
            elif not np.allclose(image.affine, affine, rtol=0, atol=1e-3):
                problems.append(f"{path}: the mask's affine is not the volume's")
            elif not mask.any():
                empty.append(path)
            else:
                found[labels.index(label)] = mask
        return found

    def to_original(self, maps: Tensor, views: VolumeViews, rows: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Maps (N, *grid) onto the voxels of the volumes of batch rows `rows`, as the NIfTI maps are (each
        voxel takes the value of the cell it lies in, `volume_maps.to_voxels`): (N, *largest) over the
        largest of those grids, NaN on voxels the model input does not cover; and bool (N, *largest), each
        volume's own voxels (False on the padding beyond a smaller one)."""
        from .volume_maps import to_voxels

        shape = np.max([views.shapes[row] for row in rows], axis=0).tolist()
        out = torch.full((len(rows), *shape), torch.nan, dtype=torch.float32, device=maps.device)
        voxels = torch.zeros((len(rows), *shape), dtype=torch.bool, device=maps.device)
        cells = self.cells_to_voxels(maps.shape[1:], views)
        pairs = torch.tensor(list(rows))
        for row in sorted(set(rows)):  # the pairs of one volume together: they share its geometry
            chosen = (pairs == row).nonzero()[:, 0].to(maps.device)
            grid = views.shapes[row]
            resampled, inside = to_voxels(maps[chosen].float(), cells[row].to(maps.device), grid)
            own = (chosen, *(slice(0, n) for n in grid))
            out[own] = resampled.masked_fill(~inside, torch.nan)
            voxels[own] = True
        return out, voxels


MASK_SUFFIXES = (".nii.gz", ".nii")


def _x(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _g(value: float) -> float:
    return float(f"{float(value):.7g}")


def slice_axes(cells_to_voxels: Tensor, affines: Tensor) -> list[int]:
    """Per volume, the map axis whose direction in the world is nearest the z axis (superior)."""
    world = affines[:, :3, :3] @ cells_to_voxels[:, :3, :3]  # (N, 3, 3): a step along each map axis in mm
    return world[:, 2].abs().div(world.norm(dim=1)).argmax(-1).tolist()


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """The voxel's size along each voxel axis, in mm."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))


def _scaling(old: Sequence[int], new: Sequence[int]) -> np.ndarray:
    """The voxel map of a resize from `old` to `new` voxels (centres aligned, align_corners=False)."""
    scale = np.asarray(old, dtype=np.float64) / np.asarray(new, dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag(scale)
    matrix[:3, 3] = scale / 2 - 0.5
    return matrix


def _crop_start(size: int, crop: int) -> int:
    """Where a centre crop of `crop` starts in `size` voxels (negative: padded)."""
    return -((crop - size) // 2) if crop > size else round((size - crop) / 2.0)


def _resize(volume: Tensor, size: Sequence[int], interpolation: str) -> Tensor:
    mode = "trilinear" if interpolation == "trilinear" else "nearest-exact"
    options = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(volume[None, None], size=list(size), mode=mode, **options)[0, 0]


def prepare(volume: Tensor, affine: np.ndarray, settings: VolumePreprocess) -> tuple[Tensor, np.ndarray]:
    """The model input (1, *input_size) float32 of a volume (I, J, K) and `to_input` (4, 4): model-input
    voxel -> input voxel, the composition of every step's voxel map."""
    from nibabel import orientations

    to_input = np.eye(4)
    volume = volume.float()
    if settings.orientation != "none":
        transform = orientations.ornt_transform(
            orientations.io_orientation(affine), orientations.axcodes2ornt(settings.orientation)
        )
        to_input = to_input @ orientations.inv_ornt_aff(transform, volume.shape)
        volume = torch.from_numpy(
            np.ascontiguousarray(orientations.apply_orientation(volume.numpy(), transform))
        )
    if settings.spacing is not None:
        sizes = voxel_sizes(affine @ to_input)
        extents = [n * s / t for n, s, t in zip(volume.shape, sizes, settings.spacing, strict=True)]
        shape = [max(1, math.floor(e + 0.5 + 1e-6)) for e in extents]  # halves up, whatever the rounding of s
        to_input = to_input @ _scaling(volume.shape, shape)
        volume = _resize(volume, shape, settings.interpolation)
    low = None
    if settings.window is not None:
        low, high = settings.window
        volume = volume.clamp_(low, high).sub_(low).div_(high - low)
        low = 0.0
    if settings.resize is not None:
        to_input = to_input @ _scaling(volume.shape, settings.resize)
        volume = _resize(volume, settings.resize, settings.interpolation)
    if settings.crop is not None:
        starts = [_crop_start(n, c) for n, c in zip(volume.shape, settings.crop, strict=True)]
        shift = np.eye(4)
        shift[:3, 3] = starts
        to_input = to_input @ shift
        fill = float(volume.min()) if low is None else low
        volume = crop_or_pad(volume, starts, settings.crop, fill)
    volume = volume.sub_(settings.mean).div_(settings.std)
    return volume[None].contiguous(), to_input


def crop_or_pad(volume: Tensor, starts: Sequence[int], size: Sequence[int], fill: float) -> Tensor:
    """The box of `size` voxels starting at `starts` (negative: before the volume), `fill` outside it."""
    out = volume.new_full(tuple(size), fill)
    source, target = [], []
    for start, length, extent in zip(starts, size, volume.shape, strict=True):
        low, high = max(0, start), min(extent, start + length)
        source.append(slice(low, max(low, high)))
        target.append(slice(low - start, low - start + max(0, high - low)))
    out[tuple(target)] = volume[tuple(source)]
    return out


def display_scan(voxels: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """The scan through its display window as uint8 (the window's low end black, its high end white); with
    no window, the 1st and 99th percentiles of the voxels (of a sample of at most 2**20)."""
    if window is None:
        flat = voxels.reshape(-1)
        sample = flat[:: max(1, len(flat) // 2**20)]
        window = tuple(float(v) for v in np.percentile(sample, DISPLAY_PERCENTILES))
    low, high = window
    span = high - low if high > low else 1.0
    scaled = (voxels - np.float32(low)) * np.float32(255.0 / span)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
