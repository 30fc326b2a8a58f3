"""Volumes that tests write: NIfTI files and DICOM series (through pydicom) with a given geometry."""

from pathlib import Path

import nibabel as nib
import numpy as np

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's UID prefix, for test UIDs


def oblique_affine(
    zooms=(1.0, 1.5, 3.0), degrees: float = 20.0, flip_x: bool = True, origin=(30.0, -20.0, 10.0)
) -> np.ndarray:
    """An oblique (rotated about z), anisotropic voxel-to-RAS affine, its first axis flipped."""
    angle = np.deg2rad(degrees)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([(-1.0 if flip_x else 1.0) * zooms[0], zooms[1], zooms[2]])
    affine[:3, 3] = origin
    return affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.int16) -> Path:
    """A NIfTI-1 file (.nii or .nii.gz, by the name) of `data` with `affine` as its sform and qform."""
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def write_series(
    folder: Path,
    data: np.ndarray,
    affine: np.ndarray,
    series: str = "1",
    slope: float = 1.0,
    intercept: float = -1024.0,
    skip: tuple[int, ...] = (),
    shift: dict[int, float] | None = None,
    syntax: str | None = None,
    prefix: str = "slice",
) -> Path:
    """A DICOM series of `data` (I, J, K) in HU with the RAS `affine` (k along the slice normal): one file a
    slice, stored as (HU - intercept) / slope; `skip` leaves slices out, `shift` moves slices along the
    normal by mm, `syntax` names a (compressed) transfer syntax UID whose pixel data is then a stub."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    step_i, step_j, step_k = (lps[:3, axis] for axis in range(3))
    row_dir, col_dir = step_i / np.linalg.norm(step_i), step_j / np.linalg.norm(step_j)
    normal = np.cross(row_dir, col_dir)
    assert np.allclose(step_k / np.linalg.norm(step_k), normal), "k must run along the slice normal"
    stored = np.rint((np.asarray(data, dtype=np.float64) - intercept) / slope).astype(np.int16)
    for k in range(data.shape[2]):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = UID(f"{UID_ROOT}{series}.{k + 1}")
        meta.TransferSyntaxUID = UID(syntax) if syntax else ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = f"{UID_ROOT}9"
        ds.SeriesInstanceUID = f"{UID_ROOT}{series}"
        ds.Modality = "CT"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.PixelSpacing = [float(np.linalg.norm(step_j)), float(np.linalg.norm(step_i))]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        position = lps[:3, 3] + k * step_k + normal * (shift or {}).get(k, 0.0)
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if syntax:
            ds.PixelData = encapsulate([b"\xff\x4f" + bytes(64)])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows down j, columns along i
        pydicom.dcmwrite(folder / f"{prefix}{k:03d}.dcm", ds, enforce_file_format=True)
    return folder
