"""Is the head after the target layer affine? Then HiResCAM provably sums to the score minus the bias.

Decided once per model and input shape: every autograd node from the target to the logits must be
linear in it (an exact check of the recorded graph, knowing the 1-D, 2-D and 3-D pooling and
convolution nodes), and a probe at random activations confirms additivity and a baseline f(0) that
does not depend on the input.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .capture import Capture

PROBE_SEED = 0

# Autograd nodes that are linear in each input; for the products, in one input at a time.
LINEAR_NODES = {
    "AddBackward0",
    "AddBackward1",
    "SubBackward0",
    "SubBackward1",
    "NegBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "AsStridedBackward0",  # also 1-D adaptive average pooling's view of its input
    "AsStridedBackward1",
    "PermuteBackward0",
    "TBackward0",
    "TransposeBackward0",
    "ExpandBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "SqueezeBackward2",
    "UnsqueezeBackward0",
    "CloneBackward0",
    "ToCopyBackward0",
    "SliceBackward0",
    "SelectBackward0",
    "CatBackward0",
    "StackBackward0",
    "SplitBackward0",
    "UnbindBackward0",
    "IndexBackward0",
    "GatherBackward0",
    "MeanBackward0",
    "MeanBackward1",
    "SumBackward0",
    "SumBackward1",
    "AvgPool2DBackward0",  # also 1-D average pooling, which runs as 2-D
    "AvgPool3DBackward0",
    "AdaptiveAvgPool2DBackward0",
    "AdaptiveAvgPool3DBackward0",
    "NativeBatchNormBackward0",
    "CudnnBatchNormBackward0",
    "MulBackward1",
    "DivBackward1",
}
PRODUCT_NODES = {
    "MulBackward0",
    "MmBackward0",
    "BmmBackward0",
    "AddmmBackward0",
    "AddmvBackward0",
    "MvBackward0",
    "ConvolutionBackward0",  # every rank
    "CudnnConvolutionBackward0",
    "LinearBackward0",
}
QUOTIENT_NODES = {"DivBackward0"}  # linear in the numerator, while the denominator is a constant


@dataclass(frozen=True)
class Head:
    """What the analysis found about the computation from the target layer to the logits."""

    affine: bool
    baseline: Tensor  # (C,) logits at a zero activation


def analyse(capture: Capture, x: Tensor, logits: Tensor) -> Head:
    """The head of x's forward (`logits` with its graph): affine or not, and its baseline."""
    probe = _probe(capture, x[:1], logits[:1].detach())
    return Head(affine=probe.affine and graph_is_linear(logits.grad_fn), baseline=probe.baseline)


def _probe(capture: Capture, x: Tensor, logits: Tensor) -> Head:
    """Test additivity, odd symmetry and independence from the input numerically, for one input x and
    its `logits`: f(A), f(0), f(r1), f(r2), f(r1 + r2), f(-r1) at random activations r, and f(0) of
    another input."""
    with torch.inference_mode():
        rows = _expanded(capture, x, logits)
        if rows is None:  # the rest of the network cannot take the larger batch: repeat the input instead
            rows, _ = capture.run_with(torch.cat([x] * len(PROBES)), lambda out: _probes(out[:1]))
        other = torch.flip(x, dims=(-1,)) * 0.5 + 0.1
        f0_other = capture.run_with(other, torch.zeros_like)[0][0].double()
    _, f0, f1, f2, f12, fneg = rows.double()
    d1, d2 = f1 - f0, f2 - f0
    tol = 1e-4 * float(torch.stack([f0, d1, d2]).abs().max()) + 1e-6
    affine = all(float(err.abs().max()) <= tol for err in (f12 - f0 - d1 - d2, fneg - f0 + d1, f0_other - f0))
    return Head(affine=affine, baseline=f0.float())


PROBES = ("A", "0", "r1", "r2", "r1 + r2", "-r1")  # the probe's activations, in the order _probes stacks


def _probes(act: Tensor) -> Tensor:
    """The layer's output of one input (raw layout) and the activations the probe sets in its place."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    scale = float(act.float().std().clamp_min(1e-3))
    r1, r2 = ((torch.randn(act.shape, generator=generator) * scale).to(act) for _ in range(2))
    return torch.cat([act, torch.zeros_like(act), r1, r2, r1 + r2, -r1])


def _expanded(capture: Capture, x: Tensor, logits: Tensor) -> Tensor | None:
    """The probe's logits from one forward of x whose target layer hands the rest of the network the
    probe's activations as a larger batch (the layers below it run once); None where that batch fails or
    its first row, the layer's own output, does not give x's logits."""
    try:
        rows, _ = capture.run_with(x, _probes)
    except Exception:  # any failure of the larger batch means: repeat the input
        return None
    if rows.shape != (len(PROBES), logits.shape[1]):
        return None
    return rows if capture.gives_the_same_logits(rows[:1], logits) else None


def graph_is_linear(root: object) -> bool:
    """True when every node of the autograd graph under `root` is linear in its inputs."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        inputs = [fn for fn, _ in node.next_functions if fn is not None]
        name = node.name()
        if name in PRODUCT_NODES:
            if len(inputs) > 1:
                return False
        elif name in QUOTIENT_NODES:
            if node.next_functions[1][0] is not None:  # the denominator depends on the target
                return False
        elif name not in LINEAR_NODES and name != "torch::autograd::AccumulateGrad":
            return False
        stack.extend(inputs)
    return True
