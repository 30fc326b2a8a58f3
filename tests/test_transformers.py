"""Token and channels-last models: ViT, DeiT, Swin (torchvision and timm) read through their layouts."""

import sys
from pathlib import Path

import pytest
import timm
import torch
from determinism import assert_close_scaled, noise, seeded
from torch import nn

from hirescam_cli import METHODS, Explainer
from hirescam_cli.engine.layers import choose_auto, probe_input, trace_layers
from hirescam_cli.engine.layouts import Layout, LayoutSpec

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from tiny_models import tiny_swin, tiny_vit  # noqa: E402


@seeded()
def timm_vit(**kwargs) -> nn.Module:
    """timm ViT for 32x32 inputs with a class token and 4 register tokens."""
    args = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, reg_tokens=4, num_classes=3)
    return timm.models.VisionTransformer(**{**args, **kwargs}).eval()


@seeded()
def timm_deit() -> nn.Module:
    """timm DeiT with a class and a distillation token."""
    return timm.models.deit.VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3
    ).eval()


@seeded()
def timm_swin() -> nn.Module:
    """timm Swin: channels-last (B, h, w, K) stages of 8x8 and 4x4."""
    return timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, embed_dim=12, depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=3
    ).eval()


# model -> (auto's pick, its layout, another layer to check, its layout)
FAMILIES = {
    "torchvision_vit": (
        tiny_vit,
        "encoder.layers.encoder_layer_1.ln_1",
        Layout("tokens", (4, 4), 1),
        "encoder.layers.encoder_layer_0",
        Layout("tokens", (4, 4), 1),
    ),
    "torchvision_swin": (
        tiny_swin,
        "permute",
        Layout("nchw", (4, 4)),
        "features.1",
        Layout("nhwc", (8, 8)),
    ),
    "timm_vit_registers": (
        timm_vit,
        "blocks.1.norm1",
        Layout("tokens", (4, 4), 5),
        "blocks.0",
        Layout("tokens", (4, 4), 5),
    ),
    "timm_deit_distilled": (
        timm_deit,
        "blocks.1.norm1",
        Layout("tokens", (4, 4), 2),
        "blocks.0.mlp",
        Layout("tokens", (4, 4), 2),
    ),
    "timm_swin": (timm_swin, "norm", Layout("nhwc", (4, 4)), "layers.0", Layout("nhwc", (8, 8))),
}


def to_grid(raw: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(B, K, h, w) by hand: permute, or drop the prefix and reshape tokens row-major."""
    batch, (h, w) = raw.shape[0], layout.grid
    if layout.kind == "nhwc":
        return raw.permute(0, 3, 1, 2)
    if layout.kind == "tokens":
        return raw[:, layout.prefix_tokens :].reshape(batch, h, w, -1).permute(0, 3, 1, 2)
    return raw


def by_hand(model: nn.Module, layer: str, x: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """HiResCAM, Grad-CAM and the raw gradient of each image's top class, from a plain hook and autograd."""
    captured, model = [], model.eval()
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.enable_grad():
        logits = model(x.clone().requires_grad_())
        handle.remove()
        score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(score, captured[0])
    a, g = to_grid(captured[0].detach(), layout), to_grid(grad, layout)
    return {
        "hirescam": (g * a).sum(1),
        "gradcam": (g.mean((2, 3), keepdim=True) * a).sum(1),
        "prefix": (grad * captured[0].detach())[:, : layout.prefix_tokens].sum((1, 2))
        if layout.kind == "tokens"
        else torch.zeros(x.shape[0]),
        "grad": grad,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_raw_maps_equal_a_hand_computation_through_the_layout(family):
    make, auto, auto_layout, other, other_layout = FAMILIES[family]
    x = noise(3, 3, 32, 32, seed=1)
    for layer, layout in ((auto, auto_layout), (other, other_layout)):
        expected = by_hand(make(), layer, x, layout)
        with Explainer(make(), "auto" if layer == auto else layer) as explainer:
            result = explainer(x)
            assert explainer.target_layer == layer
        assert result.layout == layout
        for name in ("hirescam", "gradcam", "prefix"):
            got = result.prefix_sum[:, 0] if name == "prefix" else result.maps[name][:, 0]
            scale = 1 + expected[name].abs().max()  # 1e-6 of the magnitude: sums run in another order
            assert (got - expected[name]).abs().max() <= 1e-6 * scale, name


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_never_picks_a_layer_whose_grid_gradient_is_zero(family):
    make, auto = FAMILIES[family][:2]
    model = make()
    traced = trace_layers(model, probe_input(torch.zeros(1, 3, 32, 32)), probe=True)
    assert choose_auto(traced) == auto
    picked = next(i for i in traced if i.name == auto)
    assert picked.grid_gradient is True and picked.positions > 1
    later = [i for i in traced[traced.index(picked) + 1 :] if i.layout is not None and i.calls == 1]
    later_grids = [i for i in later if i.positions > 1]
    assert all(i.grid_gradient is False or i.channels != picked.channels for i in later_grids)
    with Explainer(model) as explainer:
        maps = explainer(noise(2, 3, 32, 32), top_k=2).maps["hirescam"]
    assert (maps != 0).flatten(2).any(-1).all()  # every image, every target: a non-zero map


def test_a_vit_last_block_really_has_zero_grid_gradient():
    """What auto avoids: the head reads only the class token after the last block."""
    model = tiny_vit().eval()
    x = noise(2, 3, 32, 32)
    expected = by_hand(model, "encoder.layers.encoder_layer_1", x, Layout("tokens", (4, 4), 1))
    # the gradient reaches the class token only; its g.a sum is ~0 (a LayerNorm, blind to scale, follows)
    assert (expected["hirescam"] == 0).all() and (expected["grad"][:, 0] != 0).any(-1).all()


@pytest.mark.parametrize("family", ["torchvision_vit", "timm_vit_registers", "timm_swin"])
def test_batch_equals_one_by_one_and_top_k_equals_single_classes(family):
    make = FAMILIES[family][0]
    x = noise(3, 3, 32, 32)
    with Explainer(make()) as explainer:
        batched = explainer(x, methods=tuple(METHODS), top_k=2)
        for i in range(3):
            single = explainer(x[i : i + 1], methods=tuple(METHODS), top_k=2)
            for name in METHODS:
                assert_close_scaled(single.maps[name], batched.maps[name][i : i + 1])
            assert_close_scaled(single.prefix_sum, batched.prefix_sum[i : i + 1])
        for t in range(2):
            one = explainer(x, methods=tuple(METHODS), classes=batched.classes[:, t : t + 1])
            for name in METHODS:
                assert_close_scaled(one.maps[name][:, 0], batched.maps[name][:, t])
            assert_close_scaled(one.prefix_sum[:, 0], batched.prefix_sum[:, t])


class MeanTokens(nn.Module):
    """Patch conv -> class token + patch tokens -> a block -> mean over ALL tokens -> linear."""

    num_prefix_tokens = 1

    @seeded()
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1)
        return self.head(self.norm(self.block(tokens)).mean(1))


@pytest.mark.parametrize(
    ("make", "layer", "where"),
    [
        (tiny_vit, "encoder.ln", "prefix"),  # class token -> linear head: all on the class token
        (lambda: timm_vit(global_pool="avg", fc_norm=False), "norm", "grid"),  # patches only
        (MeanTokens, "norm", "both"),  # every token, class token included
    ],
)
def test_completeness_is_exact_on_token_layers_with_an_affine_head(make, layer, where):
    with Explainer(make(), layer) as explainer:
        result = explainer(noise(4, 3, 32, 32), top_k=3)
    assert result.guarantee
    total = result.scores - result.baseline
    grid = result.maps["hirescam"].sum((-2, -1))
    torch.testing.assert_close(grid + result.prefix_sum, total, rtol=1e-5, atol=1e-5)
    assert result.completeness_gap.abs().max() <= 1e-5 * (total.abs().max() + 1)
    if where == "prefix":
        assert (grid == 0).all() and (result.prefix_sum != 0).all()
    if where == "grid":
        assert (result.prefix_sum == 0).all() and (grid != 0).all()
    if where == "both":
        assert (result.prefix_sum != 0).all() and (grid != 0).all()


def test_an_ambiguous_channels_last_shape_is_refused_naming_the_key():
    import torchvision

    with seeded():
        model = torchvision.models.SwinTransformer(  # 8 channels over an 8x8 grid: (B, 8, 8, 8)
            patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2], num_classes=3
        )
    x = noise(2, 3, 32, 32)
    with Explainer(model, "features.1") as explainer, pytest.raises(ValueError, match=r"set model\.layout"):
        explainer(x)
    with Explainer(model, "features.1", layout=LayoutSpec("nhwc")) as explainer:
        result = explainer(x)
    expected = by_hand(model, "features.1", x, Layout("nhwc", (8, 8)))
    scale = 1 + expected["hirescam"].abs().max()
    assert (result.maps["hirescam"][:, 0] - expected["hirescam"]).abs().max() <= 1e-6 * scale


class LinearPatches(nn.Module):
    """Tokens from unfold + linear (no conv, no hints): 1 class token and a 4x4 grid at 32x32."""

    @seeded()
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3 * 64, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        patches = nn.functional.unfold(x, 8, stride=8).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(patches)], 1)
        return self.head(self.norm(tokens).mean(1))


def test_undecidable_tokens_are_refused_until_the_config_says():
    x = noise(2, 3, 32, 32)
    refused = pytest.raises(ValueError, match=r"model\.prefix_tokens")
    with Explainer(LinearPatches(), "norm") as explainer, refused:
        explainer(x)
    for spec in (LayoutSpec(prefix_tokens=1), LayoutSpec(grid=(4, 4)), LayoutSpec("tokens", (4, 4), 1)):
        with Explainer(LinearPatches(), "norm", layout=spec) as explainer:
            assert explainer(x).layout == Layout("tokens", (4, 4), 1)


def test_mixed_precision_on_a_token_layer_gives_nearly_the_same_maps():
    x = noise(2, 3, 32, 32)
    with Explainer(tiny_vit()) as exact, Explainer(tiny_vit(), amp=True) as mixed:
        a, b = exact(x, classes=[0, 1]), mixed(x, classes=[0, 1])
    assert b.layout == a.layout and b.maps["hirescam"].dtype == torch.float32
    scale = a.maps["hirescam"].abs().max()
    assert (a.maps["hirescam"] - b.maps["hirescam"]).abs().max() < 0.1 * scale
