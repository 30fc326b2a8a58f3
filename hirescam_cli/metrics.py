"""Metrics for `hirescam eval`: localisation against masks, deletion/insertion, fidelity, summaries.

Every function is batched over N (input, class) pairs, at any spatial rank (pictures (N, h, w), volumes
(N, d, h, w)). Localisation takes maps already registered onto the masks' pixels (the modality's
`to_original`); deletion/insertion take raw maps (N, *grid) at the target layer's resolution and upsample
them (bi- or trilinearly) to the model input, whose pixels they delete; fidelity works on the layer's grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

TOP_FRACTION = 0.2
BOOTSTRAP_SAMPLES = 2000
UNUSED_FRACTION = 0.01  # |Delta(p)| at most this fraction of max |Delta| counts as "not used"


INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}  # by spatial rank


def upsample(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(Bi-, tri-)linearly resize raw maps (N, *grid) to (N, *size), keeping their sign."""
    mode = INTERPOLATION[len(size)]
    return F.interpolate(maps[:, None].float(), size=size, mode=mode, align_corners=False)[:, 0]


def localisation(
    maps: torch.Tensor, masks: torch.Tensor, pixels: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Pointing game, relevance mass accuracy, relevance rank accuracy and ROC AUC of each map, each (N,).

    maps (N, *size) are at the masks' (N, *size) resolution. A NaN in a map marks a pixel the map does
    not cover (cut off by the model input's crop): it carries no mass and ranks below every covered
    pixel, tied with the other uncovered ones. `pixels` (N, *size) marks each picture's own pixels in a
    padded batch (the rest is left out of everything); all of them by default.
    pointing_game: 1 if a pixel holding the map's maximum lies in the mask, with tied maxima any one
      of them (as quantus.PointingGame), else 0; a map constant over its covered pixels has no peak: 0.
    relevance_mass_accuracy: the share of the positive (ReLU) map's mass inside the mask; NaN for a
      map with no positive mass (0 / 0: undefined, left out of the mean).
    relevance_rank_accuracy: the share of the map's |mask| highest pixels that lie in the mask; pixels
      tied with the |mask|-th highest share its remaining places in proportion (their expected share
      in a random order of the tie).
    roc_auc: the probability that a random mask pixel outranks a random pixel outside it, ties counting
      one half (the area under the ROC curve of the map as a score of mask membership); NaN when the
      mask covers the whole picture.
    Every metric is NaN for an empty mask (nothing to localise).
    """
    n = len(maps)
    values = maps.reshape(n, -1).float()
    masks = masks.to(values.device).reshape(n, -1).bool()
    pixels = torch.ones_like(masks) if pixels is None else pixels.to(values.device).reshape(n, -1).bool()
    covered = pixels & ~values.isnan()
    inside = masks & pixels
    area = inside.sum(1)
    ranked = torch.where(covered, values, -torch.inf)  # uncovered pixels and padding below all the rest

    peak = ranked.amax(1, keepdim=True)
    lowest = torch.where(covered, values, torch.inf).amin(1, keepdim=True)
    pointing = ((ranked == peak) & inside).any(1) & (peak > lowest)[:, 0]

    positive = torch.where(covered, values, 0.0).clamp_min(0).double()
    total = positive.sum(1)
    mass = torch.where(total > 0, (positive * inside).sum(1) / total.clamp_min(1e-300), torch.nan)

    k = area.clamp_min(1)
    threshold = ranked.sort(1, descending=True).values.gather(1, (k - 1)[:, None])
    above = (ranked > threshold) & pixels
    tied = (ranked == threshold) & pixels
    share = (tied & inside).sum(1).double() / tied.sum(1).clamp_min(1)
    rank = ((above & inside).sum(1) + (k - above.sum(1)) * share) / k

    ranks = average_ranks(ranked, pixels)  # 0-based, ties sharing their mean rank
    outside = pixels.sum(1) - area
    wins = (ranks * inside).sum(1) - area * (area - 1) / 2.0
    auc = torch.where(outside > 0, wins / (area * outside).clamp_min(1), torch.nan)

    empty = area == 0
    return {
        name: torch.where(empty, torch.nan, value.float())
        for name, value in (
            ("pointing_game", pointing),
            ("relevance_mass_accuracy", mass),
            ("relevance_rank_accuracy", rank),
            ("roc_auc", auc),
        )
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
    n, _, *spatial = inputs.shape
    size = math.prod(spatial)
    heat = upsample(maps.to(inputs.device), tuple(spatial)).flatten(1)
    classes = classes.to(inputs.device)
    order = heat.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(size, device=inputs.device).expand(n, -1)
    rank = torch.empty_like(order).scatter_(1, order, positions).view(n, 1, *spatial)
    counts = torch.linspace(0, size, steps + 1, device=inputs.device).round()
    baseline = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device)
    image_of, step_of = torch.cartesian_prod(
        torch.arange(n, device=inputs.device), torch.arange(steps + 1, device=inputs.device)
    ).unbind(1)
    deletion, insertion = [], []
    with torch.inference_mode():
        for start in range(0, len(image_of), chunk):
            images, stage = image_of[start : start + chunk], step_of[start : start + chunk]
            chosen = rank[images] < counts[stage].view(-1, *(1,) * (len(spatial) + 1))
            batch = torch.cat(
                [torch.where(chosen, baseline, inputs[images]), torch.where(chosen, inputs[images], baseline)]
            )
            targets = classes[images].repeat(2)[:, None]
            scores = score_fn(model(batch)).gather(1, targets)[:, 0]
            deletion.append(scores[: len(images)])
            insertion.append(scores[len(images) :])
    deletion_curve = torch.cat(deletion).view(n, steps + 1).float()
    insertion_curve = torch.cat(insertion).view(n, steps + 1).float()
    fractions = counts / size
    return {
        "fractions": fractions,
        "deletion": deletion_curve,
        "insertion": insertion_curve,
        "deletion_auc": torch.trapezoid(deletion_curve, fractions, dim=1),
        "insertion_auc": torch.trapezoid(insertion_curve, fractions, dim=1),
    }


def average_ranks(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Ranks 0.. of each row's valid entries among themselves, ties sharing their mean rank."""
    keyed = torch.where(valid, values.double(), float("inf"))  # invalid entries sort last
    ordered = keyed.sort(dim=-1).values
    low = torch.searchsorted(ordered, keyed, right=False)
    high = torch.searchsorted(ordered, keyed, right=True) - 1
    return (low + high).double() / 2


def rank_correlation(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each row of a and b (N, P) over its valid entries; NaN when either
    is constant there."""
    ranks_a, ranks_b = average_ranks(a, valid), average_ranks(b, valid)
    weight = valid.double()
    count = weight.sum(-1, keepdim=True)
    ranks_a = (ranks_a - (ranks_a * weight).sum(-1, keepdim=True) / count) * weight
    ranks_b = (ranks_b - (ranks_b * weight).sum(-1, keepdim=True) / count) * weight
    return (ranks_a * ranks_b).sum(-1) / (ranks_a.norm(dim=-1) * ranks_b.norm(dim=-1))


def fidelity(
    maps: torch.Tensor,
    delta: torch.Tensor,
    unused_fraction: float = UNUSED_FRACTION,
    top_fraction: float = TOP_FRACTION,
) -> dict[str, torch.Tensor]:
    """Faithfulness of raw maps (N, h, w) to the layer-occlusion effect Delta (N, h, w), each (N,).

    Delta's NaN entries (positions not occluded) are left out of every sum.
    rank_correlation: Spearman correlation of the map and Delta over the grid.
    unused_mass: share of the map's positive mass on positions whose removal does not change the
      score (|Delta| <= unused_fraction * max |Delta|); 0 for a map with no positive mass.
    missed_evidence: share of the positive Delta outside the map's top round(top_fraction * h * w)
      positions (ties broken by position); NaN when no removal lowers the score.
    """
    maps, delta = maps.flatten(1).double(), delta.to(maps.device).flatten(1).double()
    measured = ~delta.isnan()
    effect = torch.where(measured, delta, 0.0)
    unused = measured & (effect.abs() <= unused_fraction * effect.abs().amax(1, keepdim=True))
    positive = torch.where(measured, maps.clamp_min(0), 0.0)
    total = positive.sum(1)
    unused_mass = torch.where(total > 0, (positive * unused).sum(1) / total.clamp_min(1e-300), 0.0)
    k = max(1, round(top_fraction * maps.shape[1]))
    order = maps.argsort(dim=1, descending=True, stable=True)[:, :k]
    top = torch.zeros_like(measured).scatter_(1, order, True)
    evidence = effect.clamp_min(0)
    missed = (evidence * ~top).sum(1) / evidence.sum(1)  # NaN (0/0) when nothing is positive
    return {
        "rank_correlation": rank_correlation(maps, effect, measured).float(),
        "unused_mass": unused_mass.float(),
        "missed_evidence": missed.float(),
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
