"""Write the sample scans and their lesion masks: python -m hirescam_cli.demo.volume_samples VOLUMES MASKS.

Each scan is a phantom on the native grid (anisotropic voxels, stored LPS: what the demo config's
reorientation and resampling undo), as int16 HU in a .nii.gz, with a uint8 mask per lesion present in
MASKS/<name>/<label>.nii.gz on the same grid and affine, and MASKS/labels.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hirescam_cli.demo.phantoms import draw, render
from hirescam_cli.demo.volume_train import native_grid

SAMPLES_SEED = 2030  # every lesion kind appears in the five scans
DEFAULT_COUNT = 5


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def write_samples(volumes: Path, masks: Path, count: int = DEFAULT_COUNT, seed: int = SAMPLES_SEED) -> dict:
    """Write case_XX.nii.gz scans, their masks and labels.json; returns name -> lesion labels."""
    volumes.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    shape, affine = native_grid()
    labels = {}
    for index in range(count):
        phantom = draw(seed, index)
        hu, lesions = render(phantom, shape, affine)
        name = f"case_{index:02d}"
        _save(volumes / f"{name}.nii.gz", np.rint(hu).astype(np.int16), affine)
        (masks / name).mkdir(exist_ok=True)
        for label, mask in lesions.items():
            _save(masks / name / f"{label}.nii.gz", mask.astype(np.uint8), affine)
        labels[f"{name}.nii.gz"] = sorted(lesions)
    (masks / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("volumes", type=Path, help="folder for the scans")
    parser.add_argument("masks", type=Path, help="folder for the masks and labels.json")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    parser.add_argument("--seed", type=int, default=SAMPLES_SEED)
    args = parser.parse_args()
    labels = write_samples(args.volumes, args.masks, args.count, args.seed)
    print(f"wrote {len(labels)} scans to {args.volumes} and their masks to {args.masks}")


if __name__ == "__main__":
    main()
