"""What the gradient says about the maps: constant over the grid for every channel (HiResCAM equals
Grad-CAM by construction, as behind a global-average-pool head) or zero (no map can show anything),
per target, and per layer for the whole model."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import layers
from .capture import Capture, check_input

CONSTANT_TOLERANCE = 1e-5  # G varying by less than this fraction of max |G| counts as constant


def constant_over_grid(grads: Tensor) -> Tensor:
    """(B, T, K, N) gradients -> (B, T) bool: every channel's gradient is the same at every position
    (to CONSTANT_TOLERANCE of max |G|), so HiResCAM equals Grad-CAM by construction."""
    spread = grads.amax(-1) - grads.amin(-1)
    scale = grads.abs().amax((-2, -1))
    return (spread <= CONSTANT_TOLERANCE * scale[..., None]).all(-1)


def zero_over_grid(grads: Tensor) -> Tensor:
    """(B, T, K, N) gradients -> (B, T) bool: the score does not depend on the grid at all."""
    return ~grads.ne(0).flatten(2).any(-1)


def identical_layers(
    capture: Capture, x: Tensor, spatial: Sequence[layers.LayerInfo]
) -> dict[str, bool | None]:
    """Per layer: are HiResCAM and Grad-CAM identical by construction for x's top-1 classes?

    One forward keeps every given layer's output in the graph and one gradient of the top-1
    scores reaches them all; each is read through its layout. None for a layer the score does
    not depend on, or only through a zero gradient (all None when the model does not return
    (B, C) logits). Give layers that run once per forward.
    """
    outputs: dict[str, Tensor] = {}

    def keep(info: layers.LayerInfo):
        def hook(_module: nn.Module, _inputs: object, output: object) -> object:
            tensor = layers.first_tensor(output)
            fits = tensor is not None and info.layout.fits(tuple(tensor.shape))
            if not fits or not tensor.requires_grad:
                return None
            outputs[info.name] = tensor
            return layers.with_first(output, tensor.clone())  # a later in-place op rewrites the clone

        return hook

    model = capture.model
    by_name = {info.name: info for info in spatial}
    modules = [(layers.get_module(model, info.name), info) for info in spatial]
    handles = [module.register_forward_hook(keep(info)) for module, info in modules]
    try:
        with torch.enable_grad(), capture.autocast(x.device):
            logits = model(x.detach().requires_grad_())
            score = logits.max(1).values.sum() if isinstance(logits, Tensor) and logits.ndim == 2 else None
    finally:
        for handle in handles:
            handle.remove()
    kept = list(outputs)
    found: dict[str, bool | None] = {}
    if kept and score is not None and score.requires_grad:
        grads = torch.autograd.grad(score, [outputs[n] for n in kept], allow_unused=True)
        for name, grad in zip(kept, grads, strict=True):
            flat = None if grad is None else by_name[name].layout.to_flat(grad)[:, None]
            depends = flat is not None and not bool(zero_over_grid(flat).all())
            found[name] = bool(constant_over_grid(flat).all()) if depends else None
    return {info.name: found.get(info.name) for info in spatial}


def differing_layer(capture: Capture, x: Tensor) -> str | None:
    """The nearest layer before the target (not inside it) where HiResCAM and Grad-CAM differ for x."""
    check_input(x)
    capture.layout(x)  # settles an "auto" target
    earlier = layers.earlier_layers(capture.trace(x), capture.target_layer)
    identical = identical_layers(capture, x[:1], earlier)
    return next((info.name for info in earlier if identical[info.name] is False), None)
