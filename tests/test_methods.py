"""The exact properties of the CAM math (DESIGN.md P1-P10) on small models built here."""

import pytest
import torch
from determinism import assert_close_scaled, noise, seeded
from torch import nn

from hirescam_cli import METHODS, Explainer
from hirescam_cli.engine import head
from hirescam_cli.render import normalize

RTOL, ATOL = 1e-5, 1e-4


class Split(nn.Module):
    """features -> head, with the boundary as the target layer `features`."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x):
        return self.head(self.features(x))


@seeded()
def conv_features(channels: int = 6) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, channels, 3, stride=2))


@seeded()
def flatten_fc(channels: int = 6, side: int = 4, classes: int = 5) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, classes))


@seeded()
def full_kernel_conv(channels: int = 6, side: int = 4, classes: int = 5) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, classes, side), nn.Flatten())


@seeded()
def gap_fc(channels: int = 6, classes: int = 5) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def explain(model, x, classes, methods=tuple(METHODS), layer="features"):
    with Explainer(model, layer) as explainer:
        return explainer(x, methods=methods, classes=classes)


def bias_of(head: nn.Module) -> torch.Tensor:
    last = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return last.bias.detach()


X = noise(3, 3, 10, 10)


class KnownValueNet(nn.Module):
    """The published test model: conv 1->2 (ones, bias -50/-75), ReLU, FC 8->4, final ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 4)
        self.final = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.copy_(torch.tensor([-50.0, -75.0]))
            self.fc.weight.copy_(torch.tensor([1.0, 1, 1, 1, 1, -1, -1, -1]).expand(4, 8))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.final(self.fc(self.relu(self.conv(x)).flatten(1)))


@pytest.mark.parametrize(
    ("layer", "gradcam"),
    [("conv", [[11.25, 13.5], [20.25, 22.5]]), ("relu", [[0.0, 4.0], [28.0, 32.5]])],
)
def test_known_values(layer, gradcam):
    x = torch.arange(16.0).view(1, 1, 4, 4)
    result = explain(KnownValueNet(), x, 0, ("hirescam", "gradcam"), layer)
    assert result.scores.item() == 54.0
    assert result.maps["gradcam"][0, 0].tolist() == gradcam
    assert result.maps["hirescam"][0, 0].tolist() == [[0.0, 4.0], [25.0, 25.0]]
    assert result.maps["hirescam"].sum().item() == 54.0


@pytest.mark.parametrize("head", [flatten_fc, full_kernel_conv], ids=["fc", "full-kernel-conv"])
def test_p1_completeness_affine_head(head):
    model = Split(conv_features(), head())
    result = explain(model, X, [0, 1, 2, 3, 4])
    total = result.maps["hirescam"].sum((-2, -1))
    expected = result.scores - bias_of(model.head)[result.classes]
    torch.testing.assert_close(total, expected, rtol=RTOL, atol=ATOL)
    assert result.guarantee
    torch.testing.assert_close(result.baseline, bias_of(model.head)[result.classes])
    assert result.completeness_gap.abs().max() < ATOL


def test_p1_guarantee_off_for_nonlinear_head():
    with seeded():
        head = nn.Sequential(nn.Flatten(), nn.Linear(96, 16), nn.ReLU(), nn.Linear(16, 5))
    result = explain(Split(conv_features(), head), X, 0)
    assert not result.guarantee


class BatchFromInput(nn.Module):
    """An affine head that reshapes the layer's output by the input's batch size: a larger batch after the
    layer cannot pass it."""

    def __init__(self):
        super().__init__()
        self.features, self.head = conv_features(), flatten_fc()

    def forward(self, x):
        return self.head[1](self.features(x).reshape(x.shape[0], -1))


def batch_statistics_head() -> nn.Module:
    """Normalised by the batch's statistics even in eval mode: a larger batch after the layer changes
    every row's logits."""
    return nn.Sequential(nn.BatchNorm2d(6, track_running_stats=False), flatten_fc())


@pytest.mark.parametrize(
    ("model", "expanded", "affine"),
    [
        (Split(conv_features(), flatten_fc()), True, True),
        (BatchFromInput(), False, True),
        (Split(conv_features(), batch_statistics_head()), False, False),
    ],
    ids=["split", "batch-from-input", "batch-statistics"],
)
def test_p1_head_probe_runs_the_layers_below_once_where_a_larger_batch_gives_the_same_logits(
    model, expanded, affine, monkeypatch
):
    """The probe hands the rest of the network its activations as one larger batch where that reproduces
    the input's own logits, else repeats the input; either way it finds the same head."""
    found = []
    real = head._expanded
    monkeypatch.setattr(head, "_expanded", lambda *args: found.append(real(*args)) or found[-1])
    result = explain(model, X, [0, 1])
    monkeypatch.setattr(head, "_expanded", lambda *args: None)
    repeated = explain(model, X, [0, 1])
    assert len(found) == 1 and (found[0] is not None) == expanded
    assert result.guarantee == repeated.guarantee == affine
    assert_close_scaled(result.baseline, repeated.baseline)
    assert_close_scaled(result.completeness_gap, repeated.completeness_gap)


def test_p2_locality_hirescam_zero_where_the_model_looks_away():
    model = Split(conv_features(), flatten_fc())
    used = torch.zeros(4, 4, dtype=torch.bool)
    used[1:3, 0:2] = True  # the only positions class 2 reads
    with torch.no_grad():
        model.head[1].weight.view(5, 6, 4, 4)[2][:, ~used] = 0.0
    result = explain(model, noise(8, 3, 10, 10, seed=1), 2)
    hires, grad = result.maps["hirescam"][:, 0], result.maps["gradcam"][:, 0]
    assert (hires[:, ~used] == 0).all()
    assert (hires.clamp_min(0)[:, ~used].sum() == 0).item()
    assert grad[:, ~used].abs().min() > 0
    assert grad.clamp_min(0)[:, ~used].sum() > 0


def test_p3_occlusion_equals_hirescam_at_each_position():
    model = Split(conv_features(), flatten_fc())
    result = explain(model, X, 1, ("hirescam",))
    with torch.no_grad():
        acts = model.features(X)
        score = model.head(acts)[:, 1]
        for i in range(4):
            for j in range(4):
                occluded = acts.clone()
                occluded[:, :, i, j] = 0
                drop = score - model.head(occluded)[:, 1]
                torch.testing.assert_close(drop, result.maps["hirescam"][:, 0, i, j], rtol=RTOL, atol=ATOL)


def test_p4_global_average_pool_makes_methods_equal_cam():
    model = Split(conv_features(), gap_fc())
    result = explain(model, X, [0, 3])
    acts = model.features(X).detach()
    weights = model.head[2].weight.detach()[result.classes]  # (B, T, K)
    cam = torch.einsum("btk,bkhw->bthw", weights, acts) / 16
    for name in ("hirescam", "gradcam", "xgradcam"):
        torch.testing.assert_close(result.maps[name], cam, rtol=RTOL, atol=ATOL)
    assert result.guarantee


def test_p6_difference_is_n_times_covariance():
    with seeded():
        head = nn.Sequential(nn.Conv2d(6, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5), nn.Tanh())
    model = Split(conv_features(), head)
    result = explain(model, X, 4)
    acts = model.features(X).detach().requires_grad_()
    (grads,) = torch.autograd.grad(model.head(acts)[:, 4].sum(), acts)
    a, g = acts.detach().flatten(2), grads.flatten(2)
    cov = ((g - g.mean(-1, keepdim=True)) * (a - a.mean(-1, keepdim=True))).mean(-1).sum(-1)
    diff = result.maps["hirescam"].sum((-2, -1)) - result.maps["gradcam"].sum((-2, -1))
    torch.testing.assert_close(diff[:, 0], 16 * cov, rtol=1e-4, atol=ATOL)
    hires = (grads * acts.detach()).sum(1)
    torch.testing.assert_close(result.maps["hirescam"][:, 0], hires, rtol=RTOL, atol=ATOL)


def test_p9_sigmoid_target_scales_maps_but_not_normalised_maps():
    model = Split(conv_features(), flatten_fc())
    squashed = Split(model.features, nn.Sequential(model.head, nn.Sigmoid()))
    raw = explain(model, X, 2)
    soft = explain(squashed, X, 2)
    slope = torch.sigmoid(raw.scores) * (1 - torch.sigmoid(raw.scores))
    for name in METHODS:
        if name in ("gradcam++",):  # not homogeneous in G by design
            continue
        torch.testing.assert_close(
            soft.maps[name], raw.maps[name] * slope[..., None, None], rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(
            normalize(soft.maps[name]), normalize(raw.maps[name]), rtol=1e-4, atol=1e-4
        )


def test_p10_non_positive_maps_normalise_to_zero():
    maps = torch.stack([-noise(4, 4).abs(), torch.zeros(4, 4), torch.full((4, 4), 3.0)])
    out = normalize(maps)
    assert torch.isfinite(out).all()
    assert (out == 0).all()
    ramp = normalize(torch.arange(16.0).view(4, 4) - 5)
    assert ramp.min() == 0 and ramp.max() == 1


def test_gradcam_plus_plus_and_layercam_on_gap_head():
    model = Split(conv_features(), gap_fc())
    result = explain(model, X, 0)
    acts = model.features(X).detach()
    weights = model.head[2].weight.detach()[0]
    grads = (weights / 16)[None, :, None, None].expand_as(acts)
    torch.testing.assert_close(result.maps["layercam"][:, 0], (grads.clamp_min(0) * acts).sum(1))
    torch.testing.assert_close(result.maps["gradcam-elementwise"][:, 0], (grads * acts).clamp_min(0).sum(1))
    # Grad-CAM++ with a constant gradient: alpha = 1 / (2 + sum(A) * g), weight = sum alpha * relu(g)
    denom = 2 + acts.sum((-2, -1)) * weights / 16
    w = torch.where(weights > 0, 16 * (weights / 16) / denom, 0.0)
    torch.testing.assert_close(
        result.maps["gradcam++"][:, 0], torch.einsum("bk,bkhw->bhw", w, acts), rtol=1e-4, atol=1e-5
    )
