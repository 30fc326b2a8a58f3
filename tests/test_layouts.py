"""Layouts: reading channels-first, channels-last and token outputs of any grid rank as (B, K, N), and
inferring which is which."""

import pytest
import torch
from determinism import noise
from torch import nn

from hirescam_cli.engine.layouts import Layout, LayoutError, LayoutSpec, ModelHints, infer, module_evidence

HINTS_224 = ModelHints(input_size=(224, 224))


def test_nhwc_reads_the_last_axis_as_channels():
    raw = noise(2, 3, 5, 7)  # (B, h, w, K)
    layout = Layout("nhwc", (3, 5))
    flat = layout.to_flat(raw)
    assert flat.shape == (2, 7, 15)
    assert flat[1, 6, 2 * 5 + 4] == raw[1, 2, 4, 6]
    assert layout.prefix(raw).shape == (2, 0, 7)
    assert torch.equal(layout.from_flat(flat, raw), raw)


def test_tokens_drop_the_prefix_and_fill_the_grid_row_major():
    raw = noise(2, 2 + 3 * 4, 5)  # 2 prefix tokens, then a 3x4 grid of 5 channels
    layout = Layout("tokens", (3, 4), 2)
    grid = layout.to_flat(raw).unflatten(2, layout.grid)
    assert grid.shape == (2, 5, 3, 4)
    for row in range(3):
        for col in range(4):
            assert torch.equal(grid[:, :, row, col], raw[:, 2 + row * 4 + col])
    assert torch.equal(layout.prefix(raw), raw[:, :2])
    assert torch.equal(layout.from_flat(grid.flatten(2), raw), raw)


def test_from_flat_takes_a_multiple_batch_with_each_images_prefix_repeated():
    raw = noise(2, 1 + 4, 3)
    layout = Layout("tokens", (2, 2), 1)
    flat = layout.to_flat(raw).repeat_interleave(3, 0) * torch.arange(1.0, 7.0)[:, None, None]
    out = layout.from_flat(flat, raw)
    assert out.shape == (6, 5, 3)
    for row in range(6):
        assert torch.equal(out[row, 0], raw[row // 3, 0])  # image-major: rows 0-2 are image 0
        assert torch.equal(layout.to_flat(out)[row], flat[row])
    with pytest.raises(ValueError, match="not a multiple"):
        layout.from_flat(flat[:5], raw)


@pytest.mark.parametrize("grid", [(6,), (3, 4), (2, 3, 4)], ids=["1-D", "2-D", "3-D"])
def test_every_rank_reads_channels_first_and_last_as_the_same_flat_positions(grid):
    first = noise(2, 5, *grid)  # (B, K, *grid)
    last = first.movedim(1, -1).contiguous()  # (B, *grid, K)
    a, b = Layout("nchw", grid), Layout("nhwc", grid)
    assert a.fits(tuple(first.shape)) and b.fits(tuple(last.shape)) and not a.fits(tuple(last.shape))
    assert torch.equal(a.to_flat(first), b.to_flat(last))
    assert a.to_flat(first).shape == (2, 5, first[0, 0].numel())
    assert torch.equal(a.from_flat(a.to_flat(first), first), first)
    assert torch.equal(b.from_flat(b.to_flat(last), last), last)
    assert a.name == {1: "ncl", 2: "nchw", 3: "ncdhw"}[len(grid)] and b.to_dict()["kind"] == b.name


def test_fits_checks_rank_grid_and_token_count():
    assert Layout("nchw", (7, 7)).fits((8, 768, 7, 7))
    assert not Layout("nchw", (7, 7)).fits((8, 7, 7, 768))
    assert Layout("nhwc", (7, 7)).fits((8, 7, 7, 768))
    assert Layout("tokens", (14, 14), 1).fits((8, 197, 768))
    assert not Layout("tokens", (14, 14), 1).fits((8, 196, 768))


@pytest.mark.parametrize(
    ("shape", "kind", "grid"),
    [
        ((1, 7, 7, 768), "nhwc", (7, 7)),  # torchvision swin_t features.7
        ((1, 56, 56, 96), "nhwc", (56, 56)),
        ((1, 768, 7, 7), "nchw", (7, 7)),
        ((1, 64, 56, 56), "nchw", (56, 56)),
        ((1, 2048, 1, 1), "nchw", (1, 1)),
    ],
)
def test_4d_shapes_are_read_by_the_only_reading_the_input_size_explains(shape, kind, grid):
    layout = infer("x", shape, HINTS_224)
    assert (layout.kind, layout.grid) == (kind, grid)


def test_a_4d_shape_both_readings_explain_is_refused_naming_the_key():
    with pytest.raises(LayoutError, match=r"set model\.layout \(--layout\) to nchw or nhwc"):
        infer("blocks.3", (1, 56, 56, 56), HINTS_224)
    assert infer("blocks.3", (1, 56, 56, 56), HINTS_224, LayoutSpec("nhwc")).kind == "nhwc"
    assert infer("blocks.3", (1, 56, 56, 56), HINTS_224, evidence="nchw").kind == "nchw"


def test_module_types_say_where_the_channels_are():
    assert module_evidence(nn.Conv2d(3, 8, 3), (1, 8, 8, 8)) == "nchw"
    assert module_evidence(nn.LayerNorm(8), (1, 4, 4, 8)) == "nhwc"
    assert module_evidence(nn.LayerNorm(8), (1, 8, 4, 4)) == "nchw"  # a LayerNorm2d subclass
    assert module_evidence(nn.LayerNorm(8), (1, 8, 8, 8)) is None
    assert module_evidence(nn.GELU(), (1, 4, 4, 8)) is None


def test_tokens_from_the_models_prefix_count_and_patch_grid():
    hints = ModelHints((224, 224), prefix_tokens=1, patch_grid=(14, 14))
    assert infer("x", (1, 197, 768), hints) == Layout("tokens", (14, 14), 1)
    assert infer("x", (1, 196, 768), hints) == Layout("tokens", (14, 14), 0)  # before the class token
    registers = ModelHints((224, 224), prefix_tokens=5, patch_grid=(14, 14))
    assert infer("x", (1, 201, 384), registers) == Layout("tokens", (14, 14), 5)
    pooled = ModelHints((224, 224), prefix_tokens=1, patch_grid=(14, 14))
    assert infer("x", (1, 50, 768), pooled) == Layout("tokens", (7, 7), 1)  # N - P = 49 at stride 32


def test_a_1d_channels_first_output_of_a_2d_model_is_not_tokens():
    """Swin's pooler: (B, K, 1) from a 1-D adaptive pool, which prefix count 0 must not read as tokens."""
    swin = ModelHints((32, 32), prefix_tokens=0)
    assert infer("swin.layernorm", (1, 16, 16), swin) == Layout("tokens", (4, 4), 0)
    with pytest.raises(LayoutError, match=r"a 1-D map \(B, K, L\), not tokens over the input's 2-D grid"):
        infer("swin.pooler", (1, 16, 1), swin, evidence=module_evidence(nn.AdaptiveAvgPool1d(1), (1, 16, 1)))


def test_tokens_grid_from_the_patch_embedding_conv():
    layout = infer("x", (1, 197, 64), HINTS_224, conv_grids=((64, (14, 14)), (32, (56, 56))))
    assert layout == Layout("tokens", (14, 14), 1)


def test_undecidable_tokens_are_refused_naming_the_keys():
    with pytest.raises(LayoutError, match=r"set model\.prefix_tokens \(--prefix-tokens\) and model\.grid"):
        infer("blocks.11", (1, 197, 768), HINTS_224)
    assert infer("x", (1, 197, 768), HINTS_224, LayoutSpec(prefix_tokens=1)) == Layout("tokens", (14, 14), 1)
    assert infer("x", (1, 197, 768), HINTS_224, LayoutSpec(grid=(14, 14))) == Layout("tokens", (14, 14), 1)
    with pytest.raises(LayoutError, match=r"model\.grid = \[15, 15\] do not fit 197 tokens"):
        infer("x", (1, 197, 768), HINTS_224, LayoutSpec(grid=(15, 15)))


def test_rank_the_config_excludes_and_non_spatial_shapes_are_refused():
    with pytest.raises(LayoutError, match="not a spatial map"):
        infer("fc", (1, 1000), HINTS_224)
    with pytest.raises(LayoutError, match="not tokens"):
        infer("x", (1, 768, 7, 7), HINTS_224, LayoutSpec("tokens"))
    with pytest.raises(LayoutError, match="not a map over the input's grid"):
        infer("x", (1, 197, 768), HINTS_224, LayoutSpec("nchw"))


def test_the_config_cannot_read_a_conv_channels_last():
    with pytest.raises(LayoutError, match=r"outputs nchw by its module type, not model\.layout = nhwc"):
        infer("conv", (1, 56, 56, 56), HINTS_224, LayoutSpec("nhwc"), evidence="nchw")


def test_tokens_and_channels_last_at_three_grid_axes():
    hints = ModelHints(input_size=(8, 12, 16), prefix_tokens=1, patch_grid=(2, 3, 4))
    assert infer("blocks.1", (1, 1 + 24, 8), hints) == Layout("tokens", (2, 3, 4), 1)
    tokens = noise(2, 1 + 24, 8)
    flat = Layout("tokens", (2, 3, 4), 1).to_flat(tokens)
    assert flat.shape == (2, 8, 24) and torch.equal(flat[:, :, 5], tokens[:, 1 + 5])
    linear = nn.Linear(4, 8)
    assert module_evidence(linear, (1, 2, 3, 4, 8)) == "nhwc"  # K last: a channels-last 3-D map
    assert infer("mlp", (1, 2, 3, 4, 8), hints, evidence="nhwc") == Layout("nhwc", (2, 3, 4))
    assert Layout("nhwc", (2, 3, 4)).name == "ndhwc"


def test_a_one_dimensional_model_reads_a_conv_output_as_a_map_not_tokens():
    hints = ModelHints(input_size=(64,))
    assert infer("conv", (1, 16, 32), hints, evidence="nchw") == Layout("nchw", (32,))
    with pytest.raises(LayoutError, match="tokens"):  # beside a 2-D input it is read as tokens
        infer("conv", (1, 16, 32), ModelHints(input_size=(8, 8)), evidence="nchw")
