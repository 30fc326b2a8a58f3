"""Metrics for `hirescam eval`: localisation against masks, deletion/insertion, summaries.

Every function is batched over N images and works on raw CAM maps (N, h, w) at the target
layer's resolution; they are upsampled bilinearly to the model input size where needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

TOP_FRACTION = 0.2
BOOTSTRAP_SAMPLES = 2000


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize raw maps (N, h, w) to (N, H, W), keeping their sign."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def localisation(
    maps: torch.Tensor, masks: torch.Tensor, top_fraction: float = TOP_FRACTION
) -> dict[str, torch.Tensor]:
    """Energy, pointing game and top-fraction IoU of each map against its mask, each (N,).

    energy: share of the positive (ReLU) map mass inside the mask, 0 for a map with none.
    pointing: 1.0 if the map's peak pixel (first in row-major order on ties) is in the mask.
    iou: IoU of the mask with the round(top_fraction * H * W) highest-valued pixels.
    Images whose mask is empty get NaN in every metric (nothing to localise).
    """
    masks = masks.bool()
    heat = upsample(maps.to(masks.device), tuple(masks.shape[-2:])).flatten(1)
    flat = masks.flatten(1)
    positive = heat.clamp(min=0)
    total = positive.sum(1)
    inside = (positive * flat).sum(1)
    energy = torch.where(total > 0, inside / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)
    pointing = flat.gather(1, heat.argmax(1, keepdim=True))[:, 0].float()
    k = max(1, round(top_fraction * flat.shape[1]))
    top = torch.zeros_like(flat).scatter_(1, heat.topk(k, dim=1).indices, True)
    iou = (top & flat).sum(1) / (top | flat).sum(1)
    empty = ~flat.any(1)
    nan = torch.tensor(float("nan"), device=heat.device)
    return {
        name: torch.where(empty, nan, value.float())
        for name, value in (("energy", energy), ("pointing", pointing), ("iou", iou))
    }


def deletion_insertion(
    model: nn.Module,
    inputs: torch.Tensor,
    classes: torch.Tensor,
    maps: torch.Tensor,
    steps: int = 16,
    baseline: float | torch.Tensor = 0.0,
    score_fn: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid,
    chunk: int | None = None,
) -> dict[str, torch.Tensor]:
    """Deletion and insertion curves (N, steps + 1) of the class score and their AUCs (N,).

    Pixels are ranked by the upsampled map, most important first (ties in row-major order).
    At step i the top round(i / steps * H * W) pixels are set to `baseline` (deletion) or are
    the only ones restored onto an all-`baseline` image (insertion). `baseline` is in the
    model's normalised input space. AUCs are trapezoids over the removed fraction in [0, 1].
    All 2 * N * (steps + 1) forwards run batched, `chunk` images at a time, in inference mode;
    pass the model in eval mode.
    """
    if chunk is None:  # on CPU, small batches reuse freed memory instead of faulting in fresh pages
        chunk = 64 if inputs.device.type == "cuda" else 8
    n, _, h, w = inputs.shape
    heat = upsample(maps.to(inputs.device), (h, w)).flatten(1)
    classes = classes.to(inputs.device)
    order = heat.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(h * w, device=inputs.device).expand(n, -1)
    rank = torch.empty_like(order).scatter_(1, order, positions).view(n, 1, h, w)
    counts = torch.linspace(0, h * w, steps + 1, device=inputs.device).round()
    baseline = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device)
    image_of, step_of = torch.cartesian_prod(
        torch.arange(n, device=inputs.device), torch.arange(steps + 1, device=inputs.device)
    ).unbind(1)
    deletion, insertion = [], []
    with torch.inference_mode():
        for start in range(0, len(image_of), chunk):
            images, stage = image_of[start : start + chunk], step_of[start : start + chunk]
            chosen = rank[images] < counts[stage].view(-1, 1, 1, 1)
            batch = torch.cat(
                [torch.where(chosen, baseline, inputs[images]), torch.where(chosen, inputs[images], baseline)]
            )
            targets = classes[images].repeat(2)[:, None]
            scores = score_fn(model(batch)).gather(1, targets)[:, 0]
            deletion.append(scores[: len(images)])
            insertion.append(scores[len(images) :])
    deletion_curve = torch.cat(deletion).view(n, steps + 1).float()
    insertion_curve = torch.cat(insertion).view(n, steps + 1).float()
    fractions = counts / (h * w)
    return {
        "fractions": fractions,
        "deletion": deletion_curve,
        "insertion": insertion_curve,
        "deletion_auc": torch.trapezoid(deletion_curve, fractions, dim=1),
        "insertion_auc": torch.trapezoid(insertion_curve, fractions, dim=1),
    }


def summarise(values: torch.Tensor, seed: int = 0) -> dict[str, float | int]:
    """Mean of the non-NaN values with a 95% percentile-bootstrap interval (fixed seed).

    NaNs are dropped; the interval is NaN when fewer than two values remain.
    """
    values = values.detach().flatten().double().cpu()
    values = values[~values.isnan()]
    n = len(values)
    mean = values.mean().item() if n else float("nan")
    if n < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": n}
    generator = torch.Generator().manual_seed(seed)
    per_chunk = max(1, 2_000_000 // n)
    means = []
    for start in range(0, BOOTSTRAP_SAMPLES, per_chunk):
        rows = min(per_chunk, BOOTSTRAP_SAMPLES - start)
        means.append(values[torch.randint(n, (rows, n), generator=generator)].mean(1))
    low, high = torch.quantile(torch.cat(means), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return {"mean": mean, "low": low.item(), "high": high.item(), "n": n}
