"""Exact properties of the evaluation metrics (localisation, deletion/insertion, summaries)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hirescam_cli.metrics import deletion_insertion, localisation, summarise


class PixelSum(nn.Module):
    """A 'classifier' whose two logits are the sum and the negated sum of all inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 2) logits."""
        total = x.flatten(1).sum(1)
        return torch.stack([total, -total], 1)


class Constant(nn.Module):
    """A 'classifier' that ignores its input."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1) logits, all equal to `value`."""
        return torch.full((len(x), 1), self.value)


def identity(logits: torch.Tensor) -> torch.Tensor:
    """Use raw logits as scores."""
    return logits


def square_mask(size: int, top: int, left: int, side: int) -> torch.Tensor:
    """A (1, size, size) mask with one filled square."""
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[:, top : top + side, left : left + side] = True
    return mask


def test_a_map_equal_to_its_mask_scores_perfectly() -> None:
    """A map that is its mask: a hit, all mass inside, every top-|mask| pixel inside, ROC AUC 1."""
    masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    masks[0, 2:6, 3:8] = True
    masks[1, 5, :] = True
    result = localisation(masks.float(), masks)
    for name in ("pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy", "roc_auc"):
        assert result[name].tolist() == [1.0, 1.0], name


def test_known_values_on_a_ramp() -> None:
    """Pixel values 0..15 on a 4x4 picture, the mask holding pixels 15, 14, 0 and 1: the peak is in it,
    two of the top four are, and 2 x 12 + 2 x 0 of the 4 x 12 (mask, outside) pairs are won."""
    ramp = torch.arange(16.0).view(1, 4, 4)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, [0, 1, 14, 15]] = True
    result = localisation(ramp, mask.view(1, 4, 4))
    assert result["pointing_game"].item() == 1.0
    assert result["relevance_rank_accuracy"].item() == 0.5
    assert result["roc_auc"].item() == pytest.approx(0.5)
    assert result["relevance_mass_accuracy"].item() == pytest.approx((0 + 1 + 14 + 15) / 120)


def test_rank_accuracy_depends_on_the_map_whatever_the_mask_size() -> None:
    """Two maps whose top 20% both hold a small mask whole (so a top-20% IoU cannot tell them apart):
    rank accuracy and ROC AUC still tell which one ranks the mask first."""
    mask = square_mask(10, 0, 0, 2)  # 4 of 100 pixels
    background = torch.linspace(0, 0.5, 100).view(1, 10, 10)
    first = torch.where(mask, 2.0, background)  # the mask above everything
    among = torch.where(mask, 0.9, background)
    among[:, 8:, 5:] = 1.0  # 10 pixels above the mask, which the top 20% (20 pixels) still holds whole
    for candidate in (first, among):
        assert mask.flatten()[candidate.flatten().topk(20).indices].sum() == 4
    result = localisation(torch.cat([first, among]), mask.repeat(2, 1, 1))
    assert result["relevance_rank_accuracy"][0] == 1.0 > result["relevance_rank_accuracy"][1]
    assert result["roc_auc"][0] == 1.0 > result["roc_auc"][1]


def test_mass_accuracy_counts_only_positive_mass() -> None:
    """Negative values are ignored; mass accuracy is the inside share of the positive mass."""
    mask = square_mask(8, 0, 0, 4)
    inside_only = torch.where(mask, 1.0, -5.0)
    quarter = torch.where(mask, 1.0, 0.0) + torch.where(square_mask(8, 4, 4, 4), 3.0, 0.0)
    result = localisation(torch.cat([inside_only, quarter]), mask.repeat(2, 1, 1))
    assert result["relevance_mass_accuracy"].tolist() == pytest.approx([1.0, 0.25])


def test_a_map_with_no_positive_mass() -> None:
    """Mass accuracy is 0 / 0, undefined (NaN, left out of the mean); the ranks are still defined, so
    an all-negative map is scored by where its least negative pixels lie; a constant map has no peak."""
    mask = square_mask(8, 2, 2, 3)
    negative = torch.where(mask, -1.0, -2.0)
    maps = torch.stack([negative[0], torch.zeros(8, 8), -torch.ones(8, 8)])
    result = localisation(maps, mask.repeat(3, 1, 1))
    assert all(math.isnan(v) for v in result["relevance_mass_accuracy"].tolist())
    assert result["pointing_game"].tolist() == [1.0, 0.0, 0.0]
    area = 9 / 64
    assert result["relevance_rank_accuracy"].tolist() == pytest.approx([1.0, area, area])
    assert result["roc_auc"].tolist() == pytest.approx([1.0, 0.5, 0.5])


def test_an_empty_mask_gives_nan_everywhere() -> None:
    """Nothing to localise: every metric is NaN (eval drops such pairs before scoring and counts them)."""
    generator = torch.Generator().manual_seed(0)
    empty = localisation(torch.rand(1, 8, 8, generator=generator), torch.zeros(1, 8, 8, dtype=torch.bool))
    assert all(math.isnan(v.item()) for v in empty.values())


def test_tied_peaks_hit_when_any_lies_in_the_mask() -> None:
    """The pointing game's rule for a peak held by several pixels: a hit when any of them is in the mask
    (quantus.PointingGame's rule), whatever their order."""
    mask = square_mask(6, 0, 0, 2)
    maps = torch.zeros(2, 6, 6)
    maps[:, 5, 5] = maps[:, 1, 1] = 1.0  # tied: one inside, one outside (last in row-major order)
    maps[1, 1, 1] = 0.5  # no tie: the peak is outside
    assert localisation(maps, mask.repeat(2, 1, 1))["pointing_game"].tolist() == [1.0, 0.0]


def test_ties_at_the_mask_size_share_the_places_in_proportion() -> None:
    """|mask| = 4; two pixels above the rest, both in the mask; then six tied pixels, one in the mask,
    for the remaining 2 places: (2 + 2 x 1/6) / 4."""
    values = torch.zeros(1, 16)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    values[0, [0, 1]] = 2.0
    values[0, 2:8] = 1.0
    mask[0, [0, 1, 7, 15]] = True
    result = localisation(values.view(1, 4, 4), mask.view(1, 4, 4))
    assert result["relevance_rank_accuracy"].item() == pytest.approx((2 + 2 / 6) / 4)
    reversed_order = localisation(values.flip(1).view(1, 4, 4), mask.flip(1).view(1, 4, 4))
    assert reversed_order["relevance_rank_accuracy"].item() == pytest.approx((2 + 2 / 6) / 4)


def test_uncovered_pixels_and_padding() -> None:
    """NaN pixels (outside the model input's crop) have no mass and rank below every covered one;
    padding (pixels False) is left out of everything, so a padded batch scores like its pictures."""
    generator = torch.Generator().manual_seed(5)
    small = torch.rand(1, 5, 7, generator=generator)
    mask = square_mask(7, 1, 2, 3)[:, :5]
    alone = localisation(small, mask)
    padded = torch.full((1, 9, 9), 7.0)  # large values in the padding must not count
    padded[:, :5, :7] = small
    pixels = torch.zeros(1, 9, 9, dtype=torch.bool)
    pixels[:, :5, :7] = True
    padded_mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    padded_mask[:, :5, :7] = mask
    inside = localisation(padded, padded_mask, pixels)
    for name, value in alone.items():
        torch.testing.assert_close(inside[name], value)

    cut = small.clone()
    cut[:, :, 5:] = torch.nan  # the crop cut off two columns, one of them in the mask
    uncovered = localisation(cut, mask)
    ranked_last = localisation(torch.where(cut.isnan(), -1.0, cut), mask)  # values are in [0, 1)
    for name in ("pointing_game", "relevance_rank_accuracy", "roc_auc", "relevance_mass_accuracy"):
        torch.testing.assert_close(uncovered[name], ranked_last[name])


def test_any_spatial_rank() -> None:
    """Volumes (N, D, H, W) score as their flattened voxels do."""
    generator = torch.Generator().manual_seed(6)
    maps = torch.randn(3, 4, 5, 6, generator=generator)
    masks = torch.rand(3, 4, 5, 6, generator=generator) > 0.8
    volume = localisation(maps, masks)
    flat = localisation(maps.view(3, 1, -1), masks.view(3, 1, -1))
    for name, value in volume.items():
        torch.testing.assert_close(flat[name], value)


def test_deletion_and_insertion_of_a_pixel_sum() -> None:
    """For a sum of non-negative pixels, deletion falls and insertion rises, and they add up."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(3, 2, 16, 16, generator=generator)
    maps = torch.rand(3, 4, 4, generator=generator)
    result = deletion_insertion(PixelSum(), inputs, torch.tensor([0, 0, 1]), maps, steps=8, score_fn=identity)
    total = inputs.flatten(1).sum(1)
    deletion, insertion = result["deletion"], result["insertion"]
    assert deletion.shape == insertion.shape == (3, 9)
    signed = torch.tensor([1.0, 1.0, -1.0])[:, None]
    assert torch.all((deletion * signed).diff(dim=1) <= 1e-4)
    assert torch.all((insertion * signed).diff(dim=1) >= -1e-4)
    torch.testing.assert_close(deletion + insertion, (total * signed[:, 0])[:, None].expand(3, 9))
    torch.testing.assert_close(deletion[:, 0], total * signed[:, 0])
    torch.testing.assert_close(deletion[:, -1], torch.zeros(3))
    assert result["fractions"][0] == 0 and result["fractions"][-1] == 1


def test_true_importance_deletes_fastest() -> None:
    """Ranking pixels by their real contribution gives the lowest deletion AUC of any map."""
    inputs = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0])
    kwargs = {"steps": 64, "score_fn": identity}
    best = deletion_insertion(PixelSum(), inputs, classes, inputs[:, 0], **kwargs)
    worst = deletion_insertion(PixelSum(), inputs, classes, -inputs[:, 0], **kwargs)
    assert best["deletion_auc"] < worst["deletion_auc"]
    assert best["insertion_auc"] > worst["insertion_auc"]


@settings(max_examples=20, deadline=None)
@given(st.floats(-5, 5), st.integers(1, 20))
def test_auc_of_a_constant_curve_is_the_constant(value: float, steps: int) -> None:
    """A model that ignores its input has flat curves whose AUC equals the constant."""
    generator = torch.Generator().manual_seed(0)
    result = deletion_insertion(
        Constant(value),
        torch.rand(2, 3, 8, 8, generator=generator),
        torch.zeros(2, dtype=torch.long),
        torch.rand(2, 2, 2, generator=generator),
        steps=steps,
        score_fn=identity,
    )
    expected = torch.full((2,), value)
    torch.testing.assert_close(result["deletion_auc"], expected)
    torch.testing.assert_close(result["insertion_auc"], expected)


def test_chunking_and_sigmoid_default() -> None:
    """Chunk size does not change the curves; the default score is the sigmoid of the logit."""
    generator = torch.Generator().manual_seed(2)
    inputs, maps = torch.rand(2, 1, 6, 6, generator=generator) / 10, torch.rand(2, 3, 3, generator=generator)
    classes = torch.tensor([0, 1])
    small = deletion_insertion(PixelSum(), inputs, classes, maps, steps=5, chunk=1)
    large = deletion_insertion(PixelSum(), inputs, classes, maps, steps=5, chunk=1000)
    for key in ("deletion", "insertion", "deletion_auc", "insertion_auc"):
        torch.testing.assert_close(small[key], large[key])
    total = inputs.flatten(1).sum(1)
    torch.testing.assert_close(small["deletion"][:, 0], torch.sigmoid(total * torch.tensor([1, -1])))


def test_summarise() -> None:
    """Mean with a bootstrap interval around it; NaNs dropped; degenerate inputs stay defined."""
    assert summarise(torch.full((50,), 0.3)) == pytest.approx({"mean": 0.3, "low": 0.3, "high": 0.3, "n": 50})
    values = torch.cat([torch.arange(100.0), torch.tensor([float("nan")])])
    stats = summarise(values)
    assert stats["n"] == 100 and stats["mean"] == pytest.approx(49.5)
    assert 40 < stats["low"] < 49.5 < stats["high"] < 59
    assert summarise(values) == stats
    single = summarise(torch.tensor([2.0, float("nan")]))
    assert single["mean"] == 2.0 and single["n"] == 1 and math.isnan(single["low"])
    assert summarise(torch.tensor([]))["n"] == 0
