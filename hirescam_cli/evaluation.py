"""The eval run: faithfulness to the model by layer occlusion on any folder; with masks, localisation too."""

import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .batches import InputDataset, make_loader
from .config import Config, ConfigError
from .discovery import InputItem, discover
from .engine.methods import METHODS
from .metrics import TOP_FRACTION, UNUSED_FRACTION, deletion_insertion, fidelity, localisation, summarise
from .modalities import accepts, group
from .outputs import OutputDir
from .progress import Progress
from .report import write_eval_page
from .session import Session

FIDELITY = ("rank_correlation", "unused_mass", "missed_evidence")
LOCALISATION = ("pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy", "roc_auc")
PIXEL_DELETION = ("deletion_auc", "insertion_auc")


class Metric(NamedTuple):
    """What eval.json's `metrics` says of one metric."""

    label: str
    better: str  # "higher" or "lower"
    space: str  # where it is computed: the layer's grid, the model input, or the original input
    reference: str  # the published notion it is (or this project's own)


OWN = "hirescam-cli's layer-occlusion test (docs/faithfulness.md)"
METRICS = {
    "rank_correlation": Metric("rank correlation with occlusion", "higher", "layer grid", OWN),
    "unused_mass": Metric("mass on unused locations", "lower", "layer grid", OWN),
    "missed_evidence": Metric("missed evidence", "lower", "layer grid", OWN),
    "pointing_game": Metric(
        "pointing game",
        "higher",
        "original",
        "Zhang et al. 2018 pointing game, no tolerance (quantus.PointingGame)",
    ),
    "relevance_mass_accuracy": Metric(
        "relevance mass accuracy",
        "higher",
        "original",
        "Arras et al. 2022 relevance mass accuracy, of the positive map (quantus.RelevanceMassAccuracy)",
    ),
    "relevance_rank_accuracy": Metric(
        "relevance rank accuracy",
        "higher",
        "original",
        "Arras et al. 2022 relevance rank accuracy (quantus.RelevanceRankAccuracy)",
    ),
    "roc_auc": Metric(
        "ROC AUC against the mask",
        "higher",
        "original",
        "area under the ROC curve of the map as a score of mask pixels, Fawcett 2006 (quantus.AUC)",
    ),
    "deletion_auc": Metric("deletion AUC", "lower", "input", "Petsiuk et al. 2018 (RISE) deletion"),
    "insertion_auc": Metric("insertion AUC", "higher", "input", "Petsiuk et al. 2018 (RISE) insertion"),
}
LOCALISATION_PIXELS = 2**22  # original pixels scored at once (pairs padded to the largest of them): ~250 MB
SAMPLE_SEED = 0


def run_eval(
    config: Config, images: list[str], masks: Path | None, out: Path | None, positions: int | None = None
) -> dict[str, Any]:
    """Score every method on every explained class of every image; print the tables, write JSON to OUT.

    Without masks the classes come from [explain] and only the occlusion fidelity is measured; with
    masks they are the classes that have a mask, and localisation and deletion/insertion are added.
    `positions` occludes that many grid positions per batch, drawn at random, instead of all.
    """
    if positions is not None and positions < 1:
        raise ConfigError(f"--positions must be at least 1; got {positions}")
    session = Session.open(config, pictures=False)
    loaded, device, explainer, modality = session.loaded, session.device, session.explainer, session.modality
    if masks is not None and not loaded.labels:
        session.close()
        raise ConfigError("eval matches masks to classes by label: set model.labels")
    model = loaded.module
    choose = session.selection() if masks is None else {}
    items = discover(images, accepts=accepts(config.input.kind), group=group(config.input.kind))
    resources = session.resources
    loader = make_loader(InputDataset(items, modality), resources.batch_size, resources.workers)
    score_fn = torch.sigmoid if session.multilabel else (lambda logits: torch.softmax(logits, -1))
    names = FIDELITY + (LOCALISATION + PIXEL_DELETION if masks is not None else ())
    values: dict[str, dict[str, list[torch.Tensor]]] = {m: {k: [] for k in names} for m in METHODS}
    curves: dict[str, dict[str, list[torch.Tensor]]] = {m: {"deletion": [], "insertion": []} for m in METHODS}
    pair_classes: list[torch.Tensor] = []
    identical: list[torch.Tensor] = []
    problems: list[str] = []
    empty: list[Path] = []
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    grid = None
    progress = Progress(len(items), quiet=False)
    with explainer, torch.no_grad():
        for batch in loader:
            batch = modality.finish(batch, device)  # what the workers left to the device
            progress.update(len(batch.indices) + len(batch.failed), len(batch.failed))
            problems += [f"{items[i].shown}: {error}" for i, error in batch.failed]
            if not batch.indices:
                continue
            x = batch.inputs.to(device)
            truth = None
            with torch.enable_grad():
                if masks is None:
                    result = explainer(x, methods=tuple(METHODS), **choose)
                    valid = result.valid
                else:
                    rows, classes, truth = _mask_targets(
                        modality, masks, batch, items, loaded.labels, problems, empty
                    )
                    if not rows:
                        continue
                    x = x[rows]
                    result = explainer(x, methods=tuple(METHODS), classes=classes.clamp_min(0).to(device))
                    valid = (classes >= 0).to(device)
            grid = tuple(result.maps["hirescam"].shape[2:])  # any rank
            if not valid.any():
                continue
            sample = _sample(grid, positions, generator, device)
            delta = explainer.occlusion(x, result.classes, positions=sample)[valid]
            targets = result.classes[valid]
            image_of = torch.arange(len(x), device=device)[:, None].expand_as(valid)[valid]
            pair_classes.append(targets.cpu())
            identical.append(result.identical_by_construction[valid].cpu())
            maps = {name: maps[valid] for name, maps in result.maps.items()}
            for name, method_maps in maps.items():
                for key, value in fidelity(method_maps, delta).items():
                    values[name][key].append(value.cpu())
            if truth is None:
                continue
            pair_rows = [rows[i] for i in image_of.tolist()]  # the batch row of each pair's input
            for name, scores in _localise(modality, maps, truth, batch.views, pair_rows).items():
                for key, value in scores.items():
                    values[name][key].append(value)
            for name, method_maps in maps.items():  # pixels deleted from the model input
                runs = deletion_insertion(model, x[image_of], targets, method_maps, score_fn=score_fn)
                for key in ("deletion", "insertion"):
                    values[name][f"{key}_auc"].append(runs[f"{key}_auc"].cpu())
                    curves[name][key].append(runs[key].cpu())
    progress.close()
    classes = torch.cat(pair_classes) if pair_classes else torch.empty(0, dtype=torch.long)
    flags = torch.cat(identical) if identical else torch.empty(0, dtype=torch.bool)
    merged = {
        m: {k: torch.cat(v) if v else torch.empty(0) for k, v in metrics.items()}
        for m, metrics in values.items()
    }
    table = {m: {k: _summary(v) for k, v in metrics.items()} for m, metrics in merged.items()}
    report = {
        "images": len(items),
        "model": loaded.name,
        "target_layer": explainer.target_layer,
        "pairs": len(classes),
        "masks": masks is not None,
        "methods": table,
        "metrics": {k: METRICS[k]._asdict() for k in names},
        "per_class": _per_class(merged, classes, loaded.labels),
        "identical_by_construction": bool(flags.all()) if len(flags) else None,
        "occlusion": {
            "grid": list(grid) if grid else None,
            "positions": math.prod(grid) if grid else None,
            "sampled": positions if grid and positions and positions < math.prod(grid) else None,
            "batched": explainer.occlusion_batched,
            "unused_fraction": UNUSED_FRACTION,
            "top_fraction": TOP_FRACTION,
        },
    }
    if masks is not None:
        report["empty_masks"] = len(empty)
        report["no_positive_mass"] = {
            m: int(v["relevance_mass_accuracy"].isnan().sum()) for m, v in merged.items()
        }
        report["curves"] = {
            m: {k: torch.cat(c).mean(0).tolist() if c else [] for k, c in parts.items()}
            for m, parts in curves.items()
        }
    report["problems"] = problems
    print_report(report)
    for problem in problems[:20]:
        print(f"hirescam: eval: {problem}", file=sys.stderr)
    if out is not None:
        outdir = OutputDir(out)
        outdir.write_json(outdir.root / "eval.json", report)
        outdir.close()
        write_eval_page(outdir.root, report)
    return report


def _mask_targets(
    modality,
    masks: Path,
    batch,
    items: list[InputItem],
    labels: list[str],
    problems: list[str],
    empty: list[Path],
):
    """Rows of the batch with masks, their classes (R, T) padded with -1, and the masks in pair order. An
    input's masks are in MASKS/<modality.mask_folder(key)>/; an input whose masks are all empty is left out
    (the class is absent), one with none usable is a problem."""
    rows, per_row, truth = [], [], []
    for row, index in enumerate(batch.indices):
        folder = masks / modality.mask_folder(items[index].key)
        dropped = len(empty)
        found = modality.load_masks(folder, labels, batch.views, row, problems, empty)
        if not found and len(empty) == dropped:
            problems.append(f"{folder}: no usable mask for {items[index].key}")
        if found:
            rows.append(row)
            per_row.append(list(found))
            truth += list(found.values())
    count = max((len(c) for c in per_row), default=0)
    classes = torch.full((len(rows), count), -1, dtype=torch.long)
    for row, found in enumerate(per_row):
        classes[row, : len(found)] = torch.tensor(found)
    return rows, classes, truth


def _localise(
    modality, maps: dict[str, torch.Tensor], truth: list[np.ndarray], views, rows: list[int]
) -> dict[str, dict[str, torch.Tensor]]:
    """Every method's localisation metrics (P,) of P pairs, scored on the original inputs: the modality
    registers the maps (P, *grid) onto the inputs of batch rows `rows`, at the size of the masks `truth`."""
    scores: dict[str, dict[str, list[torch.Tensor]]] = {name: {} for name in maps}
    for span in _spans([mask.shape for mask in truth], LOCALISATION_PIXELS):
        masks = _padded(truth[span.start : span.stop])
        for name, method_maps in maps.items():
            registered, pixels = modality.to_original(method_maps[span], views, rows[span.start : span.stop])
            for key, value in localisation(registered, masks, pixels).items():
                scores[name].setdefault(key, []).append(value.cpu())
    return {name: {k: torch.cat(v) for k, v in parts.items()} for name, parts in scores.items()}


def _spans(shapes: list[tuple[int, ...]], budget: int) -> list[range]:
    """Consecutive runs of pairs, each of at most `budget` pixels once padded to one shape (one pair at
    least)."""
    spans, start, bound = [], 0, None
    for i, shape in enumerate(shapes):
        grown = shape if bound is None else tuple(map(max, bound, shape))
        if bound is not None and math.prod(grown) * (i + 1 - start) > budget:
            spans.append(range(start, i))
            start, grown = i, shape
        bound = grown
    return [*spans, range(start, len(shapes))]


def _padded(masks: list[np.ndarray]) -> torch.Tensor:
    """Masks of different shapes as one bool tensor (N, *largest), False beyond each one."""
    shape = np.max([m.shape for m in masks], axis=0).tolist()
    out = torch.zeros((len(masks), *shape), dtype=torch.bool)
    for i, mask in enumerate(masks):
        out[(i, *(slice(0, n) for n in mask.shape))] = torch.from_numpy(mask)
    return out


def _sample(
    grid: tuple[int, ...], count: int | None, generator: torch.Generator, device
) -> torch.Tensor | None:
    """`count` distinct grid positions drawn at random (sorted), or None for all of them."""
    cells = math.prod(grid)
    if count is None or count >= cells:
        return None
    return torch.randperm(cells, generator=generator)[:count].sort().values.to(device)


def _summary(values: torch.Tensor) -> dict[str, float | int | None]:
    """summarise(), with null for an undefined mean or interval (strict JSON has no NaN)."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in summarise(values).items()}


def _per_class(merged: dict[str, dict[str, torch.Tensor]], classes: torch.Tensor, labels) -> dict:
    """label -> method -> metric -> summary, over the pairs of each class."""
    out = {}
    for cls in classes.unique().tolist():
        rows = classes == cls
        label = labels[cls] if labels and cls < len(labels) else str(cls)
        out[label] = {m: {k: _summary(v[rows]) for k, v in metrics.items()} for m, metrics in merged.items()}
    return out


def _cell(summary: dict) -> str:
    """mean [low, high] with three decimals; n/a where undefined."""
    mean, low, high = (
        f"{v:.3f}" if v is not None else "n/a" for v in (summary["mean"], summary["low"], summary["high"])
    )
    return f"{mean} [{low}, {high}]"


def print_report(report: dict[str, Any]) -> None:
    """The fidelity table, and with masks the localisation and deletion tables, as Markdown on stdout."""
    table, metrics = report["methods"], report["metrics"]
    occlusion = report["occlusion"]
    sampled = f"{occlusion['sampled']} sampled of " if occlusion["sampled"] else ""
    print(
        f"{report['images']} images, {report['pairs']} (image, class) pairs, layer {report['target_layer']} "
        f"({sampled}{occlusion['positions']} positions); mean [95% bootstrap interval]"
    )
    if report["identical_by_construction"]:
        print(
            "HiResCAM and Grad-CAM are identical by construction at this layer (gradient constant over "
            "the grid for every pair)"
        )
    groups = [("Faithfulness to the model (layer occlusion)", FIDELITY)]
    if report["masks"]:
        dropped = f"; {report['empty_masks']} empty masks left out" if report["empty_masks"] else ""
        groups.append((f"Localisation against the masks, on the original inputs{dropped}", LOCALISATION))
        groups.append(("Pixel deletion / insertion, on the model input", PIXEL_DELETION))
    for title, keys in groups:
        print(f"\n{title}\n")
        header = [
            "method",
            *(f"{metrics[k]['label']} {'↑' if metrics[k]['better'] == 'higher' else '↓'}" for k in keys),
        ]
        rows = [[name, *(_cell(values[k]) for k in keys)] for name, values in table.items()]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for i, row in enumerate([header, *rows]):
            print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
            if i == 0:
                print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
