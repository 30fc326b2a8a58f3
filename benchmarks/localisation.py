"""HiResCAM against Grad-CAM on eval's localisation metrics and on the top-20% IoU they replaced.

    python -m hirescam_cli.demo.samples /tmp/e200/images /tmp/e200/masks --count 200 --seed 4242
    python benchmarks/localisation.py /tmp/e200

For DemoNet and DemoNet-sparse: each metric's mean for both methods, the mean of the paired difference
(Grad-CAM minus HiResCAM) with a 95% bootstrap interval, and the share of pairs on which the two differ.
Maps are registered onto the original pictures and scored as `hirescam eval --masks` scores them; the
top-20% IoU is the mask's IoU with the map's highest fifth of the picture's pixels.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hirescam_cli import Explainer
from hirescam_cli.demo.net import load_demo_model
from hirescam_cli.demo.sparse import load_sparse_model
from hirescam_cli.metrics import localisation
from hirescam_cli.modalities.images import Images, Preprocess

LABELS = ["circle", "square", "triangle", "star", "cross"]
METHODS = ("hirescam", "gradcam")
KEYS = ("top20_iou", "pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy", "roc_auc")


def top_fifth_iou(registered: torch.Tensor, mask: np.ndarray) -> float:
    """IoU of a mask with the highest 20% of a registered map's pixels (uncovered ones last)."""
    height, width = mask.shape
    flat = torch.nan_to_num(registered[:height, :width], nan=-torch.inf).flatten()
    top = torch.zeros_like(flat, dtype=torch.bool)
    top[flat.topk(round(0.2 * height * width)).indices] = True
    truth = torch.from_numpy(mask).flatten()
    return ((top & truth).sum() / (top | truth).sum()).item()


def score(root: Path, model: torch.nn.Module, batch: int) -> dict[str, dict[str, np.ndarray]]:
    """{method: {metric: (P,)}} over every (image, masked class) of the folder."""
    images = Images(Preprocess((128, 128), None, (0.5,) * 3, (0.5,) * 3))
    labels = json.loads((root / "masks" / "labels.json").read_text())
    names = sorted(labels)
    parts: dict[str, dict[str, list[np.ndarray]]] = {m: {k: [] for k in KEYS} for m in METHODS}
    with Explainer(model, "features") as explainer:
        for start in range(0, len(names), batch):
            chunk = names[start : start + batch]
            loaded = [images.load((root / "images" / name).read_bytes()) for name in chunk]
            views = images.collate([view for _, view in loaded])
            rows, classes, masks = [], [], []
            for row, name in enumerate(chunk):
                for label in labels[name]:
                    rows.append(row)
                    classes.append(LABELS.index(label))
                    with Image.open(root / "masks" / Path(name).stem / f"{label}.png") as image:
                        masks.append(np.asarray(image.convert("L")) > 127)
            x = torch.stack([tensor for tensor, _ in loaded])[rows]
            result = explainer(x, methods=METHODS, classes=torch.tensor(classes)[:, None])
            for method in METHODS:
                registered, pixels = images.to_original(result.maps[method][:, 0], views, rows)
                padded = torch.zeros(pixels.shape, dtype=torch.bool)
                for i, mask in enumerate(masks):
                    padded[i, : mask.shape[0], : mask.shape[1]] = torch.from_numpy(mask)
                for key, value in localisation(registered, padded, pixels).items():
                    parts[method][key].append(value.double().numpy())
                ious = [top_fifth_iou(registered[i], mask) for i, mask in enumerate(masks)]
                parts[method]["top20_iou"].append(np.array(ious))
    return {m: {k: np.concatenate(v) for k, v in keys.items()} for m, keys in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="images/ and masks/ as demo.samples writes them")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for title, load in (("DemoNet", load_demo_model), ("DemoNet-sparse", load_sparse_model)):
        scores = score(args.folder, load(), args.batch)
        print(f"\n{title}: {len(scores['hirescam']['roc_auc'])} pairs\n")
        print("| metric | HiResCAM | Grad-CAM | Grad-CAM - HiResCAM, paired [95% CI] | pairs that differ |")
        print("|---|---|---|---|---|")
        for key in KEYS:
            a, b = scores["hirescam"][key], scores["gradcam"][key]
            defined = ~(np.isnan(a) | np.isnan(b))
            a, b = a[defined], b[defined]
            difference = b - a
            boot = difference[rng.integers(0, len(difference), (2000, len(difference)))].mean(1)
            low, high = np.quantile(boot, [0.025, 0.975])
            differ = (~np.isclose(a, b, rtol=1e-6, atol=1e-9)).mean()
            print(
                f"| {key} | {a.mean():.3f} | {b.mean():.3f} | {difference.mean():+.3f} "
                f"[{low:+.3f}, {high:+.3f}] | {differ:.1%} |"
            )


if __name__ == "__main__":
    main()
