"""CAM methods as pure tensor math: activations A and gradients G in, raw maps out.

Shapes: A is (B, K, N), the target layer's output over its N flat grid positions (whatever the
grid's rank: the layout reads it so); G is (B, T, K, N), the gradient of each of T target scores
with respect to A. Every method returns the RAW map (B, T, N): signed where the method is signed,
before any ReLU or normalisation. Nothing here knows the grid's shape.

This module imports no torch (the functions only call tensor methods), so the config can check
method names without loading it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

Method = Callable[["Tensor", "Tensor"], "Tensor"]


def _position_sum(x: Tensor) -> Tensor:
    """Sum over the grid positions, keeping the axis for broadcasting."""
    return x.sum(-1, keepdim=True)


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den is non-zero, else 0."""
    nonzero = den != 0
    return (num / den.where(nonzero, 1.0)).where(nonzero, 0.0)


def hirescam(a: Tensor, g: Tensor) -> Tensor:
    """HiResCAM: element-wise gradient times activation, summed over channels."""
    return (g * a.unsqueeze(1)).sum(-2)


def gradcam(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM: activations weighted by the spatially averaged gradient (before ReLU)."""
    return (g.mean(-1, keepdim=True) * a.unsqueeze(1)).sum(-2)


def gradcam_elementwise(a: Tensor, g: Tensor) -> Tensor:
    """Element-wise Grad-CAM: ReLU of gradient times activation, summed over channels."""
    return (g * a.unsqueeze(1)).clamp_min(0).sum(-2)


def xgradcam(a: Tensor, g: Tensor) -> Tensor:
    """XGrad-CAM: channel weights sum(G*A)/sum(A) over positions."""
    a = a.unsqueeze(1)
    weights = _safe_divide(_position_sum(g * a), _position_sum(a))
    return (weights * a).sum(-2)


def gradcam_plus_plus(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM++ with the closed-form second/third-order terms of an exponential score."""
    a = a.unsqueeze(1)
    g2 = g * g
    alpha = _safe_divide(g2, 2 * g2 + _position_sum(a) * g2 * g)
    weights = _position_sum(alpha * g.clamp_min(0))
    return (weights * a).sum(-2)


def layercam(a: Tensor, g: Tensor) -> Tensor:
    """LayerCAM: activations weighted element-wise by the positive gradient."""
    return (g.clamp_min(0) * a.unsqueeze(1)).sum(-2)


METHODS: dict[str, Method] = {
    "hirescam": hirescam,
    "gradcam": gradcam,
    "gradcam++": gradcam_plus_plus,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "gradcam-elementwise": gradcam_elementwise,
}


def check_methods(methods: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate method names and return them as a de-duplicated tuple in the given order."""
    if isinstance(methods, str):
        methods = (methods,)
    names = tuple(dict.fromkeys(methods))
    if not names:
        raise ValueError(f"no method given; choose from {', '.join(METHODS)}")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    return names


def compute(methods: tuple[str, ...], a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Every requested method's raw map from the same A and G, in float32."""
    a, g = a.float(), g.float()
    return {name: METHODS[name](a, g) for name in methods}
