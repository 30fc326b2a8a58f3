"""The eval run: images with ground-truth masks -> localisation and faithfulness per method."""

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import Config, ConfigError
from .data import ImageDataset, Preprocess, make_loader
from .discovery import InputItem, discover
from .engine import Explainer
from .layouts import layout_spec
from .methods import METHODS
from .metrics import deletion_insertion, localisation, summarise
from .models import load_model
from .outputs import OutputDir
from .pipeline import Progress, make_preprocess, pick_device
from .report import write_eval_page
from .resources import choose as choose_resources

METRICS = ("energy", "pointing", "iou", "deletion_auc", "insertion_auc")


def mask_folder(masks: Path, item: InputItem) -> Path:
    """Masks of `a/x.png` live in MASKS/a/x/<label>.png."""
    return masks / Path(item.key).with_suffix("")


def load_masks(masks: Path, item: InputItem, labels: list[str], size: tuple[int, int], problems: list[str]):
    """{class id: uint8 (H, W) mask} for every label with a mask file of the image's size."""
    found = {}
    for path in sorted(mask_folder(masks, item).glob("*.png")):
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
            problems.append(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, image is {size[1]}x{size[0]}")
            continue
        found[labels.index(path.stem)] = mask
    if not found:
        problems.append(f"{mask_folder(masks, item)}: no usable mask for {item.key}")
    return found


def to_input_space(masks: list[np.ndarray], preprocess: Preprocess) -> torch.Tensor:
    """Masks through the same resize and crop as the images -> bool (N, h, w) over the model input."""
    geometry = Preprocess(preprocess.resize, preprocess.crop, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return torch.stack(
        [geometry(torch.from_numpy(m).to(torch.uint8).mul(255).expand(3, -1, -1))[0][0] > 0.5 for m in masks]
    )


def run_eval(config: Config, images: list[str], masks: Path, out: Path | None) -> dict[str, Any]:
    """Score every method on every present class of every image; print the table, write JSON to OUT."""
    loaded = load_model(config.model)
    if not loaded.labels:
        raise ConfigError("eval matches masks to classes by label: set model.labels")
    device = pick_device(config.explain.device)
    model = loaded.module.to(device)
    preprocess = make_preprocess(config.preprocess, loaded.transforms)
    items = discover(images)
    dataset = ImageDataset(items, preprocess, config.preprocess.max_pixels)
    resources = choose_resources(device, config.explain.workers, config.explain.batch_size)
    torch.set_num_threads(resources.threads)
    loader = make_loader(dataset, resources.batch_size, resources.workers)
    score_fn = torch.sigmoid if config.model.multilabel else (lambda logits: torch.softmax(logits, -1))
    values: dict[str, dict[str, list[torch.Tensor]]] = {m: {k: [] for k in METRICS} for m in METHODS}
    problems: list[str] = []
    progress = Progress(len(items), quiet=False)
    with Explainer(model, config.model.target_layer, layout=layout_spec(config.model)) as explainer:
        for batch in loader:
            progress.update(len(batch.indices) + len(batch.failed), len(batch.failed))
            problems += [f"{items[i].shown}: {error}" for i, error in batch.failed]
            rows, classes, truth = [], [], []
            for row, index in enumerate(batch.indices):
                size = tuple(batch.images[row].shape[1:])
                for cls, mask in load_masks(masks, items[index], loaded.labels, size, problems).items():
                    rows.append(row)
                    classes.append(cls)
                    truth.append(mask)
            if not rows:
                continue
            x = batch.inputs.to(device)[rows]
            targets = torch.tensor(classes, device=device)
            result = explainer(x, methods=tuple(METHODS), classes=targets[:, None])
            truth_input = to_input_space(truth, preprocess).to(device)
            for name, maps in result.maps.items():
                maps = maps[:, 0]
                for key, value in localisation(maps, truth_input).items():
                    values[name][key].append(value.cpu())
                curves = deletion_insertion(model, x, targets, maps, score_fn=score_fn)
                values[name]["deletion_auc"].append(curves["deletion_auc"].cpu())
                values[name]["insertion_auc"].append(curves["insertion_auc"].cpu())
    progress.close()
    table = {
        name: {k: summarise(torch.cat(v)) if v else summarise(torch.empty(0)) for k, v in metrics.items()}
        for name, metrics in values.items()
    }
    report = {
        "images": len(items),
        "model": loaded.name,
        "target_layer": explainer.target_layer,
        "methods": table,
    }
    report["problems"] = problems
    print_table(table, len(items))
    for problem in problems[:20]:
        print(f"hirescam: eval: {problem}", file=sys.stderr)
    if out is not None:
        outdir = OutputDir(out)
        outdir.write_json(outdir.root / "eval.json", report)
        outdir.close()
        write_eval_page(outdir.root, report)
    return report


def print_table(table: dict[str, dict[str, dict]], images: int) -> None:
    """Mean [95% interval] per method and metric, as a Markdown table on stdout."""
    n = next(iter(table.values()))["energy"]["n"]
    print(f"{images} images, {n} (image, class) pairs; mean [95% bootstrap interval]\n")
    header = [
        "method",
        "energy in mask ↑",
        "pointing game ↑",
        "top-20% IoU ↑",
        "deletion AUC ↓",
        "insertion AUC ↑",
    ]
    rows = [
        [name, *(f"{m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]" for m in (metrics[k] for k in METRICS))]
        for name, metrics in table.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
