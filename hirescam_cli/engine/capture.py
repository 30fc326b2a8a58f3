"""The capture: a hook on the target layer makes its output a leaf of autograd, so one forward records
only the head and one batched gradient reaches the layer for every target class."""

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from . import layers
from .layouts import Layout, LayoutSpec


class Capture:
    """The model, its target layer (chosen once when "auto") and that layer's layout per input shape."""

    def __init__(self, model: nn.Module, target_layer: str, spec: LayoutSpec, amp: bool):
        self.model, self.target_layer, self.spec, self.amp = model, target_layer, spec, amp
        if target_layer != "auto":
            layers.get_module(model, target_layer)
        self._layouts: dict[tuple[int, ...], Layout] = {}

    def layout(self, x: Tensor) -> Layout:
        """How the target layer's output is read for inputs shaped like x (decided once per shape).

        With target_layer "auto", the first call also chooses the layer (`layers.choose_auto`, on a
        fixed random probe input, so the choice never depends on the data).
        """
        key = tuple(x.shape[1:])
        if key not in self._layouts:
            probe = layers.probe_input(x)
            auto = self.target_layer == "auto"
            traced = layers.trace_layers(self.model, probe, self.spec, probe=auto)
            if auto:
                self.target_layer = layers.choose_auto(traced)
            self._layouts[key] = self._target_layout(traced)
        return self._layouts[key]

    def trace(self, x: Tensor) -> list[layers.LayerInfo]:
        """Every module as one forward of a probe shaped like x[:1] sees it."""
        return layers.trace_layers(self.model, layers.probe_input(x[:1]), self.spec)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=device.type, dtype=dtype)

    def run_with(self, x: Tensor, replace: Callable[[Tensor], Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Forward x with a hook that maps the target layer's raw output through `replace`.

        The raw output is in the layer's own layout (`self.layout(x)` reads it as a grid map); of a
        layer that returns a tuple, it is the tuple's first tensor, and the rest is passed on as it is.
        """
        layout = self.layout(x)
        module = layers.get_module(self.model, self.target_layer)
        outputs: list[Tensor] = []

        def hook(_module: nn.Module, _inputs: object, output: object) -> object:
            tensor = layers.first_tensor(output)
            if tensor is None or not layout.fits(tuple(tensor.shape)):
                shape = tuple(tensor.shape) if tensor is not None else type(output).__name__
                raise ValueError(
                    f"target layer {self.target_layer!r} outputs {shape}, which does not fit its "
                    f"layout {layout} (see `hirescam layers`)"
                )
            outputs.append(tensor)
            return layers.with_first(output, replace(tensor))

        handle = module.register_forward_hook(hook)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if len(outputs) > 1:
            raise ValueError(self.called_twice_message(self.trace(x), len(outputs)))
        if not outputs:
            raise ValueError(f"target layer {self.target_layer!r} did not run in the forward pass")
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"the model must return (B, num_classes) logits; got {shape}")
        return logits, outputs

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The real pass: the target's output becomes a leaf, so autograd records only the head."""
        leaves: list[Tensor] = []

        def to_leaf(output: Tensor) -> Tensor:
            leaf = output.detach().requires_grad_()
            leaves.append(leaf)
            return leaf.clone()  # later in-place ops then touch the clone, never the leaf

        with torch.enable_grad(), self.autocast(x.device):
            logits, _ = self.run_with(x, to_leaf)
        return leaves[0], logits

    def gradients(self, scores: Tensor, leaf: Tensor, valid: Tensor) -> Tensor:
        """d score / d A for all T targets in one (batched) backward: (B, T, *raw layout)."""
        batch, count = scores.shape
        if count == 0:
            return leaf.new_zeros((batch, 0, *leaf.shape[1:]))
        if not scores.requires_grad:
            raise ValueError(f"the class scores do not depend on target layer {self.target_layer!r}")
        eye = torch.eye(count, dtype=scores.dtype, device=scores.device)
        seeds = eye[:, None, :] * valid.T[:, :, None]  # (T, B, T): target t's one-hot, masked
        if count == 1:
            (grad,) = torch.autograd.grad(scores, leaf, seeds[0])
            return grad.unsqueeze(1)
        (grad,) = torch.autograd.grad(scores, leaf, seeds, is_grads_batched=True)
        return grad.movedim(0, 1)

    def gives_the_same_logits(self, logits: Tensor, plain: Tensor) -> bool:
        """Whether `logits`, of a larger batch the target layer handed on, are the `plain` forward's to
        rounding (mixed precision's larger): the check of occlusion's and the head probe's larger batch."""
        tol = (2e-2 if self.amp else 1e-3) * float(plain.abs().max()) + 1e-5
        return float((logits - plain.to(logits)).abs().max()) <= tol

    def called_twice_message(self, traced: list[layers.LayerInfo], calls: int) -> str:
        parent = layers.enclosing_once(traced, self.target_layer)
        fix = f"use {parent!r}, which runs once" if parent else "choose a module that runs once"
        return (
            f"target layer {self.target_layer!r} is called {calls} times in one forward, so its "
            f"activations and gradients cannot be paired; {fix}"
        )

    def _target_layout(self, traced: list[layers.LayerInfo]) -> Layout:
        """The target layer's layout from a trace, or a ValueError saying why there is none."""
        info = next((i for i in traced if i.name == self.target_layer), None)
        if info is None:
            raise ValueError(f"target layer {self.target_layer!r} did not run in the forward pass")
        if info.calls > 1:
            raise ValueError(self.called_twice_message(traced, info.calls))
        if info.layout is None and info.ambiguous:
            raise ValueError(info.problem)  # names the key that decides it
        if info.layout is None:
            raise ValueError(f"{info.problem}; choose another layer (see `hirescam layers`)")
        return info.layout


def check_input(x: Tensor) -> None:
    """A ValueError unless x is a non-empty floating (B, C, *spatial) batch outside inference mode."""
    if not isinstance(x, Tensor) or x.ndim < 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"input must be a (B, C, *spatial) tensor, e.g. (B, C, H, W); got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"input must be floating point; got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("input batch is empty")
    if torch.is_inference_mode_enabled():
        raise ValueError("cannot explain inside torch.inference_mode(): gradients are needed")


def select_targets(
    logits: Tensor,
    top_k: int,
    classes: int | Sequence[int] | Tensor | None,
    threshold: float | None,
) -> tuple[Tensor, Tensor]:
    """The (B, T) classes to explain and their validity mask."""
    batch, num_classes = logits.shape
    device = logits.device
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
        probs = torch.sigmoid(logits.float())
        passed = probs >= threshold
        count = int(passed.sum(1).max())
        ranked, order = torch.where(passed, probs, -1.0).topk(count, dim=1)
        return order, ranked >= 0
    if classes is None:
        if not 1 <= top_k <= num_classes:
            raise ValueError(f"top_k must be between 1 and {num_classes}; got {top_k}")
        order = logits.topk(top_k, dim=1).indices
        return order, torch.ones_like(order, dtype=torch.bool)
    targets = torch.as_tensor(classes, device=device)
    if targets.numel() == 0:
        raise ValueError("classes is empty")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError("classes must be integers")
    if targets.ndim == 0:
        targets = targets.reshape(1)
    if targets.ndim == 1:
        targets = targets.expand(batch, -1)
    if targets.ndim != 2 or targets.shape[0] != batch:
        raise ValueError(f"classes must be an int, a list or a ({batch}, T) tensor")
    bad = (targets < 0) | (targets >= num_classes)
    if bad.any():
        raise ValueError(f"class {int(targets[bad][0])} is out of range 0..{num_classes - 1}")
    targets = targets.long().contiguous()
    return targets, torch.ones_like(targets, dtype=torch.bool)
