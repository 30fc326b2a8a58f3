"""Volume files: which names are volumes, DICOM slices grouped into series, and NIfTI and DICOM decoding to a
float32 voxel array with its world geometry (RAS millimetres, as NIfTI's affine).

Imports no torch: folder walks ask `accepts` and `group` before the model loads. NIfTI goes through
nibabel, DICOM through pydicom (both numpy only).

Geometry. A volume's `affine` maps voxel (i, j, k, 1) to world (x, y, z, 1) in millimetres, RAS+ (x towards
the patient's right, y anterior, z superior), the NIfTI convention. A DICOM series is stacked with i along
the rows (the column index), j down the columns (the row index) and k along the slice normal
n = row direction x column direction, slices sorted by their position on n; DICOM's patient coordinates
(LPS+) become RAS by negating x and y.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputFailure

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SAME_POSITION_MM = 1e-3  # slices closer than this along the normal are at the same position
EVEN_TOLERANCE = 0.01  # consecutive slice spacings may differ by this fraction of the median (and 0.01 mm)
ORIENTATION_TOLERANCE = 1e-4  # direction cosines of one series' slices must agree to this
HEADER_BYTES = 540  # a NIfTI-2 header; NIfTI-1's is 348


class VolumeError(InputFailure):
    """One volume could not be used; str(error) is a one-line human reason."""


def accepts(name: str) -> bool:
    """Whether a file found in a folder walk may be (part of) a volume: a NIfTI or DICOM extension, or a
    name DICOM exports use (no extension, or a UID's digits after the last dot); `group` looks inside."""
    lower = name.lower()
    if lower.endswith(NIFTI_SUFFIXES + DICOM_SUFFIXES):
        return True
    extension = os.path.splitext(lower)[1]
    return extension == "" or extension[1:].isdigit()


def _is_nifti(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def _dicom_named(name: str) -> bool:
    return name.lower().endswith(DICOM_SUFFIXES)


def _has_preamble(path: str) -> bool:
    """Whether a file starts as DICOM Part 10 files do: 128 bytes, then "DICM"."""
    try:
        with open(path, "rb") as file:
            return file.read(132)[128:] == b"DICM"
    except OSError:
        return False


def series_of(path: str) -> str | None:
    """The SeriesInstanceUID of a DICOM file, read from its header (None: not a readable DICOM file)."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except Exception:  # pydicom raises many types on files that are not DICOM
        return None
    uid = header.get("SeriesInstanceUID")
    return str(uid) if uid else None


def group(folder: str, paths: Sequence[str]) -> Iterator[tuple[str, tuple[str, ...] | None]]:
    """The inputs that one folder's accepted files make: (input path, its files; None: the file alone).

    A NIfTI file is an input. DICOM files (a DICOM extension, or the DICM preamble) are grouped by
    SeriesInstanceUID into one input per series, named by the folder when it holds one series and by
    FOLDER/<SeriesInstanceUID> when it holds several. A file with a DICOM extension whose header cannot be
    read stays an input of its own (it ends as an error line); other files are not volumes and are left out.
    """
    series: dict[str, list[str]] = {}
    for path in sorted(paths):
        name = os.path.basename(path)
        if _is_nifti(name):
            yield path, None
            continue
        if not (_dicom_named(name) or _has_preamble(path)):
            continue
        uid = series_of(path)
        if uid is None:
            if _dicom_named(name) or os.path.islink(path):
                yield path, None
            continue
        series.setdefault(uid, []).append(path)
    for uid, members in sorted(series.items()):
        yield (folder if len(series) == 1 else os.path.join(folder, uid)), tuple(members)


@dataclass
class Volume:
    """A decoded volume: voxels in the input's units (CT: Hounsfield units) and its world geometry."""

    data: np.ndarray  # float32 (I, J, K)
    affine: np.ndarray  # float64 (4, 4): voxel -> world RAS mm
    header: dict = field(default_factory=dict)  # what an output NIfTI copies: qform, sform and their codes
    facts: dict = field(default_factory=dict)  # the summary's account of the source (format, series...)


def read_volume(data: bytes | list[tuple[str, bytes]], max_voxels: int, uneven: str = "error") -> Volume:
    """Decode a NIfTI file's bytes, or a DICOM series' (file name, bytes) pairs, to a Volume; VolumeError
    (one line) for anything that cannot be used."""
    if isinstance(data, list):
        return read_series(data, max_voxels, uneven)
    if not data:
        raise VolumeError("empty file")
    if data[:2] == b"\x1f\x8b" or _nifti_header(data[:HEADER_BYTES]) is not None:
        return read_nifti(data, max_voxels)
    if data[128:132] == b"DICM":
        return read_series([("", data)], max_voxels, uneven)
    raise VolumeError("not a NIfTI (.nii, .nii.gz) or DICOM file")


# -- NIfTI -----------------------------------------------------------------------------------------


def _nifti_header(head: bytes):
    """The NIfTI-1 or NIfTI-2 header class whose header this block starts with, else None."""
    from nibabel.nifti1 import Nifti1Header
    from nibabel.nifti2 import Nifti2Header

    for header in (Nifti2Header, Nifti1Header):
        if len(head) >= header.sizeof_hdr and header.may_contain_header(head[: header.sizeof_hdr]):
            return header
    return None


def _gunzip(data: bytes, max_voxels: int) -> bytes:
    """A .nii.gz file's bytes decompressed, its header checked before the rest is (a bomb never expands)."""
    inflate = zlib.decompressobj(wbits=31)
    try:
        head = inflate.decompress(data, HEADER_BYTES)
        header_class = _nifti_header(head)
        if header_class is None:
            raise VolumeError("a gzip file that is not NIfTI (.nii.gz)")
        header = header_class.from_fileobj(io.BytesIO(head), check=False)
        _check_shape(header.get_data_shape(), max_voxels)
        size = int(header.get_data_offset()) + int(np.prod(header.get_data_shape(), dtype=np.int64)) * int(
            header.get_data_dtype().itemsize
        )
        rest = inflate.decompress(inflate.unconsumed_tail, max(0, size - len(head)) + 1)
    except zlib.error as error:
        raise VolumeError(f"corrupt gzip data: {error}") from None
    whole = head + rest
    if len(whole) < size:
        raise VolumeError(f"truncated file: {len(whole)} of {size} bytes once decompressed")
    return whole[:size]


def _check_shape(shape: tuple[int, ...], max_voxels: int) -> None:
    """Refuse 4-D volumes and volumes over max_voxels, from the header alone."""
    if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
        raise VolumeError(
            f"a {len(shape)}-D NIfTI of shape {list(shape)} ({int(np.prod(shape[3:]))} volumes: time points "
            "or channels); give one 3-D volume per file"
        )
    voxels = int(np.prod(shape[:3], dtype=np.int64))
    if voxels > max_voxels:
        raise VolumeError(
            f"{list(shape[:3])} = {voxels} voxels exceeds the limit of {max_voxels} (preprocess.max_voxels)"
        )


def read_nifti(data: bytes, max_voxels: int) -> Volume:
    """A NIfTI-1 or NIfTI-2 file's bytes (gzipped or not) -> Volume."""
    import nibabel as nib

    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data, max_voxels)
    header_class = _nifti_header(data[:HEADER_BYTES])
    if header_class is None:
        raise VolumeError("not a NIfTI file (no NIfTI header)")
    image_class = nib.Nifti2Image if header_class.__name__ == "Nifti2Header" else nib.Nifti1Image
    try:
        image = image_class.from_bytes(data)
    except Exception as error:  # nibabel raises many types on bad headers
        raise VolumeError(f"corrupt NIfTI header: {_one_line(error)}") from None
    shape = image.header.get_data_shape()
    _check_shape(shape, max_voxels)
    affine = np.asarray(image.affine, dtype=np.float64)
    _check_affine(affine)
    try:
        voxels = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:  # a short file: "Expected N bytes, got M"
        raise VolumeError(f"truncated or corrupt voxel data: {_one_line(error)}") from None
    voxels = voxels.reshape(tuple(shape[:3]) + (1,) * (3 - len(shape[:3])))
    _check_finite(voxels)
    qform, qform_code = image.header.get_qform(coded=True)
    sform, sform_code = image.header.get_sform(coded=True)
    header = {
        "qform": None if qform is None else np.asarray(qform),
        "qform_code": int(qform_code),
        "sform": None if sform is None else np.asarray(sform),
        "sform_code": int(sform_code),
        "xyzt_units": int(image.header["xyzt_units"]),
    }
    return Volume(voxels, affine, header, {"format": "nifti"})


def _check_affine(affine: np.ndarray) -> None:
    """Refuse a voxel-to-world map that cannot be inverted (or holds NaN / infinities)."""
    linear = affine[:3, :3]
    if (
        not np.isfinite(affine).all()
        or abs(np.linalg.det(linear)) <= 1e-12 * max(1.0, np.abs(linear).max()) ** 3
    ):
        rows = np.array2string(linear, precision=4, separator=", ").replace("\n", "")
        raise VolumeError(f"non-invertible affine (voxel to world) {rows}: the volume has no usable geometry")


def _check_finite(voxels: np.ndarray) -> None:
    if not np.isfinite(voxels).all():
        raise VolumeError(f"{int((~np.isfinite(voxels)).sum())} voxels are NaN or infinite")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# -- DICOM -----------------------------------------------------------------------------------------


def _tag(dataset, name: str, where: str):
    value = dataset.get(name)
    if value is None or value == "":
        raise VolumeError(f"{where} has no {name}: not an image slice with patient geometry")
    return value


def _slice_label(name: str, index: int, count: int) -> str:
    return f"slice {os.path.basename(name)}" if name else f"slice {index + 1} of {count}"


def read_series(files: list[tuple[str, bytes]], max_voxels: int, uneven: str = "error") -> Volume:
    """A DICOM series' (file name, bytes) pairs -> Volume: slices sorted along their normal, the spacing
    taken from their positions and checked, RescaleSlope / RescaleIntercept applied."""
    import pydicom

    slices = []
    for index, (name, data) in enumerate(files):
        where = _slice_label(name, index, len(files))
        try:
            dataset = pydicom.dcmread(io.BytesIO(data))
        except Exception as error:  # pydicom raises many types on bad files
            raise VolumeError(
                f"{where}: not a readable DICOM file (truncated?): {_one_line(error)}"
            ) from None
        if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(
                f"{where}: a multi-frame DICOM file; only series of single-frame slices are read"
            )
        slices.append((where, dataset))
    first_where, first = slices[0]
    orientation = np.array([float(v) for v in _tag(first, "ImageOrientationPatient", first_where)])
    if orientation.shape != (6,):
        raise VolumeError(f"{first_where}: ImageOrientationPatient needs 6 values")
    rows, cols = int(_tag(first, "Rows", first_where)), int(_tag(first, "Columns", first_where))
    spacing = [float(v) for v in _tag(first, "PixelSpacing", first_where)]
    for where, dataset in slices:
        other = np.array([float(v) for v in _tag(dataset, "ImageOrientationPatient", where)])
        if other.shape != (6,) or np.abs(other - orientation).max() > ORIENTATION_TOLERANCE:
            raise VolumeError(
                f"{where}: its orientation differs from {first_where}'s: not one stack of slices"
            )
        if (int(_tag(dataset, "Rows", where)), int(_tag(dataset, "Columns", where))) != (rows, cols):
            raise VolumeError(
                f"{where}: {dataset.Rows} x {dataset.Columns} pixels, {first_where} {rows} x {cols}"
            )
        if [float(v) for v in _tag(dataset, "PixelSpacing", where)] != spacing:
            raise VolumeError(f"{where}: its PixelSpacing differs from {first_where}'s")
    voxels = rows * cols * len(slices)
    if voxels > max_voxels:
        raise VolumeError(
            f"{cols} x {rows} x {len(slices)} = {voxels} voxels exceeds the limit of {max_voxels} "
            "(preprocess.max_voxels)"
        )
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in _tag(d, "ImagePositionPatient", w)] for w, d in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices, positions, along = [slices[i] for i in order], positions[order], along[order]
    step, grid = _slice_spacing(along, [w for w, _ in slices], uneven)
    planes = np.stack([_pixels(d, w) for w, d in slices])  # (K, rows, cols)
    if grid is not None:  # resampled onto even positions along the normal
        planes = _interpolate_slices(planes, along, grid)
    voxels = np.ascontiguousarray(
        planes.transpose(2, 1, 0)
    )  # (cols, rows, K): i along a row, j down a column
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # PixelSpacing is [between rows, between columns]
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps
    _check_affine(affine)
    _check_finite(voxels)
    header = {"qform": affine, "qform_code": 1, "sform": affine, "sform_code": 1, "xyzt_units": 2}  # mm
    facts = {
        "format": "dicom",
        "series_uid": str(first.get("SeriesInstanceUID", "")),
        "modality": str(first.get("Modality", "")),
        "slices": len(slices),
    }
    if grid is not None:
        facts["resampled_slices"] = len(grid)
    return Volume(voxels, affine, header, facts)


def _pixels(dataset, where: str) -> np.ndarray:
    """One slice's stored values through RescaleSlope / RescaleIntercept (CT: Hounsfield units), float32."""
    from pydicom.pixels import get_decoder

    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except (NotImplementedError, ValueError):
            available = False
        if not available:
            raise VolumeError(
                f"{where}: compressed pixel data ({syntax.name}) and no decoder for it is installed: "
                "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"
            )
    if int(dataset.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(f"{where}: {dataset.SamplesPerPixel} samples per pixel; volumes are greyscale")
    try:
        stored = dataset.pixel_array
    except Exception as error:  # a short PixelData element, a decoder failure
        raise VolumeError(f"{where}: cannot decode pixel data (truncated?): {_one_line(error)}") from None
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _slice_spacing(along: np.ndarray, names: list[str], uneven: str) -> tuple[float, np.ndarray | None]:
    """The slice spacing of sorted positions along the normal, checked even; with `uneven` "resample" an
    uneven or gapped series gets the even positions it is resampled onto (else None: as they are)."""
    if len(along) == 1:
        raise VolumeError("a single slice: a volume needs at least two slices of the series")
    steps = np.diff(along)
    same = np.flatnonzero(steps < SAME_POSITION_MM)
    if len(same):
        i = same[0]
        raise VolumeError(
            f"{names[i]} and {names[i + 1]} lie at the same position ({along[i]:.3f} mm along the normal)"
        )
    step = float(np.median(steps))
    tolerance = max(0.01, EVEN_TOLERANCE * step)
    off = np.flatnonzero(np.abs(steps - step) > tolerance)
    if not len(off):
        return float(steps.mean()), None
    if uneven == "resample":
        count = round((along[-1] - along[0]) / step) + 1
        grid = along[0] + np.arange(count) * ((along[-1] - along[0]) / (count - 1))
        return float(grid[1] - grid[0]), grid
    i = off[0]
    between = f"between {names[i]} ({along[i]:.2f} mm) and {names[i + 1]} ({along[i + 1]:.2f} mm)"
    missing = round(steps[i] / step) - 1
    if missing >= 1 and abs(steps[i] - (missing + 1) * step) <= tolerance * (missing + 1):
        what = f"{missing} missing slice{'s' if missing > 1 else ''}: a gap of {steps[i]:.2f} mm {between}"
    else:
        what = f"uneven slice spacing: {steps[i]:.2f} mm {between}"
    raise VolumeError(
        f'{what}, where the spacing is {step:.2f} mm; set preprocess.uneven_slices = "resample" to resample'
    )


def _interpolate_slices(planes: np.ndarray, along: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Slices (K, rows, cols) at positions `along` linearly interpolated to the positions `grid`."""
    upper = np.clip(np.searchsorted(along, grid, side="right"), 1, len(along) - 1)
    lower = upper - 1
    weight = ((grid - along[lower]) / (along[upper] - along[lower])).astype(np.float32)[:, None, None]
    return planes[lower] * (1 - weight) + planes[upper] * weight
