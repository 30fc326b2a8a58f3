"""The demo classifier: a small CNN whose head after the last conv block is flatten + linear."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from hirescam_cli.demo.synthetic import CLASSES

INPUT_SIZE = (128, 128)
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
WEIGHTS_PATH = Path(__file__).with_name("demo_net.pt")
LABELS_PATH = Path(__file__).with_name("labels.txt")


def resize_input(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (..., 3, H, W) -> uint8 at INPUT_SIZE, with the CLI's bilinear antialiased resize."""
    return F.resize(image, list(INPUT_SIZE), interpolation=InterpolationMode.BILINEAR, antialias=True)


def normalise(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB at INPUT_SIZE -> the float model input: /255, then (x - MEAN) / STD."""
    return F.normalize(image.float() / 255, list(MEAN), list(STD))


def preprocess(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (..., 3, H, W) -> normalised float input, exactly as the CLI prepares it."""
    return normalise(resize_input(image))


def _conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    """conv3x3 -> (2x2 max pool) -> batch norm -> ReLU; pooling first keeps training cheap."""
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
    layers += [nn.MaxPool2d(2)] if pool else []
    return nn.Sequential(*layers, nn.BatchNorm2d(cout), nn.ReLU())


class DemoNet(nn.Module):
    """Multi-label shapes classifier: 128x128 input -> 64 x 8 x 8 features -> flatten -> linear.

    features.4 (the last block, 8x8) is the natural target layer: everything after it is affine.
    """

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(3, 16, pool=True),
            _conv_block(16, 32, pool=True),
            _conv_block(32, 64, pool=True),
            _conv_block(64, 64, pool=True),
            _conv_block(64, 64, pool=False),
        )
        side = (INPUT_SIZE[0] // 16, INPUT_SIZE[1] // 16)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * side[0] * side[1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw class logits (apply a sigmoid for per-class probabilities)."""
        return self.head(self.features(x))


def load_demo_model() -> nn.Module:
    """The shipped, trained DemoNet in eval mode on the CPU."""
    model = DemoNet()
    model.load_state_dict(torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True))
    return model.eval()
