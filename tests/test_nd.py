"""The engine at any spatial rank: P1-P4 and the known-value fixture hold for Conv1d and Conv3d models
exactly as for Conv2d (DESIGN.md), with no branch on the rank anywhere in the math."""

import math

import pytest
import torch
from determinism import noise, seeded
from test_methods import Split
from torch import nn

from hirescam_cli import METHODS, Explainer
from hirescam_cli.engine.layers import choose_auto, probe_input, trace_layers

RANKS = [1, 2, 3]
SIDE = {1: 10, 2: 10, 3: 6}  # input side per rank; the features halve it (minus the valid conv)
RTOL, ATOL = 1e-5, 1e-4


def conv(rank: int):
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]


@seeded()
def features(rank: int, channels: int = 6) -> nn.Module:
    layer = conv(rank)
    return nn.Sequential(layer(3, 8, 3, padding=1), nn.ReLU(), layer(8, channels, 3, stride=2))


def grid(rank: int) -> tuple[int, ...]:
    return (math.floor((SIDE[rank] - 3) / 2) + 1,) * rank


@seeded()
def flatten_fc(rank: int, channels: int = 6, classes: int = 5) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * math.prod(grid(rank)), classes))


@seeded()
def full_kernel_conv(rank: int, channels: int = 6, classes: int = 5) -> nn.Module:
    return nn.Sequential(conv(rank)(channels, classes, grid(rank)), nn.Flatten())


@seeded()
def gap_fc(rank: int, channels: int = 6, classes: int = 5) -> nn.Module:
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[rank]
    return nn.Sequential(pool(1), nn.Flatten(), nn.Linear(channels, classes))


def inputs(rank: int, count: int = 3, seed: int = 0) -> torch.Tensor:
    return noise(count, 3, *(SIDE[rank],) * rank, seed=seed)


def explain(model, x, classes, methods=tuple(METHODS), layer="features"):
    with Explainer(model, layer) as explainer:
        return explainer(x, methods=methods, classes=classes)


def bias_of(head: nn.Module) -> torch.Tensor:
    return [m for m in head.modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)][-1].bias.detach()


@pytest.mark.parametrize("rank", RANKS)
def test_maps_have_the_layers_grid_and_auto_finds_it(rank):
    model = Split(features(rank), flatten_fc(rank))
    x = inputs(rank)
    result = explain(model, x, [0, 1], layer="auto")
    assert result.target_layer == "features" and result.layout.grid == grid(rank)
    assert result.layout.name == {1: "ncl", 2: "nchw", 3: "ncdhw"}[rank]
    for maps in result.maps.values():
        assert maps.shape == (3, 2, *grid(rank))
    traced = trace_layers(model, probe_input(x), probe=True)
    assert choose_auto(traced) == "features"


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("head", [flatten_fc, full_kernel_conv], ids=["fc", "full-kernel-conv"])
def test_p1_completeness_affine_head(rank, head):
    model = Split(features(rank), head(rank))
    result = explain(model, inputs(rank), [0, 1, 2, 3, 4])
    total = result.maps["hirescam"].flatten(2).sum(-1)
    expected = result.scores - bias_of(model.head)[result.classes]
    torch.testing.assert_close(total, expected, rtol=RTOL, atol=ATOL)
    assert result.guarantee and result.completeness_gap.abs().max() < ATOL


@pytest.mark.parametrize("rank", RANKS)
def test_p2_locality_hirescam_zero_where_the_model_looks_away(rank):
    model = Split(features(rank), flatten_fc(rank))
    positions = math.prod(grid(rank))
    used = torch.zeros(positions, dtype=torch.bool)
    used[: positions // 3] = True  # the only positions class 2 reads
    with torch.no_grad():
        model.head[1].weight.view(5, 6, positions)[2][:, ~used] = 0.0
    result = explain(model, inputs(rank, 8, seed=1), 2)
    hires, grad = result.maps["hirescam"][:, 0].flatten(1), result.maps["gradcam"][:, 0].flatten(1)
    assert (hires[:, ~used] == 0).all()
    assert grad[:, ~used].abs().min() > 0


@pytest.mark.parametrize("rank", RANKS)
def test_p3_occlusion_equals_hirescam_at_each_position(rank):
    model = Split(features(rank), flatten_fc(rank))
    x = inputs(rank)
    with Explainer(model, "features") as explainer:
        result = explainer(x, methods=("hirescam",), classes=1)
        delta = explainer.occlusion(x, result.classes)
    with torch.no_grad():
        acts = model.features(x).flatten(2)
        score = model.head(acts.unflatten(2, grid(rank)))[:, 1]
        for p in range(acts.shape[-1]):
            occluded = acts.clone()
            occluded[:, :, p] = 0
            drop = score - model.head(occluded.unflatten(2, grid(rank)))[:, 1]
            expected = result.maps["hirescam"][:, 0].flatten(1)[:, p]
            torch.testing.assert_close(drop, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(delta, result.maps["hirescam"], rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("rank", RANKS)
def test_p4_global_average_pool_makes_methods_equal_cam(rank):
    model = Split(features(rank), gap_fc(rank))
    x = inputs(rank)
    result = explain(model, x, [0, 3])
    acts = model.features(x).detach().flatten(2)
    weights = model.head[2].weight.detach()[result.classes]  # (B, T, K)
    cam = (torch.einsum("btk,bkn->btn", weights, acts) / acts.shape[-1]).unflatten(2, grid(rank))
    for name in ("hirescam", "gradcam", "xgradcam"):
        torch.testing.assert_close(result.maps[name], cam, rtol=RTOL, atol=ATOL)
    assert result.guarantee and result.identical_by_construction.all()


class KnownValues(nn.Module):
    """The published fixture at a given rank: conv 1->2 (ones, bias given), ReLU, FC 8->4 whose rows are
    [1,1,1,1,1,-1,-1,-1], a final ReLU. Rank 3 is the 2-D fixture with a depth of one."""

    def __init__(self, rank: int, kernel: tuple[int, ...], bias: list[float]):
        super().__init__()
        self.conv = conv(rank)(1, 2, kernel)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 4)
        self.final = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.copy_(torch.tensor(bias))
            self.fc.weight.copy_(torch.tensor([1.0, 1, 1, 1, 1, -1, -1, -1]).expand(4, 8))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.final(self.fc(self.relu(self.conv(x)).flatten(1)))


FIXTURES = {
    # rank: (model, input, score, Grad-CAM at conv, at relu, HiResCAM at either)
    # 1-D, worked by hand: conv of arange(6) with [1,1,1] is [3,6,9,12]; bias -5 / -10 gives
    # z0 = [-2,1,4,7], z1 = [-7,-4,-1,2]; the score is (1+4+7) + 0 - 2 = 10. At the conv the gradient is
    # [0,1,1,1] and [0,0,0,-1] (means 3/4, -1/4); at the ReLU [1,1,1,1] and [1,-1,-1,-1] (means 1, -1/2).
    1: (
        lambda: KnownValues(1, (3,), [-5.0, -10.0]),
        torch.arange(6.0).view(1, 1, 6),
        10.0,
        [0.25, 1.75, 3.25, 4.75],
        [0.0, 1.0, 4.0, 6.0],
        [0.0, 1.0, 4.0, 5.0],
    ),
    # 3-D: the published 2-D values (DESIGN.md), one slice deep
    3: (
        lambda: KnownValues(3, (1, 3, 3), [-50.0, -75.0]),
        torch.arange(16.0).view(1, 1, 1, 4, 4),
        54.0,
        [[[11.25, 13.5], [20.25, 22.5]]],
        [[[0.0, 4.0], [28.0, 32.5]]],
        [[[0.0, 4.0], [25.0, 25.0]]],
    ),
}


@pytest.mark.parametrize("rank", [1, 3])
def test_known_values_at_ranks_one_and_three(rank):
    make, x, score, gradcam_conv, gradcam_relu, hirescam = FIXTURES[rank]
    for layer, gradcam in (("conv", gradcam_conv), ("relu", gradcam_relu)):
        result = explain(make(), x, 0, ("hirescam", "gradcam"), layer)
        assert result.scores.item() == score
        assert result.maps["gradcam"][0, 0].tolist() == gradcam
        assert result.maps["hirescam"][0, 0].tolist() == hirescam
        assert result.maps["hirescam"].sum().item() == score
