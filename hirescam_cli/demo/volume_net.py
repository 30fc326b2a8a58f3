"""The 3-D demo classifier: a small CNN over 32^3 CT volumes at 5 mm whose head is flatten + linear.

Its input is what `configs/demo3d.toml` makes of a scan: reoriented to RAS, resampled to 5 mm voxels,
windowed to [-1000, 400] HU (mapped to [0, 1]) and centre-cropped or padded to 32^3 (160 mm).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hirescam_cli.demo.phantoms import CLASSES

SIDE, SPACING = 32, 5.0  # the model's grid: 32^3 voxels of 5 mm
WINDOW = (-1000.0, 400.0)  # HU mapped to [0, 1]
WEIGHTS_PATH = Path(__file__).with_name("volume_net.pt")
SPARSE_WEIGHTS_PATH = Path(__file__).with_name("volume_sparse_net.pt")
LABELS_PATH = Path(__file__).with_name("volume_labels.txt")


def window(hu: torch.Tensor) -> torch.Tensor:
    """HU -> the model's [0, 1] input, as the demo config's window does."""
    low, high = WINDOW
    return hu.clamp(low, high).sub(low).div(high - low)


def _block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    """conv 3^3 -> (2^3 max pool) -> batch norm -> ReLU."""
    layers = [nn.Conv3d(cin, cout, 3, padding=1, bias=False)]
    layers += [nn.MaxPool3d(2)] if pool else []
    return nn.Sequential(*layers, nn.BatchNorm3d(cout), nn.ReLU())


class VolumeNet(nn.Module):
    """Multi-label lesion classifier: 32^3 -> 24 x 8^3 features -> flatten -> linear (HiResCAM's guarantee).

    features.3 (the last block, an 8^3 grid of 20 mm cells) is the natural target layer.
    """

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(1, 6, pool=True),
            _block(6, 12, pool=True),
            _block(12, 24, pool=False),
            _block(24, 24, pool=False),
        )
        side = SIDE // 4
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(24 * side**3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw class logits (a sigmoid gives per-class probabilities)."""
        return self.head(self.features(x))


def _load(path: Path) -> nn.Module:
    model = VolumeNet()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def load_volume_model() -> nn.Module:
    """The shipped, trained VolumeNet in eval mode on the CPU."""
    return _load(WEIGHTS_PATH)


def read_cells(side: int = SIDE // 4) -> torch.Tensor:
    """bool (side, side, side): the 3-D checkerboard of cells the sparse head reads ((i + j + k) even)."""
    i, j, k = torch.meshgrid(*(torch.arange(side),) * 3, indexing="ij")
    return (i + j + k) % 2 == 0


def load_sparse_volume_model() -> nn.Module:
    """The shipped VolumeNet with a head that provably reads only the checkerboard cells."""
    return _load(SPARSE_WEIGHTS_PATH)
