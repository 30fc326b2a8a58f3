"""Target layers: tracing which modules run and what they output, choosing and checking one."""

import difflib
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerInfo:
    """One module as seen in a forward pass."""

    name: str
    shape: tuple[int, ...] | None  # output shape of its last call; None if not a tensor
    calls: int

    @property
    def is_map(self) -> bool:
        """True when the output is a (B, K, h, w) feature map."""
        return self.shape is not None and len(self.shape) == 4

    @property
    def positions(self) -> int:
        """Spatial positions h*w of a map output, else 0."""
        return self.shape[2] * self.shape[3] if self.is_map else 0


def trace_layers(model: nn.Module, example: Tensor) -> list[LayerInfo]:
    """Run one forward on `example` and list every submodule in the order its last call ended."""
    seen: dict[str, LayerInfo] = {}

    def recorder(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            calls = seen.pop(name).calls + 1 if name in seen else 1
            shape = tuple(output.shape) if isinstance(output, Tensor) else None
            seen[name] = LayerInfo(name, shape, calls)

        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules() if n]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return list(seen.values())


def choose_auto(layers: list[LayerInfo]) -> str:
    """The last module that runs once and outputs a spatial (B, K, h, w) map."""
    once = [info for info in layers if info.calls == 1 and info.is_map]
    spatial = [info for info in once if info.positions > 1]
    if spatial or once:
        return (spatial or once)[-1].name
    raise ValueError(
        "no module outputs a (B, K, h, w) map exactly once per forward; "
        "pass target_layer (see `hirescam layers`)"
    )


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name`, or a ValueError that lists the closest names."""
    modules = dict(model.named_modules())
    modules.pop("", None)
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.4)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ValueError(f"unknown target layer {name!r}{hint} (see `hirescam layers`)")


def enclosing_once(layers: list[LayerInfo], name: str) -> str | None:
    """The nearest parent of `name` that runs exactly once and outputs a map."""
    by_name = {info.name: info for info in layers}
    while "." in name:
        name = name.rsplit(".", 1)[0]
        info = by_name.get(name)
        if info is not None and info.calls == 1 and info.is_map:
            return name
    return None


def earlier_layers(layers: list[LayerInfo], target: str) -> list[str]:
    """Map layers that run once and finish before `target` starts (not inside it), nearest first."""
    names = [info.name for info in layers]
    before = layers[: names.index(target)] if target in names else []
    return [
        info.name
        for info in reversed(before)
        if info.is_map and info.calls == 1 and not info.name.startswith(target + ".")
    ]
