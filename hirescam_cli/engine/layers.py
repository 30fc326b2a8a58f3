"""Target layers: tracing which modules run and what they output, choosing and checking one."""

import difflib
import weakref
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from . import layouts
from .layouts import Layout, LayoutSpec

_PROBE_SEED = 0


@dataclass(frozen=True)
class LayerInfo:
    """One module as seen in a forward pass."""

    name: str
    shape: tuple[int, ...] | None  # output shape of its last call; None if not a tensor
    calls: int
    layout: Layout | None = None  # how its output holds a spatial map; None: see `problem`
    problem: str | None = None  # why there is no layout (not spatial, or undecidable: names the key)
    ambiguous: bool = False  # spatial, but the layout is undecidable without the config
    grid_gradient: bool | None = None  # the probe score depends on its grid (None: not probed)
    projection: bool = False  # its module is an nn.Linear (e.g. an attention's query, key or value)

    @property
    def positions(self) -> int:
        """Grid positions h*w of a spatial output, else 0."""
        return self.layout.positions if self.layout is not None else 0

    @property
    def channels(self) -> int:
        """K of a spatial output, else 0."""
        return self.layout.channels(self.shape) if self.layout is not None else 0


def first_tensor(output: object) -> Tensor | None:
    """What hooks read of a module's output: the tensor itself, or the first tensor of a tuple (the
    layers of Hugging Face models, attention modules); None when there is none."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple):
        return next((item for item in output if isinstance(item, Tensor)), None)
    return None


def with_first(output: object, tensor: Tensor) -> object:
    """A module's output with the tensor `first_tensor` reads replaced by `tensor` (for hooks that
    replace an output), the rest of a tuple kept as it was."""
    if isinstance(output, Tensor):
        return tensor
    index = next(i for i, item in enumerate(output) if isinstance(item, Tensor))
    items = (*output[:index], tensor, *output[index + 1 :])
    return type(output)(*items) if hasattr(output, "_fields") else items  # a namedtuple stays one


@dataclass
class _Call:
    """What the trace saw of one module's last call."""

    module: nn.Module
    output: object
    calls: int
    source: str | None  # the module whose output this one passes on unchanged in layout
    first_input: Tensor | None = None  # kept while probing, for the classifier's input


def trace_layers(
    model: nn.Module, example: Tensor, spec: LayoutSpec | None = None, probe: bool = False
) -> list[LayerInfo]:
    """Run one forward on `example` and describe every submodule, in the order its last call ended.

    Each spatial output gets its layout (inferred, or fixed by `spec`). With `probe`, one
    gradient of a fixed random mix of what the classifier reads says, for every module that runs
    once, whether the score depends on its grid positions at all.
    """
    calls: dict[str, _Call] = {}
    producer: dict[int, tuple[weakref.ref, str]] = {}  # id of a live output -> the module that returned it

    def made_by(tensor: Tensor) -> str | None:
        ref, name = producer.get(id(tensor), (None, None))
        return name if ref is not None and ref() is tensor else None

    def recorder(name: str, module: nn.Module):
        leaf = next(module.children(), None) is None and next(module.parameters(), None) is None

        def hook(_module: nn.Module, inputs: tuple, raw: object) -> None:
            output = first_tensor(raw)
            count = calls.pop(name).calls + 1 if name in calls else 1
            source = None
            first = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
            if output is not None:
                source = made_by(output)  # a container handing on a child's output
                if source is None and leaf and first is not None and first.shape == output.shape:
                    source = made_by(first)  # an elementwise module (activation, dropout)
                producer[id(output)] = (weakref.ref(output), name)
            calls[name] = _Call(module, output, count, source, first if probe else None)

        return hook

    handles = [m.register_forward_hook(recorder(n, m)) for n, m in model.named_modules() if n]
    try:
        if probe:
            with torch.inference_mode(False), torch.enable_grad():
                start = example.detach().requires_grad_()
                logits = model(start.clone())  # a clone, so in-place ops on the input stay legal
        else:
            with torch.inference_mode():
                logits = model(example)
    finally:
        for handle in handles:
            handle.remove()
    hints = layouts.model_hints(model, tuple(example.shape[2:]))
    infos = _describe(calls, hints, spec or LayoutSpec(), batch=example.shape[0])
    return _probe_grids(infos, calls, _probe_score(calls, logits, made_by)) if probe else infos


def _describe(
    calls: dict[str, _Call], hints: layouts.ModelHints, spec: LayoutSpec, batch: int
) -> list[LayerInfo]:
    """Shapes and layouts of every traced module."""
    infos: dict[str, LayerInfo] = {}
    shapes = {n: tuple(c.output.shape) if isinstance(c.output, Tensor) else None for n, c in calls.items()}
    conv_grids = tuple(
        (shape[1], shape[2:])
        for name, shape in shapes.items()
        if shape is not None and layouts.module_evidence(calls[name].module, shape) == layouts.FIRST
    )
    for name, call in calls.items():
        shape = shapes[name]
        if shape is None:
            problem = f"layer {name!r} does not output a tensor (nor a tuple holding one)"
            infos[name] = LayerInfo(name, None, call.calls, problem=problem)
            continue
        if not shape or shape[0] != batch:
            problem = f"layer {name!r} outputs {shape}, whose first axis is not the batch of images"
            infos[name] = LayerInfo(name, shape, call.calls, problem=problem)
            continue
        evidence = layouts.module_evidence(call.module, shape)
        inherited = infos.get(call.source) if call.source else None
        passed_on = inherited is not None and inherited.layout is not None and inherited.shape == shape
        if evidence is None and passed_on and inherited.layout.kind != layouts.TOKENS:
            evidence = inherited.layout.kind
        try:
            layout = layouts.infer(name, shape, hints, spec, evidence, conv_grids)
            projection = isinstance(call.module, nn.Linear)
            infos[name] = LayerInfo(name, shape, call.calls, layout=layout, projection=projection)
        except layouts.LayoutError as e:
            infos[name] = LayerInfo(name, shape, call.calls, problem=str(e), ambiguous=e.ambiguous)
    return list(infos.values())


def _probe_score(calls: dict[str, _Call], logits: object, made_by) -> Tensor | None:
    """A fixed random mix of what the classifier reads (its input), else of the logits.

    Probing at the classifier's input keeps the test structural: a freshly built torchvision
    ViT has an all-zero head, so its logits depend on nothing, yet its features are what count.
    """
    if not isinstance(logits, Tensor):
        return None
    features, name = logits, made_by(logits)
    while name is not None:
        call = calls[name]
        if call.source is None and call.first_input is not None and call.first_input.requires_grad:
            features = call.first_input
        name = call.source
    if not features.requires_grad:
        return None
    mix = torch.randn(features.shape, generator=torch.Generator().manual_seed(_PROBE_SEED))
    return (features * mix.to(features)).sum()


def _probe_grids(infos: list[LayerInfo], calls: dict[str, _Call], score: Tensor | None) -> list[LayerInfo]:
    """Mark which once-run spatial layers the probe score depends on, over their grid positions."""
    probed = [info for info in infos if info.layout is not None and info.calls == 1]
    outputs = [calls[info.name].output for info in probed]
    wanted = [i for i, out in enumerate(outputs) if out.requires_grad]
    grads: list[Tensor | None] = [None] * len(outputs)
    if score is not None and wanted:
        found = torch.autograd.grad(score, [outputs[i] for i in wanted], allow_unused=True)
        for i, grad in zip(wanted, found, strict=True):
            grads[i] = grad
    depends = {
        info.name: grad is not None and bool(info.layout.to_flat(grad).ne(0).any())
        for info, grad in zip(probed, grads, strict=True)
    }
    return [replace(i, grid_gradient=depends[i.name]) if i.name in depends else i for i in infos]


def probe_input(x: Tensor) -> Tensor:
    """A fixed random image shaped like one of x's, for decisions that must not depend on the data."""
    noise = torch.randn((1, *x.shape[1:]), generator=torch.Generator().manual_seed(_PROBE_SEED))
    return noise.to(device=x.device, dtype=x.dtype)


def choose_auto(layers: list[LayerInfo]) -> str:
    """Where the model looked: the last once-run spatial layer whose grid the scores depend on.

    Needs a probed trace. Among such layers, the last one as wide (K) as the network's last
    spatial layer wins, and the output of a linear projection only when nothing else is left, so a
    ViT gets its last block's input norm rather than a wider attention projection (timm's qkv) or
    one of its separate key and value projections (Hugging Face's); a layer with a single grid
    position is taken only when there is nothing else.
    """
    usable = [i for i in layers if i.calls == 1 and i.layout is not None and i.grid_gradient]
    spatial = [i for i in usable if i.positions > 1] or usable
    if not spatial:
        raise ValueError(
            "no module runs once per forward with a spatial output the scores depend on; "
            "pass target_layer (see `hirescam layers`)"
        )
    grids = [i for i in layers if i.calls == 1 and i.layout is not None and i.positions > 1]
    width = grids[-1].channels if grids else 0
    wide = [i for i in spatial if i.channels == width] or spatial
    return ([i for i in wide if not i.projection] or wide)[-1].name


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
    """The nearest parent of `name` that runs exactly once and outputs a spatial map."""
    by_name = {info.name: info for info in layers}
    while "." in name:
        name = name.rsplit(".", 1)[0]
        info = by_name.get(name)
        if info is not None and info.calls == 1 and info.layout is not None:
            return name
    return None


def earlier_layers(layers: list[LayerInfo], target: str) -> list[LayerInfo]:
    """Spatial layers that run once and finish before `target` starts (not inside it), nearest first."""
    names = [info.name for info in layers]
    before = layers[: names.index(target)] if target in names else []
    return [
        info
        for info in reversed(before)
        if info.layout is not None and info.calls == 1 and not info.name.startswith(target + ".")
    ]
