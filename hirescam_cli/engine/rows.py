"""Prefix rows: after a token layer, modules whose outputs reach the scores only through the prefix
tokens' rows (a ViT's class token) backpropagate over those rows alone.

A ViT's head reads its class token, so in the last block only the class token's query, its attention
output and its MLP row can reach the logits; yet autograd runs every target's gradient back over all the
rows (197 for a ViT-B/16 at 224). Such a module keeps the values of its real forward, which records no
graph, and its gradient flows through a recomputation over the prefix rows of its first argument (its
other arguments whole: an attention's keys and values): the same gradient, exactly, at the cost of P rows.

Which modules may be cut so is decided once per input shape, structurally, on a probe input. A module
after the target layer (called once, its tensor arguments and its output holding the layer's token rows
on axis 1) qualifies when
  - NaN written into its output's other rows leaves the logits as they were: those rows cannot reach
    the scores (NaN passes through every arithmetic operation; proposed first by one backward of a NaN
    seed, which marks every row the scores can reach through the recorded graph);
  - NaN written into its first argument's other rows leaves its prefix output rows finite: they depend
    on the prefix rows of that argument alone (an attention called on one tensor, which mixes its rows,
    fails here; one called as attention(x, x, x) passes, its keys and values being other arguments);
  - run on those prefix rows it gives the same values (it does not depend on the sequence length).
Only modules with parameters are considered (cutting a dropout saves nothing), and only the outermost
qualifying ones are cut (a block's MLP, not its linear layers one by one).
"""

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import layers
from .layouts import TOKENS

SAME_VALUES = 1e-4  # of the outputs' magnitude: "the same values" when run on the prefix rows alone


@dataclass(frozen=True)
class Rows:
    """The modules whose backward runs over the first `keep` rows only, for one input shape."""

    modules: tuple[str, ...] = ()
    keep: int = 0

    @contextlib.contextmanager
    def restricted(self, model: nn.Module) -> Iterator[None]:
        """Within the block, each listed module keeps its outputs' values and routes its gradient through
        a recomputation over the kept rows."""
        named = dict(model.named_modules())
        handles = []
        for name in self.modules:
            cut = _Cut(self.keep)
            handles.append(named[name].register_forward_pre_hook(cut.before, with_kwargs=True))
            handles.append(named[name].register_forward_hook(cut.after, with_kwargs=True))
        grad_mode = torch.is_grad_enabled()
        try:
            yield
        finally:
            torch.set_grad_enabled(grad_mode)  # a cut module that raised left its forward's mode behind
            for handle in handles:
                handle.remove()


class _Cut:
    """The hooks of a cut module: its real forward records no graph; its output keeps those values, with
    the gradient of a run over the kept rows."""

    def __init__(self, keep: int):
        self.keep, self.busy, self.grad_mode = keep, False, True

    def before(self, _module: nn.Module, _args: tuple, _kwargs: dict) -> None:
        if not self.busy:  # the recomputation in `after` calls the module again, with gradients
            self.grad_mode = torch.is_grad_enabled()
            torch.set_grad_enabled(False)

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        if self.busy:
            return None
        torch.set_grad_enabled(self.grad_mode)
        self.busy = True
        try:
            short = layers.first_tensor(module(*_shortened(module, args, self.keep), **kwargs))
        finally:
            self.busy = False
        values = layers.first_tensor(output)
        short = short.to(values.dtype)
        head = values[:, : self.keep] + (short - short.detach())  # the values of output, exactly
        return layers.with_first(output, torch.cat((head, values[:, self.keep :]), 1))


def _shortened(module: nn.Module, args: tuple, keep: int) -> tuple:
    """The arguments with the first cut to its first `keep` rows and the others whole.

    A batch-first nn.MultiheadAttention transposes its arguments to sequence-first; handed keys and
    values stored sequence-first (the same values), its key-value projection runs as one matrix product
    instead of one per row.
    """
    first, *rest = args
    if isinstance(module, nn.MultiheadAttention) and module.batch_first:
        stored: dict[int, Tensor] = {}  # one copy per tensor, so that `key is value` still holds
        rest = [
            stored.setdefault(id(a), a.transpose(0, 1).contiguous().transpose(0, 1)) if _is_3d(a) else a
            for a in rest
        ]
    return (first[:, :keep], *rest)


def _is_3d(value: object) -> bool:
    return isinstance(value, Tensor) and value.ndim == 3


def _holds_rows(value: object, rows: int) -> bool:
    """Whether a value is a tensor with the token rows on axis 1."""
    return isinstance(value, Tensor) and value.ndim >= 3 and value.shape[1] == rows


@dataclass
class _Seen:
    """One module's call in the probe forward."""

    start: int
    end: int = -1
    calls: int = 0
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output: Tensor | None = None  # the output's only tensor (None: several)


class PrefixRows:
    """Per input shape, which modules after the target layer backpropagate over the prefix rows alone."""

    def __init__(self, capture):
        self.capture = capture
        self._found: dict[tuple[int, ...], Rows] = {}

    def of(self, x: Tensor) -> Rows:
        """What is cut for inputs shaped like x (decided once per shape)."""
        key = tuple(x.shape[1:])
        if key not in self._found:
            self._found[key] = self.find(x)
        return self._found[key]

    def restricted(self, x: Tensor) -> contextlib.AbstractContextManager:
        """The restriction for inputs shaped like x, to wrap the real forward."""
        return self.of(x).restricted(self.capture.model)

    def find(self, x: Tensor) -> Rows:
        """The outermost modules that may be cut for inputs shaped like x (none unless the target layer
        holds tokens with a prefix)."""
        layout = self.capture.layout(x)
        if layout.kind != TOKENS or layout.prefix_tokens == 0:
            return Rows()
        keep, rows = layout.prefix_tokens, layout.prefix_tokens + layout.positions
        model, probe = self.capture.model, layers.probe_input(x)
        seen, logits = _trace(model, probe)
        named = dict(model.named_modules())
        target = seen.get(self.capture.target_layer)
        if target is None:
            return Rows()
        candidates = {
            name: call
            for name, call in seen.items()
            if call.start > target.end and call.calls == 1 and _weighted(named[name]) and _fits(call, rows)
        }
        candidates = _unreached(candidates, logits, keep)
        with torch.inference_mode():
            cut = [name for name, call in candidates.items() if _prefix_alone(named[name], call, rows, keep)]
        outermost = tuple(n for n in cut if not any(n.startswith(f"{m}.") for m in cut if m != n))
        if not outermost or not _logits_unchanged(model, probe, outermost, keep):
            return Rows()
        return Rows(outermost, keep)


def _trace(model: nn.Module, probe: Tensor) -> tuple[dict[str, _Seen], Tensor]:
    """Every module's call (start and end order, arguments, output) in one forward that records a graph."""
    seen: dict[str, _Seen] = {}
    clock = iter(range(1 << 62))

    def before(name: str):
        def hook(_module, _args, _kwargs) -> None:
            call = seen.setdefault(name, _Seen(next(clock)))
            call.calls += 1

        return hook

    def after(name: str):
        def hook(_module, args, kwargs, output) -> None:
            call = seen[name]
            call.end, call.args, call.kwargs = next(clock), args, kwargs
            call.output = _only_tensor(output)

        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
            handles.append(module.register_forward_hook(after(name), with_kwargs=True))
    try:
        with torch.inference_mode(False), torch.enable_grad():
            logits = model(probe.detach().clone().requires_grad_())
    finally:
        for handle in handles:
            handle.remove()
    return seen, logits


def _only_tensor(output: object) -> Tensor | None:
    """The output's tensor when it is one, alone or in a tuple (an attention's (values, None)); None when
    there are several (values and attention weights: a cut would detach the weights)."""
    items = output if isinstance(output, tuple) else (output,)
    tensors = [item for item in items if isinstance(item, Tensor)]
    return tensors[0] if len(tensors) == 1 else None


def _weighted(module: nn.Module) -> bool:
    """Whether a module holds parameters: cutting one without (a dropout, an identity) saves nothing."""
    return next(module.parameters(), None) is not None


def _fits(call: _Seen, rows: int) -> bool:
    """Whether a call takes tensors holding the token rows, the first of them its first argument, no other
    tensors, and returns such a tensor (alone or as a tuple's only tensor)."""
    return (
        _holds_rows(call.output, rows)
        and bool(call.args)
        and _holds_rows(call.args[0], rows)
        and all(_holds_rows(a, rows) for a in call.args if isinstance(a, Tensor))
        and not any(isinstance(v, Tensor) for v in call.kwargs.values())
    )


def _unreached(candidates: dict[str, _Seen], logits: object, keep: int) -> dict[str, _Seen]:
    """The candidates whose output rows after the first `keep` get no gradient from a NaN seed on the
    logits (every row the recorded graph connects to the scores turns NaN; the others stay 0)."""
    if not isinstance(logits, Tensor) or not logits.requires_grad or not candidates:
        return {}
    names = [n for n, c in candidates.items() if c.output.requires_grad]
    outputs = [candidates[n].output for n in names]
    seed = torch.full_like(logits, math.nan)
    grads = torch.autograd.grad(logits, outputs, seed, allow_unused=True)
    return {
        name: candidates[name]
        for name, grad in zip(names, grads, strict=True)
        if grad is not None and grad[:, :keep].isnan().any() and bool((grad[:, keep:] == 0).all())
    }


def _prefix_alone(module: nn.Module, call: _Seen, rows: int, keep: int) -> bool:
    """Whether the module's first `keep` output rows come from its first argument's first `keep` rows
    (and its other arguments), with the same values when it runs on those rows only."""
    copies: dict[int, Tensor] = {}  # one copy per tensor, so that arguments that were one tensor still are
    args = tuple(
        copies.setdefault(id(a), a.detach().clone()) if isinstance(a, Tensor) else a for a in call.args
    )
    poisoned = args[0].clone()
    poisoned[:, keep:] = math.nan
    expected = call.output.detach()[:, :keep]
    try:
        from_nan = layers.first_tensor(module(poisoned, *args[1:], **call.kwargs))
        short = layers.first_tensor(module(*_shortened(module, args, keep), **call.kwargs))
    except Exception:  # the module does not run on fewer rows: it is not cut
        return False
    if from_nan is None or short is None or short.shape != expected.shape:
        return False
    if not bool(from_nan[:, :keep].isfinite().all()):
        return False
    scale = float(expected.abs().max()) + 1
    return bool((short.float() - expected.float()).abs().max() <= SAME_VALUES * scale)


def _logits_unchanged(model: nn.Module, probe: Tensor, names: tuple[str, ...], keep: int) -> bool:
    """Whether NaN in every named module's output rows after the first `keep` leaves the logits as they
    are: one forward of the probe and a poisoned copy."""
    named = dict(model.named_modules())

    def poison(_module, _args, output: object) -> object:
        tensor = layers.first_tensor(output).clone()
        tensor[1:, keep:] = math.nan
        return layers.with_first(output, tensor)

    handles = [named[name].register_forward_hook(poison) for name in names]
    try:
        with torch.inference_mode():
            logits = model(torch.cat([probe, probe]))
    finally:
        for handle in handles:
            handle.remove()
    clean, poisoned = logits
    if not bool(poisoned.isfinite().all()):
        return False
    return bool((poisoned - clean).abs().max() <= SAME_VALUES * (float(clean.abs().max()) + 1))
