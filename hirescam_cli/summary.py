"""Per-input numbers for the JSON summaries, computed batched on the device over the maps' flat grid
positions (any rank) and copied back once; where a peak lies in the input is the modality's to say."""

import base64
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .engine import Explanation

SCHEMA = "hirescam-cli/summary/1"
TOP_FRACTION = 0.2  # the "top region" of a map for IoU agreement
GRID_POSITIONS = 1024  # a map of at most this many grid positions is kept in the summary (`compare` reads it)


def _g(value: float) -> float | None:
    """A float rounded to float32's precision for stable JSON; NaN becomes None."""
    return None if math.isnan(value) else float(f"{value:.7g}")


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of (B, T, *grid) maps over their grids; NaN where either map is constant."""
    a, b = a.flatten(2), b.flatten(2)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def top_region_iou(a: Tensor, b: Tensor, fraction: float = TOP_FRACTION) -> Tensor:
    """IoU of the top `fraction` positions of two (B, T, *grid) maps."""
    a, b = a.flatten(2), b.flatten(2)
    k = max(1, math.ceil(fraction * a.shape[-1]))

    def top(x: Tensor) -> Tensor:
        return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.topk(k, dim=-1).indices, True)

    ta, tb = top(a), top(b)
    return (ta & tb).sum(-1) / (ta | tb).sum(-1)


def batch_numbers(
    result: Explanation,
    multilabel: bool,
    locate: Callable[[Tensor], Tensor],
    extra: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Every number the summaries need, as nested Python lists, and the maps of at most GRID_POSITIONS
    positions as `grid_maps` keeps them; `locate` gives the peak of each (B, T, *grid) map in the input's
    coordinates (the modality's), and `extra` holds the modality's own numbers (B, T, ...): "field" per
    target, "method.field" per map (see `image_summary`)."""
    logits = result.logits
    probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, -1)
    top = logits.topk(min(5, logits.shape[1]), dim=-1).indices
    numbers = {
        "top": top,
        "top_logit": logits.gather(1, top),
        "top_prob": probs.gather(1, top),
        "target_prob": probs.gather(1, result.classes),
        "classes": result.classes,
        "scores": result.scores,
        "valid": result.valid,
        "gap": result.completeness_gap,
        "prefix_sum": result.prefix_sum,
        "identical": result.identical_by_construction,
        "zero_gradient": result.zero_gradient,
    }
    for name, maps in result.maps.items():
        flat = maps.flatten(2)
        numbers[f"{name}.min"] = flat.amin(-1)
        numbers[f"{name}.max"] = flat.amax(-1)
        numbers[f"{name}.sum"] = flat.sum(-1)
        numbers[f"{name}.peak"] = locate(maps)
    if "hirescam" in result.maps and "gradcam" in result.maps:
        numbers["pearson"] = pearson(result.maps["hirescam"], result.maps["gradcam"])
        numbers["iou"] = top_region_iou(result.maps["hirescam"], result.maps["gradcam"])
    numbers |= extra or {}
    numbers = {k: v.cpu().tolist() for k, v in numbers.items()}
    for name, maps in result.maps.items():
        if math.prod(maps.shape[2:]) <= GRID_POSITIONS:
            numbers[f"{name}.grid"] = grid_maps(maps)
    return numbers


def grid_maps(maps: Tensor) -> list[list[dict[str, Any]]]:
    """(B, T, *grid) maps as summaries keep them: the grid's shape, the largest magnitude (`scale`), and the
    map divided by it as little-endian float16, row-major, in base64."""
    flat = maps.flatten(2).float()
    scale = flat.abs().amax(-1, keepdim=True)
    values = (flat / torch.where(scale > 0, scale, 1.0)).half().cpu().numpy().astype("<f2")
    shape, scales = list(maps.shape[2:]), scale[..., 0].cpu().tolist()
    return [
        [
            {"shape": shape, "scale": _g(s), "float16": base64.b64encode(v.tobytes()).decode()}
            for v, s in zip(row, row_scales, strict=True)
        ]
        for row, row_scales in zip(values, scales, strict=True)
    ]


def _plain(value: Any) -> Any:
    """A number or nested list of them for JSON: floats at float32's precision, ints as they are."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return _g(value) if isinstance(value, float) else value


def label_of(labels: list[str] | None, index: int) -> str:
    return labels[index] if labels and index < len(labels) else str(index)


def image_summary(
    numbers: dict[str, Any],
    row: int,
    base: dict,
    methods: tuple[str, ...],
    labels,
    guarantee: bool,
    files,
    threshold: float | None = None,
    extra: tuple[str, ...] = (),
) -> dict:
    """The summary of input `row` of a batch: `base` fields plus predictions and targets.

    `files(method, class)` gives the paths of a map's files by summary field, relative to OUT: its picture
    under its format's name ("png", "jpeg" or "webp"), "raw", and the modality's other files ("nifti",
    ...). `extra` names the modality's numbers (see `batch_numbers`): "field" goes in each target,
    "method.field" in that method's map. With a `threshold` that no class passes, `no_target` says so,
    with the best class and its probability.
    """
    predictions = [
        {"class": c, "label": label_of(labels, c), "logit": _g(lg), "probability": _g(p)}
        for c, lg, p in zip(
            numbers["top"][row], numbers["top_logit"][row], numbers["top_prob"][row], strict=True
        )
    ]
    targets = []
    for t, cls in enumerate(numbers["classes"][row]):
        if not numbers["valid"][row][t]:
            continue
        maps = {}
        for name in methods:
            maps[name] = {
                **files(name, cls),
                "min": _g(numbers[f"{name}.min"][row][t]),
                "max": _g(numbers[f"{name}.max"][row][t]),
                "sum": _g(numbers[f"{name}.sum"][row][t]),
                "peak": [int(v) for v in numbers[f"{name}.peak"][row][t]],
            }
            if f"{name}.grid" in numbers:
                maps[name]["grid"] = numbers[f"{name}.grid"][row][t]
        target = {
            "class": cls,
            "label": label_of(labels, cls),
            "logit": _g(numbers["scores"][row][t]),
            "probability": _g(numbers["target_prob"][row][t]),
            "completeness_gap": _g(numbers["gap"][row][t]),
            "hirescam_prefix_sum": _g(numbers["prefix_sum"][row][t]),
            "guarantee": guarantee,
            "identical_by_construction": numbers["identical"][row][t],
            "zero_gradient": numbers["zero_gradient"][row][t],
            "maps": maps,
        }
        for key in extra:
            method, per_map, field = key.rpartition(".")
            (maps[method] if per_map else target)[field] = _plain(numbers[key][row][t])
        if "pearson" in numbers:
            target["agreement"] = {
                "pearson": _g(numbers["pearson"][row][t]),
                "top20_iou": _g(numbers["iou"][row][t]),
            }
        targets.append(target)
    summary = {**base, "predictions": predictions, "targets": targets}
    if not targets and threshold is not None:
        best = predictions[0]
        summary["no_target"] = {
            "threshold": threshold,
            "best_class": best["class"],
            "best_label": best["label"],
            "best_probability": best["probability"],
        }
    return summary
