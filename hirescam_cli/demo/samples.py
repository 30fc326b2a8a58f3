"""Write demo images and their ground-truth masks: python -m hirescam_cli.demo.samples IMAGES MASKS."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from hirescam_cli.demo.synthetic import generate

SAMPLES_SEED = 2024
DEFAULT_COUNT = 20


def write_samples(
    images_dir: Path, masks_dir: Path, count: int = DEFAULT_COUNT, seed: int = SAMPLES_SEED
) -> dict[str, list[str]]:
    """Write sample_XX.png images, masks_dir/<stem>/<class>.png masks and labels.json."""
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    labels: dict[str, list[str]] = {}
    for index in range(count):
        sample = generate(seed, index)
        name = f"sample_{index:02d}.png"
        sample.image.save(images_dir / name, optimize=True)
        folder = masks_dir / Path(name).stem
        folder.mkdir(exist_ok=True)
        for class_name, mask in sample.masks.items():
            Image.fromarray(mask).convert("L").save(folder / f"{class_name}.png", optimize=True)
        labels[name] = sample.names
    (masks_dir / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    return labels


def main() -> None:
    """Parse arguments and write the samples."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("images", type=Path, help="folder for the PNG images")
    parser.add_argument("masks", type=Path, help="folder for the masks and labels.json")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="number of images")
    parser.add_argument("--seed", type=int, default=SAMPLES_SEED, help="data stream to draw from")
    args = parser.parse_args()
    labels = write_samples(args.images, args.masks, args.count, args.seed)
    print(f"wrote {len(labels)} images to {args.images} and their masks to {args.masks}")


if __name__ == "__main__":
    main()
