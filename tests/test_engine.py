"""The Explainer API: one pass, batching, targets, hooks, errors, torchvision families."""

import gc

import pytest
import torch
import torchvision
from determinism import assert_close_scaled, noise, seeded
from torch import nn

from hirescam_cli import METHODS, Explainer


@seeded()
def small_net(classes: int = 5) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    ).eval()


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_auto_picks_last_map_that_runs_once():
    model = small_net()
    with Explainer(model) as explainer:
        explainer(noise(1, 3, 16, 16))
        assert explainer.target_layer == "4"


def test_batch_equals_images_one_by_one():
    model, x = small_net(), noise(4, 3, 16, 16)
    with Explainer(model, "4") as explainer:  # after the ReLU, XGrad-CAM's sum(A) cannot cancel to ~0
        batched = explainer(x, methods=tuple(METHODS), top_k=2)
        for i in range(4):
            single = explainer(x[i : i + 1], methods=tuple(METHODS), top_k=2)
            assert torch.equal(single.classes, batched.classes[i : i + 1])
            for name in METHODS:
                assert_close_scaled(single.maps[name], batched.maps[name][i : i + 1])


def test_top_k_equals_k_single_class_calls():
    model, x = small_net(), noise(3, 3, 16, 16)
    with Explainer(model, "3") as explainer:
        top = explainer(x, methods=tuple(METHODS), top_k=3)
        for t in range(3):
            one = explainer(x, methods=tuple(METHODS), classes=top.classes[:, t : t + 1])
            for name in METHODS:
                assert_close_scaled(one.maps[name][:, 0], top.maps[name][:, t])
            torch.testing.assert_close(one.scores[:, 0], top.scores[:, t])


def test_all_methods_cost_one_forward_and_one_gradient(monkeypatch):
    model, x = small_net(), noise(2, 3, 16, 16)
    forwards, grads = [], []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(1) or real_grad(*a, **k))
    with Explainer(model, "3") as explainer:
        explainer(x)  # the first call also probes the head once
        forwards.clear(), grads.clear()
        explainer(x, methods=tuple(METHODS), top_k=4)
    assert len(forwards) == 1 and len(grads) == 1


def test_only_the_head_is_recorded_and_parameters_get_no_grad():
    model = small_net()
    seen = []
    model[0].register_forward_hook(lambda _m, _i, out: seen.append(out.requires_grad))
    flags = [p.requires_grad for p in model.parameters()]
    with Explainer(model, "3") as explainer:
        explainer(noise(2, 3, 16, 16), top_k=3)
        assert all(not p.requires_grad for p in model.parameters())
    assert not any(seen)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_hooks_are_removed_also_after_an_exception():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small_net()

        def forward(self, x):
            self.body(x)
            raise RuntimeError("boom")

    model = Boom()
    with pytest.raises(RuntimeError, match="boom"), Explainer(model, "body.3") as explainer:
        explainer(noise(1, 3, 16, 16))
    assert no_hooks(model)
    with Explainer(small_net(), "3") as explainer:
        explainer(noise(1, 3, 16, 16))
    assert no_hooks(explainer.model)
    assert not explainer.model.training


def test_training_mode_is_restored():
    model = small_net().train()
    with Explainer(model, "3") as explainer:
        assert not model.training
        explainer(noise(2, 3, 16, 16))
    assert model.training


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_stays_flat_over_many_calls():
    model, x = small_net(), noise(8, 3, 48, 48)
    with Explainer(model, "0") as explainer:
        for _ in range(5):
            explainer(x, methods=tuple(METHODS), top_k=3)
        gc.collect()
        before = rss_bytes()
        for _ in range(30):
            explainer(x, methods=tuple(METHODS), top_k=3)
        gc.collect()
        growth = rss_bytes() - before
    # One call holds ~8*3*8*48*48*4 B = 1.7 MB of gradients; a leak would grow by that per call.
    assert growth < 30 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB"


def test_threshold_gives_variable_targets_with_a_validity_mask():
    model = small_net(4)
    with torch.no_grad():
        model[-1].weight.zero_()
        model[-1].bias.copy_(torch.tensor([3.0, -3.0, 1.0, -1.0]))
        model[-1].weight[1, 0] = 10.0  # class 1 depends on the input
    x = noise(6, 3, 16, 16)
    with Explainer(model, "3") as explainer:
        result = explainer(x, threshold=0.5)
        logits = result.logits
    passed = torch.sigmoid(logits) >= 0.5
    assert result.classes.shape[1] == int(passed.sum(1).max())
    assert torch.equal(result.valid.sum(1), passed.sum(1))
    for b in range(6):
        chosen = set(result.classes[b][result.valid[b]].tolist())
        assert chosen == set(torch.nonzero(passed[b]).flatten().tolist())
    assert (result.maps["hirescam"][~result.valid] == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": 7}, "out of range"),
        ({"classes": [-1]}, "out of range"),
        ({"classes": []}, "empty"),
        ({"methods": ("hirescam", "scorecam")}, "unknown method 'scorecam'"),
        ({"methods": ()}, "no method"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 6}, "top_k"),
        ({"threshold": 1.5}, "threshold"),
        ({"classes": 1, "threshold": 0.5}, "either"),
        ({"classes": torch.zeros(5, 1, dtype=torch.long)}, "classes must be"),
    ],
)
def test_bad_calls_raise_value_error(kwargs, message):
    with Explainer(small_net(), "3") as explainer, pytest.raises(ValueError, match=message):
        explainer(noise(2, 3, 16, 16), **kwargs)


@pytest.mark.parametrize(
    "x", [torch.zeros(3, 16), torch.zeros(16), torch.zeros(1, 3, 8, 8, dtype=torch.long)]
)
def test_bad_input_tensor_raises_value_error(x):
    with Explainer(small_net(), "3") as explainer, pytest.raises(ValueError, match="input must be"):
        explainer(x)


def test_unknown_layer_lists_the_closest_names():
    model = torchvision.models.resnet18(num_classes=3)
    with pytest.raises(
        ValueError, match=r"unknown target layer 'layer4\.1\.cnv1'; closest: layer4\.1\.conv1"
    ):
        Explainer(model, "layer4.1.cnv1")


def test_module_called_twice_is_refused_naming_the_enclosing_block():
    model = torchvision.models.resnet50(num_classes=3)
    with (
        Explainer(model, "layer4.2.relu") as explainer,
        pytest.raises(ValueError, match=r"called 3 times .* use 'layer4\.2', which runs once"),
    ):
        explainer(noise(1, 3, 32, 32))
    assert no_hooks(model)


def test_non_map_layer_is_refused_with_its_shape():
    with (
        Explainer(small_net(), "7") as explainer,
        pytest.raises(ValueError, match=r"outputs \(1, 5\), not a spatial map"),
    ):
        explainer(noise(1, 3, 16, 16))


def test_layer_the_score_does_not_depend_on_is_refused():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.main, self.aux = small_net(), nn.Conv2d(3, 4, 3)

        def forward(self, x):
            self.aux(x)
            return self.main(x)

    with (
        Explainer(Branch(), "aux") as explainer,
        pytest.raises(ValueError, match="do not depend on target layer 'aux'"),
    ):
        explainer(noise(1, 3, 16, 16))


def test_in_place_op_after_the_target_layer_is_safe():
    with seeded():
        model = torchvision.models.resnet18(num_classes=3)
    with Explainer(model, "layer4.1.bn2") as explainer:  # followed by `out += identity`
        result = explainer(noise(2, 3, 64, 64))
    assert torch.isfinite(result.maps["hirescam"]).all()


FAMILIES = {
    "resnet18": ("layer4", True),
    "vgg11": ("avgpool", False),
    "densenet121": ("features", False),
    "mobilenet_v3_small": ("features", False),
    "efficientnet_b0": ("features", True),
    "convnext_tiny": ("features", False),
    "regnet_y_400mf": ("trunk_output", True),
}


@pytest.mark.parametrize("arch", FAMILIES)
def test_torchvision_families(arch):
    layer, affine = FAMILIES[arch]
    with seeded():
        model = torchvision.models.get_model(arch, num_classes=4)
    x = noise(2, 3, 64, 64)
    with Explainer(model) as explainer:
        result = explainer(x, methods=tuple(METHODS), top_k=2)
        assert explainer.target_layer == layer
    assert result.guarantee == affine
    for name in METHODS:
        assert result.maps[name].shape[:2] == (2, 2)
        assert torch.isfinite(result.maps[name]).all()
    if affine:
        scale = result.scores.abs().max() + 1
        assert result.completeness_gap.abs().max() <= 1e-4 * scale


def test_mixed_precision_gives_nearly_the_same_maps():
    model, x = small_net(), noise(2, 3, 16, 16)
    with Explainer(model, "3") as exact, Explainer(model, "3", amp=True) as mixed:
        a, b = exact(x, classes=[0, 1]), mixed(x, classes=[0, 1])
    assert b.maps["hirescam"].dtype == torch.float32
    scale = a.maps["hirescam"].abs().max()
    assert (a.maps["hirescam"] - b.maps["hirescam"]).abs().max() < 0.05 * scale


class Paired(nn.Module):
    """A layer that returns a tuple, as Hugging Face layers and attention modules do."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple:
        return (None, self.inner(x), (x.shape[-2], x.shape[-1]))


class First(nn.Module):
    def forward(self, pair: tuple) -> torch.Tensor:
        return pair[1]


def test_a_layer_returning_a_tuple_is_read_and_replaced_through_its_first_tensor():
    """Capture, trace, diagnostics and occlusion read a tuple's first tensor and hand the rest on."""
    plain = small_net()
    paired = nn.Sequential(*plain[:3], Paired(plain[3]), First(), *plain[4:]).eval()
    x = noise(2, 3, 16, 16)
    with Explainer(plain, "3") as explainer:
        expected = explainer(x, methods=tuple(METHODS), top_k=2)
        occlusion = explainer.occlusion(x, expected.classes)
        traced = explainer.capture.trace(x)
        identical = explainer.identical_layers(x, [i for i in traced if i.name == "3"])
    with Explainer(paired, "3") as explainer:
        result = explainer(x, methods=tuple(METHODS), top_k=2)
        assert torch.equal(explainer.occlusion(x, result.classes), occlusion)
        traced = explainer.capture.trace(x)
        assert explainer.identical_layers(x, [i for i in traced if i.name == "3"]) == identical
        assert identical["3"] is not None  # the diagnostics' gradient reached the tuple's tensor
    for name in METHODS:
        assert torch.equal(result.maps[name], expected.maps[name])
    assert result.guarantee == expected.guarantee
    assert torch.equal(result.completeness_gap, expected.completeness_gap)
    info = next(i for i in traced if i.name == "3")
    assert info.shape == (1, 8, 8, 8) and str(info.layout) == "nchw 8x8"
    assert no_hooks(paired)
