"""Tiny models that test configs name as `factory = "tiny_models:..."`, each built under a fixed seed."""

import torch
from determinism import seeded
from torch import nn


def _features() -> list[nn.Module]:
    """Conv features to a 4-channel 8x8 map for 16x16 inputs."""
    return [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU()]


@seeded()
def tiny_net() -> nn.Module:
    """Conv features to an 8x8 map (for 16x16 inputs), then flatten + linear: HiResCAM's guarantee holds."""
    return nn.Sequential(*_features(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))


def corner_net() -> nn.Module:
    """Like tiny_net, but every class reads only the top-left position of the map."""
    model = tiny_net()
    with torch.no_grad():
        model[5].weight.view(3, 4, 8, 8)[:, :, 1:, :] = 0
        model[5].weight.view(3, 4, 8, 8)[:, :, :, 1:] = 0
        model[5].weight.abs_()
        model[2].bias.fill_(1.0)
    return model


class _Slow(nn.Module):
    """Wraps a model and sleeps in every forward, so a test can interrupt a run midway."""

    def __init__(self, model: nn.Module, seconds: float):
        super().__init__()
        self.model, self.seconds = model, seconds

    def forward(self, x):
        import time

        time.sleep(self.seconds)
        return self.model(x)


def slow_net() -> nn.Module:
    """tiny_net that takes at least 0.2 s per batch."""
    return _Slow(tiny_net(), 0.2)


class _Gated(nn.Module):
    """Wraps a model; from its second forward over several inputs (the first is the first batch: the
    explainer's setup probes each run on one input), waits while the file named by $HIRESCAM_TEST_GATE
    exists, so a test can hold a run midway."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.batches = model, 0

    def forward(self, x):
        import os
        import time

        self.batches += x.shape[0] > 1
        gate = os.environ.get("HIRESCAM_TEST_GATE")
        while self.batches > 1 and gate and os.path.exists(gate):
            time.sleep(0.02)
        return self.model(x)


def gated_net() -> nn.Module:
    """tiny_net held at its second batch while $HIRESCAM_TEST_GATE exists."""
    return _Gated(tiny_net())


@seeded()
def tiny_vit() -> nn.Module:
    """A torchvision VisionTransformer for 32x32 inputs: a class token and a 4x4 patch grid."""
    import torchvision

    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    return model


@seeded()
def untrained_vit() -> nn.Module:
    """tiny_vit as torchvision builds it: an all-zero head, so no score depends on any token."""
    import torchvision

    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    )


@seeded()
def tiny_swin() -> nn.Module:
    """A torchvision SwinTransformer for 32x32 inputs: channels-last stages of 8x8 and 4x4."""
    import torchvision

    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=12, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2], num_classes=3
    )


@seeded()
def gap_net() -> nn.Module:
    """tiny_net's features, then global average pooling + linear: HiResCAM == Grad-CAM at "3"."""
    return nn.Sequential(*_features(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


@seeded()
def tiny_net3d() -> nn.Module:
    """Conv3d features to a 4-channel 4x3x2 map (for 8x6x4 volumes), then flatten + linear: an affine head."""
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 3 * 2, 3),
    )


CELL = (1, 2, 1)  # the cell of tiny_net3d's 4 x 3 x 2 grid (for 8 x 6 x 4 inputs) that cell_net3d reads


def cell_net3d() -> nn.Module:
    """tiny_net3d whose every class reads only the grid cell CELL, with positive weights and activations."""
    model = tiny_net3d()
    with torch.no_grad():
        weight = model[5].weight.view(3, 4, 4, 3, 2)
        weight.copy_(torch.linspace(0.1, 1.0, weight.numel()).view_as(weight))
        keep = torch.zeros(4, 3, 2, dtype=torch.bool)
        keep[CELL] = True
        weight[:, :, ~keep] = 0
        model[5].bias.zero_()
        model[2].bias.fill_(1.0)
    return model


def slow_net3d() -> nn.Module:
    """tiny_net3d that takes at least 0.2 s per batch."""
    return _Slow(tiny_net3d(), 0.2)


def perturbed_net() -> nn.Module:
    """tiny_net with seeded noise added to its head's weights: a "retrained" model whose predictions and
    maps differ from tiny_net's on some inputs."""
    from determinism import noise

    model = tiny_net()
    with torch.no_grad():
        weight = model[5].weight
        weight.add_(noise(*weight.shape, seed=1) * weight.abs().mean() * 1.5)
    return model


def _grid_net(strides: int) -> nn.Module:
    """Conv features of 28x28 inputs with `strides` stride-2 convolutions (grid 14x14 or 7x7), then flatten
    + linear."""
    layers: list[nn.Module] = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()]
    for _ in range(strides):
        layers += [nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU()]
    side = 28 >> strides
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * side * side, 3))


@seeded()
def grid14_net() -> nn.Module:
    """A 14x14 grid for 28x28 inputs (compare across grids)."""
    return _grid_net(1)


@seeded()
def grid7_net() -> nn.Module:
    """A 7x7 grid for 28x28 inputs (compare across grids)."""
    return _grid_net(2)


@seeded()
def grid33_net() -> nn.Module:
    """A 33x33 grid for 66x66 inputs: more positions than a summary keeps (1,024)."""
    layers = [nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(2 * 33 * 33, 3))
