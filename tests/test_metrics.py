"""Exact properties of the evaluation metrics (localisation, deletion/insertion, summaries)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hirescam_cli.metrics import deletion_insertion, localisation, summarise, upsample


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


def test_map_equal_to_mask_gives_full_energy_and_known_iou() -> None:
    """A map equal to the mask puts all energy inside; IoU with the top 20% is area / 20%."""
    masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    masks[0, 2:6, 3:8] = True  # 20 pixels: exactly the top 20% of 100
    masks[1, 5, :] = True  # 10 pixels: the top 20 hold all 10 plus 10 zeros
    result = localisation(masks.float(), masks)
    assert result["energy"].tolist() == [1.0, 1.0]
    assert result["pointing"].tolist() == [1.0, 1.0]
    assert result["iou"].tolist() == pytest.approx([1.0, 0.5])


def test_energy_counts_only_positive_mass() -> None:
    """Negative values are ignored; energy is the inside share of the positive mass."""
    mask = square_mask(8, 0, 0, 4)
    inside_only = torch.where(mask, 1.0, -5.0)
    quarter = torch.where(mask, 1.0, 0.0) + torch.where(square_mask(8, 4, 4, 4), 3.0, 0.0)
    result = localisation(torch.cat([inside_only, quarter]), mask.repeat(2, 1, 1))
    assert result["energy"].tolist() == pytest.approx([1.0, 0.25])


def test_degenerate_maps_and_masks() -> None:
    """All-zero or all-negative maps give energy 0, never NaN; an empty mask gives NaN."""
    mask = square_mask(8, 2, 2, 3)
    maps = torch.stack([torch.zeros(8, 8), -torch.ones(8, 8)])
    result = localisation(maps, mask.repeat(2, 1, 1))
    assert result["energy"].tolist() == [0.0, 0.0]
    generator = torch.Generator().manual_seed(0)
    empty = localisation(torch.rand(1, 8, 8, generator=generator), torch.zeros(1, 8, 8, dtype=torch.bool))
    assert all(math.isnan(v.item()) for v in empty.values())


def test_constant_coarse_map_energy_is_mask_area() -> None:
    """A constant positive 8x8 map, upsampled, spreads energy uniformly over the image."""
    mask = square_mask(128, 10, 20, 32)
    result = localisation(torch.full((1, 8, 8), 0.7), mask)
    assert result["energy"].item() == pytest.approx(32 * 32 / 128**2, rel=1e-5)


def test_pointing_game_on_a_known_coarse_peak() -> None:
    """The peak of an upsampled 8x8 map lies in its cell's 16x16 block of the 128x128 input."""
    coarse = torch.zeros(2, 8, 8)
    coarse[:, 2, 5] = 1.0
    hit = square_mask(128, 32, 80, 16)
    miss = square_mask(128, 80, 32, 16)
    result = localisation(coarse, torch.cat([hit, miss]))
    assert result["pointing"].tolist() == [1.0, 0.0]
    assert upsample(coarse, (128, 128))[0].argmax() // 128 in range(32, 48)


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
