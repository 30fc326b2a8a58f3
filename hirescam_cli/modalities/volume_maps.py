"""Maps of volumes back on their scans: every map resampled onto the input's own voxel grid (each voxel takes
the value of the map cell it lies in) and written as NIfTI with the input's affine, and a picture per map:
three orthogonal planes through its peak and the most explained axial slices, the windowed scan under
them, at the true aspect ratio, in radiological convention (the patient's right on the left)."""

import gzip
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import render
from ..config import Config
from ..engine.explainer import Explanation
from ..render import Part

PART_VOXELS = 2**25  # map voxels handed to the writers at once (128 MiB of float32)
LONGEST = 256  # pixels of the volume's longest extent in the planes
TITLE, LABEL, GAP, BAR = 20, 16, 6, 10  # heights (and the gap) of the picture's rows, in pixels
TOP_SLICES = 5
BACKGROUND = 24
GZIP_LEVEL = 6


@dataclass(frozen=True)
class NiftiPayload:
    """A float32 map with the header fields of its grid, encoded to .nii.gz by a writer."""

    data: np.ndarray  # float32 (I, J, K)
    header: dict  # qform, qform_code, sform, sform_code, xyzt_units

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def encode(self) -> bytes:
        """The .nii.gz bytes (gzip without a time stamp, so equal maps give equal files)."""
        import nibabel as nib

        image = nib.Nifti1Image(self.data.astype(np.float32, copy=False), None)
        if self.header["sform"] is not None:
            image.set_sform(self.header["sform"], self.header["sform_code"])
        if self.header["qform"] is not None:
            image.set_qform(self.header["qform"], self.header["qform_code"])
        image.header["xyzt_units"] = self.header["xyzt_units"]
        image.header.set_data_dtype(np.float32)
        return gzip.compress(image.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)


def grid_header(header: dict, affine: np.ndarray) -> dict:
    """The header of a map on its own grid: `affine` (cell -> world), coded as the input is (else aligned)."""
    code = header["sform_code"] or header["qform_code"] or 2
    return {"qform": affine, "qform_code": code, "sform": affine, "sform_code": code, "xyzt_units": 2}


def to_voxels(values: Tensor, cells_to_voxels: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Maps (..., g1, g2, g3) on the input's voxel grid (..., I, J, K), each voxel taking the value of the
    cell it lies in, and a mask (I, J, K) of the voxels inside the model input (the others are 0).

    `cells_to_voxels` (4, 4) takes a cell index to an input voxel; every preprocessing step maps each axis
    on its own (flips, permutations, scalings, shifts), so each voxel axis reads one map axis.
    """
    grid = values.shape[-3:]
    linear, offset = cells_to_voxels[:3, :3], cells_to_voxels[:3, 3]
    axis_of = linear.abs().argmax(1).tolist()  # the map axis each voxel axis reads
    if sorted(axis_of) != [0, 1, 2] or int((linear != 0).sum()) != 3:
        raise ValueError("the volume's preprocessing does not map each axis on its own")
    index, inside = [], []
    for axis, length in enumerate(shape):
        voxel = torch.arange(length, dtype=torch.float64, device=values.device)
        cell = ((voxel - offset[axis]) / linear[axis, axis_of[axis]] + 0.5).floor().long()
        size = grid[axis_of[axis]]
        inside.append((cell >= 0) & (cell < size))
        index.append(cell.clamp(0, size - 1))
    lead = values.ndim - 3
    permuted = values.permute(*range(lead), *(lead + a for a in axis_of))
    resampled = permuted[..., index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    return resampled * mask, mask


@dataclass(frozen=True)
class Layout:
    """Where a volume's picture puts its planes, tiles and colour bar (sizes in pixels)."""

    mm: float  # millimetres per pixel in every plane
    planes: tuple[tuple[int, int], ...]  # (h, w) of the axial, coronal and sagittal planes
    tile: tuple[int, int]  # (h, w) of a montage tile (an axial slice at half size)
    tiles: int
    width: int
    height: int

    @property
    def planes_top(self) -> int:
        return TITLE

    @property
    def tiles_top(self) -> int:
        return TITLE + max(h for h, _ in self.planes) + LABEL + GAP

    @property
    def bar_top(self) -> int:
        return self.tiles_top + self.tile[0] + LABEL + GAP

    def plane_left(self, plane: int) -> int:
        return GAP + sum(w + GAP for _, w in self.planes[:plane])

    def tile_left(self, tile: int) -> int:
        return GAP + tile * (self.tile[1] + GAP)


def display_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel's orientation transform from the input's voxel axes to RAS ones (for pictures)."""
    from nibabel import orientations

    return orientations.ornt_transform(orientations.io_orientation(affine), orientations.axcodes2ornt("RAS"))


def picture_layout(shape: Sequence[int], affine: np.ndarray) -> Layout:
    """The layout of a volume's pictures, from its grid and affine alone (the summary states its size)."""
    transform = display_transform(affine)
    sizes = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    extent = np.zeros(3)
    for axis, (target, _) in enumerate(transform):
        extent[int(target)] = shape[axis] * sizes[axis]
    mm = float(extent.max()) / LONGEST
    x, y, z = (max(1, round(e / mm)) for e in extent)
    planes = ((y, x), (z, x), (z, y))  # axial, coronal, sagittal
    tile = (max(1, y // 2), max(1, x // 2))
    tiles = min(TOP_SLICES, shape[int(np.flatnonzero(transform[:, 0] == 2)[0])])
    width = max(GAP + sum(w + GAP for _, w in planes), GAP + tiles * (tile[1] + GAP), 160)
    height = TITLE + max(h for h, _ in planes) + LABEL + GAP + tile[0] + LABEL + GAP + BAR + LABEL
    return Layout(mm, planes, tile, tiles, width, height)


def reorient(volume: Tensor, transform: np.ndarray) -> Tensor:
    """A (..., I, J, K) tensor with its last three axes flipped and permuted as `transform` says."""
    lead = volume.ndim - 3
    flips = [lead + axis for axis, (_, flip) in enumerate(transform) if flip < 0]
    volume = volume.flip(flips) if flips else volume
    order = np.argsort(transform[:, 0]).tolist()
    return volume.permute(*range(lead), *(lead + a for a in order))


class Renderer:
    """Raw maps of a batch of volumes -> NIfTI payloads and pictures, on the device, in parts."""

    def __init__(self, volumes, config: Config, device: torch.device, labels: list[str] | None = None):
        self.volumes = volumes
        self.device = device
        self.methods = config.explain.methods
        self.alpha = config.render.alpha
        self.signed = config.render.signed
        self.save_raw = config.output.save_raw
        self.multilabel = config.model.multilabel
        self.labels = labels
        self.table = render.colormap_table(config.render.colormap, device)
        self.signed_table = render.colormap_table(config.render.signed_colormap, device)

    def parts(self, result: Explanation, batch) -> Iterator[Part]:
        """The pictures and NIfTI payloads of a batch's maps, in parts of at most PART_VOXELS map voxels (a
        whole map at least); a volume's scan is dropped from the views once its maps are drawn."""
        targets = result.classes.shape[1]
        views = batch.views
        values = {}
        for name in self.methods:
            signed = self.signed and name == "hirescam"
            values[name] = (render.normalize_signed if signed else render.normalize)(result.maps[name])
        grid = result.maps[self.methods[0]].shape[2:]
        cells = self.volumes.cells_to_voxels(grid, views)
        peaks = {name: self.volumes.locate(result.maps[name], views) for name in self.methods}
        probabilities = torch.sigmoid(result.logits) if self.multilabel else torch.softmax(result.logits, -1)
        probabilities = probabilities.gather(1, result.classes).tolist()
        classes, valid = result.classes.tolist(), result.valid.tolist()
        everything = len(self.methods) * targets
        sizes = [(1, int(np.prod(shape))) for shape in views.shapes]
        for rows, channels in render.plan_parts(sizes, everything, PART_VOXELS):
            layouts = [picture_layout(views.shapes[r], views.affines[r].numpy()) for r in rows]
            height, width = max(x.height for x in layouts), max(x.width for x in layouts)
            pictures = np.zeros((len(rows), len(channels), height, width, 3), np.uint8)
            files = {}
            for n, row in enumerate(rows):
                scan = views.scans[row]
                for c, channel in enumerate(channels):
                    method, t = self.methods[channel // targets], channel % targets
                    if not valid[row][t]:
                        continue
                    shape, cell = views.shapes[row], cells[row].to(self.device)
                    map_voxels, inside = to_voxels(values[method][row, t], cell, shape)
                    payloads = {"nifti": NiftiPayload(_host(map_voxels), views.headers[row])}
                    if self.save_raw:
                        affine = (views.affines[row] @ cells[row]).numpy()
                        raw = result.maps[method][row, t].float().cpu().numpy()
                        payloads["grid_nifti"] = NiftiPayload(raw, grid_header(views.headers[row], affine))
                    files[row, channel] = payloads
                    title = self._title(method, classes[row][t], probabilities[row][t])
                    signed = self.signed and method == "hirescam"
                    affine = views.affines[row].numpy()
                    picture, texts, marks = self._picture(
                        scan, map_voxels, inside, peaks[method][row, t], affine, layouts[n], signed
                    )
                    canvas = write_text(picture, layouts[n], title, texts, signed, marks)
                    pictures[n, c, : canvas.shape[0], : canvas.shape[1]] = canvas
                if channels.stop == everything:
                    views.scans[row] = None
            yield Part(rows, channels, targets, pictures, files)

    def _title(self, method: str, cls: int, probability: float) -> str:
        label = self.labels[cls] if self.labels and cls < len(self.labels) else str(cls)
        return f"{method}  {label} (class {cls})  p = {probability:.3f}"

    def _picture(self, scan, map_voxels, inside, peak, affine, layout: Layout, signed: bool):
        """The uint8 (H, W, 3) picture of one map (planes through its peak, its most explained axial slices)
        and the labels to write under them."""
        transform = display_transform(affine)
        table = self.signed_table if signed else self.table
        scan = reorient(scan.to(self.device), transform).float()
        values = reorient(map_voxels, transform)
        inside = reorient(inside, transform)
        point = [0, 0, 0]
        for axis, (target, flip) in enumerate(transform):
            index = int(peak[axis])
            point[int(target)] = index if flip > 0 else scan.shape[int(target)] - 1 - index
        x, y, z = point
        canvas = torch.full(
            (layout.height, layout.width, 3), BACKGROUND, dtype=torch.uint8, device=self.device
        )
        planes = [(scan[:, :, z], values[:, :, z], inside[:, :, z])]  # axial: (x, y)
        planes.append((scan[:, y, :], values[:, y, :], inside[:, y, :]))  # coronal: (x, z)
        planes.append((scan[x, :, :], values[x, :, :], inside[x, :, :]))  # sagittal: (y, z)
        texts = [f"axial z={z}", f"coronal y={y}", f"sagittal x={x}"]
        size = scan.shape  # the peak in each plane, as fractions of its rows and columns (radiological)
        marks = [
            ((size[1] - y - 0.5) / size[1], (size[0] - x - 0.5) / size[0]),
            ((size[2] - z - 0.5) / size[2], (size[0] - x - 0.5) / size[0]),
            ((size[2] - z - 0.5) / size[2], (size[1] - y - 0.5) / size[1]),
        ]
        for plane, (under, over, mask) in enumerate(planes):
            drawn = _draw(under, over, mask, layout.planes[plane], table, self.alpha, signed)
            top, left = layout.planes_top, layout.plane_left(plane)
            canvas[top : top + drawn.shape[0], left : left + drawn.shape[1]] = drawn
        for tile, (k, share) in enumerate(top_slabs(values, layout.tiles)):
            drawn = _draw(
                scan[:, :, k], values[:, :, k], inside[:, :, k], layout.tile, table, self.alpha, signed
            )
            top, left = layout.tiles_top, layout.tile_left(tile)
            canvas[top : top + drawn.shape[0], left : left + drawn.shape[1]] = drawn
            texts.append(f"z={k} {share:.0%}")
        bar = torch.linspace(-1 if signed else 0, 1, layout.width - 2 * (GAP + 24), device=self.device)
        index = ((bar + 1) / 2 if signed else bar).mul(255).round().long()
        left, top = GAP + 24, layout.bar_top
        canvas[top : top + BAR, left : left + len(bar)] = table[index][None]
        return _host(canvas), texts, marks


def top_slabs(values: Tensor, count: int) -> list[tuple[int, float]]:
    """The `count` axial slabs of a map on the voxel grid (X, Y, Z) with the most positive mass: runs of
    slices lying in the same map cells (equal mass), each as its middle slice and its share of the mass."""
    mass = values.clamp_min(0).sum((0, 1))
    runs, counts = torch.unique_consecutive(mass, return_counts=True)
    ends = counts.cumsum(0)
    middles = ends - counts + (counts - 1) // 2
    shares = runs * counts / mass.sum().clamp_min(torch.finfo(mass.dtype).tiny)
    order = torch.sort(shares, descending=True, stable=True).indices[:count]
    return [(int(middles[i]), float(shares[i])) for i in order]


def _draw(under: Tensor, over: Tensor, mask: Tensor, size, table, alpha: float, signed: bool) -> Tensor:
    """A plane (a, b) of the scan with its map blended over it, as an (h, w, 3) picture: rows are the plane's
    second axis from its high end down, columns its first from the high end (radiological)."""
    image = under.t().flip((0, 1))[None, None]
    values = over.t().flip((0, 1))[None, None].float()
    inside = mask.t().flip((0, 1))[None, None].float()
    image = F.interpolate(image, size=list(size), mode="bilinear", antialias=True, align_corners=False)
    values = F.interpolate(values, size=list(size), mode="nearest-exact")
    inside = F.interpolate(inside, size=list(size), mode="nearest-exact")[:, 0] > 0.5
    grey = image.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    positions = render.palette_positions(values, signed).mul_(inside[:, None])
    return render.overlay(positions, grey, table[None], alpha)[0, 0]


def write_text(
    picture: np.ndarray, layout: Layout, title: str, texts: list[str], signed: bool, marks=()
) -> np.ndarray:
    """The picture with its title, the planes' and tiles' labels, ticks at the peak on each plane's edges
    (`marks`: its row and column as fractions of the plane) and the colour bar's ends written on it."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    colour = (235, 235, 235)
    draw.text((GAP, 3), title, fill=colour)
    label_top = layout.planes_top + max(h for h, _ in layout.planes) + 2
    for plane, text in enumerate(texts[:3]):
        draw.text((layout.plane_left(plane), label_top), text, fill=colour)
    for plane in (0, 1):  # the patient's right is on the left of the axial and coronal planes
        draw.text((layout.plane_left(plane) + 2, layout.planes_top + 1), "R", fill=colour)
    draw.text((layout.plane_left(2) + 2, layout.planes_top + 1), "A", fill=colour)
    for tile, text in enumerate(texts[3:]):
        draw.text((layout.tile_left(tile), layout.tiles_top + layout.tile[0] + 2), text, fill=colour)
    for plane, (row, col) in enumerate(marks):
        top, left = layout.planes_top, layout.plane_left(plane)
        height, width = layout.planes[plane]
        y, x = top + row * height, left + col * width
        draw.line([(left - 4, y), (left - 1, y)], fill=colour)
        draw.line([(left + width, y), (left + width + 3, y)], fill=colour)
        draw.line([(x, top - 4), (x, top - 1)], fill=colour)
        draw.line([(x, top + height), (x, top + height + 3)], fill=colour)
    bar = layout.bar_top
    draw.text((GAP, bar - 2), "-1" if signed else "0", fill=colour)
    draw.text((layout.width - GAP - 18, bar - 2), "1", fill=colour)
    return np.asarray(image)


def _host(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
