"""The one-pass capture: one forward and one batched gradient give every CAM method's map."""

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from . import layers
from .layouts import Layout, LayoutSpec
from .methods import check_methods, compute

_PROBE_SEED = 0
CONSTANT_TOLERANCE = 1e-5  # G varying by less than this fraction of max |G| counts as constant
NOISE_ULPS = 16  # an occlusion effect within this many float epsilons of the score is rounding: 0
_OCCLUSION_CHUNK = {"cuda": 1024, "cpu": 256}  # occluded copies per forward, by device type

# Autograd nodes that are linear in each input; for the products, in one input at a time.
_LINEAR_NODES = {
    "AddBackward0",
    "AddBackward1",
    "SubBackward0",
    "SubBackward1",
    "NegBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
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
    "AvgPool2DBackward0",
    "AdaptiveAvgPool2DBackward0",
    "NativeBatchNormBackward0",
    "CudnnBatchNormBackward0",
    "MulBackward1",
    "DivBackward1",
}
_PRODUCT_NODES = {
    "MulBackward0",
    "MmBackward0",
    "BmmBackward0",
    "AddmmBackward0",
    "AddmvBackward0",
    "MvBackward0",
    "ConvolutionBackward0",
    "CudnnConvolutionBackward0",
    "LinearBackward0",
}


@dataclass
class Explanation:
    """What one call of an Explainer returns; every tensor has batch size B first."""

    maps: dict[str, Tensor]  # method -> raw float32 map (B, T, h, w) over the grid, signed, unnormalised
    classes: Tensor  # (B, T) long: the explained classes
    scores: Tensor  # (B, T) float32: their logits
    logits: Tensor  # (B, C) float32: all logits
    valid: Tensor  # (B, T) bool: False marks padding where images have fewer targets
    completeness_gap: Tensor  # (B, T): (score - baseline) - grid sum - prefix_sum; 0 under the guarantee
    baseline: Tensor  # (B, T): the score with the target layer's output set to zero
    guarantee: bool  # the head after the layer is affine, so HiResCAM sums to score - baseline
    target_layer: str
    layout: Layout  # how the target layer's output was read as the (K, h, w) grid
    prefix_sum: Tensor  # (B, T): HiResCAM's G*A summed over prefix tokens and channels (0: no tokens)
    identical_by_construction: (
        Tensor  # (B, T) bool: G constant (not zero) over the grid: HiResCAM == Grad-CAM
    )
    zero_gradient: Tensor  # (B, T) bool: G is zero over the whole grid, so every map is zero

    def select(self, rows: Tensor) -> "Explanation":
        """The same explanation restricted to some of the batch's images."""
        return replace(
            self,
            maps={name: maps[rows] for name, maps in self.maps.items()},
            classes=self.classes[rows],
            scores=self.scores[rows],
            logits=self.logits[rows],
            valid=self.valid[rows],
            completeness_gap=self.completeness_gap[rows],
            baseline=self.baseline[rows],
            prefix_sum=self.prefix_sum[rows],
            identical_by_construction=self.identical_by_construction[rows],
            zero_gradient=self.zero_gradient[rows],
        )


@dataclass(frozen=True)
class _Head:
    """What the probe found about the computation from the target layer to the logits."""

    affine: bool
    baseline: Tensor  # (C,) logits at a zero activation


@dataclass
class _Occlusion:
    """What occlusion needs to know about the model at one input size."""

    grid: tuple[int, int]
    classes: int
    batched: bool | None = None  # the rest of the network takes the larger batch; None: not tried yet


class Explainer:
    """HiResCAM, Grad-CAM and the gradient family for one model, from a single pass.

    Build once per model, call on batches. The model is put in eval mode with frozen
    parameters while the Explainer is open; `close()` (or leaving the `with` block) restores it.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str = "auto",
        amp: bool = False,
        layout: LayoutSpec | None = None,
    ):
        self.model = model
        self.amp = amp
        self.target_layer = target_layer
        self.spec = layout or LayoutSpec()
        if target_layer != "auto":
            layers.get_module(model, target_layer)
        self._heads: dict[tuple[int, ...], _Head] = {}
        self._layouts: dict[tuple[int, ...], Layout] = {}
        self._occlusions: dict[tuple[int, ...], _Occlusion] = {}
        self.occlusion_batched: bool | None = None  # the last occlusion ran as one larger batch
        self._saved = [(p, p.requires_grad) for p in model.parameters()]
        self._was_training = model.training
        for param, _ in self._saved:
            param.requires_grad_(False)
        model.eval()

    def __enter__(self) -> "Explainer":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give the model back as it was: parameter flags and training mode."""
        for param, flag in self._saved:
            param.requires_grad_(flag)
        self.model.train(self._was_training)

    def __call__(
        self,
        x: Tensor,
        methods: Sequence[str] | str = ("hirescam", "gradcam"),
        top_k: int = 1,
        classes: int | Sequence[int] | Tensor | None = None,
        threshold: float | None = None,
    ) -> Explanation:
        """Explain a batch x (B, C, H, W): top-k classes, given classes, or all above a threshold."""
        names = check_methods(methods)
        self._check_input(x)
        if classes is not None and threshold is not None:
            raise ValueError("give either classes or threshold, not both")
        layout = self.layout(x)
        leaf, logits = self._forward(x)
        head = self._head(x, logits)
        targets, valid = _targets(logits.detach(), top_k, classes, threshold)
        scores = logits.gather(1, targets)
        grads = self._gradients(scores, leaf, valid)  # (B, T, *raw layout)
        acts, flat = leaf.detach(), grads.flatten(0, 1)
        grid_grads = layout.to_map(flat).unflatten(0, grads.shape[:2])
        maps = compute(tuple(dict.fromkeys(("hirescam", *names))), layout.to_map(acts), grid_grads)
        prefix_grads = layout.prefix(flat).unflatten(0, grads.shape[:2]).float()
        prefix_sum = (prefix_grads * layout.prefix(acts).unsqueeze(1).float()).sum((-2, -1))
        scores = scores.detach().float()
        baseline = head.baseline.to(scores.device)[targets]
        gap = (scores - baseline) - maps["hirescam"].sum((-2, -1)) - prefix_sum
        if "hirescam" not in names:
            del maps["hirescam"]
        zero = ~grid_grads.flatten(2).ne(0).any(-1)
        return Explanation(
            maps=maps,
            classes=targets,
            scores=scores,
            logits=logits.detach().float(),
            valid=valid,
            completeness_gap=gap,
            baseline=baseline,
            guarantee=head.affine,
            target_layer=self.target_layer,
            layout=layout,
            prefix_sum=prefix_sum,
            identical_by_construction=constant_over_grid(grid_grads) & ~zero,
            zero_gradient=zero,
        )

    def layout(self, x: Tensor) -> Layout:
        """How the target layer's output is read for inputs shaped like x (decided once per shape).

        With target_layer "auto", the first call also chooses the layer (`layers.choose_auto`,
        on a fixed random probe image, so the choice never depends on the data).
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

    def occlusion(
        self,
        x: Tensor,
        classes: int | Sequence[int] | Tensor,
        positions: Tensor | None = None,
        chunk: int | None = None,
    ) -> Tensor:
        """Layer occlusion: Delta (B, T, h, w) = s_c(A) - s_c(A with A[:, :, p] = 0), float32.

        `classes` as for a call (int, list or (B, T) tensor). `positions` (flat indices into the
        h*w grid, the same for every image) limits the occluded positions; the others are NaN.
        The hook hands the rest of the network the activation and its occluded copies as one
        larger batch, so the layers below the target run once per image (up to `chunk` copies per
        forward). Where the rest of the network cannot take a larger batch (detected once per
        input size) the input is repeated instead: the same Delta at the cost of full forwards.
        A change within NOISE_ULPS float epsilons of the image's largest score is rounding
        (the copies' scores are summed in different orders) and is returned as exactly 0.
        """
        self._check_input(x)
        plan = self._occlusion_plan(x)
        batch, cells = x.shape[0], plan.grid[0] * plan.grid[1]
        empty = isinstance(classes, Tensor) and classes.ndim == 2 and classes.shape == (batch, 0)
        targets = classes if empty else _targets(x.new_zeros(batch, plan.classes), 1, classes, None)[0]
        if positions is None:
            positions = torch.arange(cells, device=x.device)
        positions = torch.as_tensor(positions, device=x.device)
        if positions.ndim != 1 or positions.is_floating_point() or len(positions) == 0:
            raise ValueError("positions must be a non-empty 1-D tensor of flat grid indices")
        distinct = len(positions.unique()) == len(positions)
        if int(positions.min()) < 0 or int(positions.max()) >= cells or not distinct:
            raise ValueError(f"positions must be distinct indices in 0..{cells - 1}")
        chunk = chunk or _OCCLUSION_CHUNK.get(x.device.type, _OCCLUSION_CHUNK["cpu"])
        delta = torch.full((batch, targets.shape[1], cells), float("nan"), device=x.device)
        for images, part in _occlusion_jobs(batch, positions, chunk) if not empty else ():
            scores = self._occluded_scores(x[images], targets[images], part, plan)  # (b, 1 + n, T)
            change = scores[:, :1] - scores[:, 1:]
            noise = NOISE_ULPS * torch.finfo(scores.dtype).eps * scores.abs().amax(1, keepdim=True)
            change = torch.where(change.abs() <= noise, 0.0, change)  # rounding of the score, not an effect
            delta[images][:, :, part] = change.transpose(1, 2).float()
        self.occlusion_batched = plan.batched
        return delta.view(batch, targets.shape[1], *plan.grid)

    def identical_layers(self, x: Tensor, spatial: Sequence[layers.LayerInfo]) -> dict[str, bool | None]:
        """Per layer: are HiResCAM and Grad-CAM identical by construction for x's top-1 classes?

        One forward keeps every given layer's output in the graph and one gradient of the top-1
        scores reaches them all; each is read through its layout. None for a layer the score does
        not depend on, or only through a zero gradient (all None when the model does not return
        (B, C) logits). Give layers that
        run once per forward.
        """
        outputs: dict[str, Tensor] = {}

        def keep(info: layers.LayerInfo):
            def hook(_module: nn.Module, _inputs: object, output: object) -> object:
                fits = isinstance(output, Tensor) and info.layout.fits(tuple(output.shape))
                if not fits or not output.requires_grad:
                    return None
                outputs[info.name] = output
                return output.clone()  # a later in-place op then rewrites the clone, not this node

            return hook

        by_name = {info.name: info for info in spatial}
        modules = [(layers.get_module(self.model, info.name), info) for info in spatial]
        handles = [module.register_forward_hook(keep(info)) for module, info in modules]
        try:
            with torch.enable_grad(), self._autocast(x.device):
                logits = self.model(x.detach().requires_grad_())
                score = (
                    logits.max(1).values.sum() if isinstance(logits, Tensor) and logits.ndim == 2 else None
                )
        finally:
            for handle in handles:
                handle.remove()
        kept = list(outputs)
        found: dict[str, bool | None] = {}
        if kept and score is not None and score.requires_grad:
            grads = torch.autograd.grad(score, [outputs[n] for n in kept], allow_unused=True)
            for name, grad in zip(kept, grads, strict=True):
                grid = None if grad is None else by_name[name].layout.to_map(grad)[:, None]
                depends = grid is not None and bool(grid.ne(0).any())
                found[name] = bool(constant_over_grid(grid).all()) if depends else None
        return {info.name: found.get(info.name) for info in spatial}

    def differing_layer(self, x: Tensor) -> str | None:
        """The nearest layer before the target (not inside it) where HiResCAM and Grad-CAM differ for x."""
        self._check_input(x)
        self.layout(x)  # settles an "auto" target
        traced = layers.trace_layers(self.model, layers.probe_input(x[:1]), self.spec)
        earlier = layers.earlier_layers(traced, self.target_layer)
        identical = self.identical_layers(x[:1], earlier)
        return next((info.name for info in earlier if identical[info.name] is False), None)

    # -- internals ---------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"input must be a (B, C, H, W) tensor; got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"input must be floating point; got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError("input batch is empty")
        if torch.is_inference_mode_enabled():
            raise ValueError("cannot explain inside torch.inference_mode(): gradients are needed")

    def _target_layout(self, traced: list[layers.LayerInfo]) -> Layout:
        """The target layer's layout from a trace, or a ValueError saying why there is none."""
        info = next((i for i in traced if i.name == self.target_layer), None)
        if info is None:
            raise ValueError(f"target layer {self.target_layer!r} did not run in the forward pass")
        if info.calls > 1:
            raise ValueError(self._called_twice_message(traced, info.calls))
        if info.layout is None and info.ambiguous:
            raise ValueError(info.problem)  # names the key that decides it
        if info.layout is None:
            raise ValueError(f"{info.problem}; choose another layer (see `hirescam layers`)")
        return info.layout

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=device.type, dtype=dtype)

    def _run_with(self, x: Tensor, replace) -> tuple[Tensor, list[Tensor]]:
        """Forward x with a hook that maps the target layer's raw output through `replace`.

        The raw output is in the layer's own layout (`self.layout(x)` reads it as a grid map).
        """
        layout = self.layout(x)
        module = layers.get_module(self.model, self.target_layer)
        outputs: list[Tensor] = []

        def hook(_module: nn.Module, _inputs: object, output: object) -> Tensor:
            if not isinstance(output, Tensor) or not layout.fits(tuple(output.shape)):
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise ValueError(
                    f"target layer {self.target_layer!r} outputs {shape}, which does not fit its "
                    f"layout {layout} (see `hirescam layers`)"
                )
            outputs.append(output)
            return replace(output)

        handle = module.register_forward_hook(hook)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if len(outputs) > 1:
            traced = layers.trace_layers(self.model, x[:1], self.spec)
            raise ValueError(self._called_twice_message(traced, len(outputs)))
        if not outputs:
            raise ValueError(f"target layer {self.target_layer!r} did not run in the forward pass")
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"the model must return (B, num_classes) logits; got {shape}")
        return logits, outputs

    def _called_twice_message(self, traced: list[layers.LayerInfo], calls: int) -> str:
        parent = layers.enclosing_once(traced, self.target_layer)
        fix = f"use {parent!r}, which runs once" if parent else "choose a module that runs once"
        return (
            f"target layer {self.target_layer!r} is called {calls} times in one forward, so its "
            f"activations and gradients cannot be paired; {fix}"
        )

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The real pass: the target's output becomes a leaf, so autograd records only the head."""
        leaves: list[Tensor] = []

        def to_leaf(output: Tensor) -> Tensor:
            leaf = output.detach().requires_grad_()
            leaves.append(leaf)
            return leaf.clone()  # later in-place ops then touch the clone, never the leaf

        with torch.enable_grad(), self._autocast(x.device):
            logits, _ = self._run_with(x, to_leaf)
        return leaves[0], logits

    def _gradients(self, scores: Tensor, leaf: Tensor, valid: Tensor) -> Tensor:
        """d score / d A for all T targets in one (batched) backward: (B, T, K, h, w)."""
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

    def _occlusion_plan(self, x: Tensor) -> "_Occlusion":
        """Grid and class count of the target at this input size, from one plain forward of x[:1]."""
        key = tuple(x.shape[1:])
        if key not in self._occlusions:
            with torch.inference_mode(), self._autocast(x.device):
                logits, _ = self._run_with(x[:1], lambda out: out)
            self._occlusions[key] = _Occlusion(grid=self.layout(x).grid, classes=logits.shape[1])
        return self._occlusions[key]

    def _occluded_scores(self, x: Tensor, targets: Tensor, positions: Tensor, plan: "_Occlusion") -> Tensor:
        """Scores (b, 1 + n, T) of x's targets: the layer's output intact, then zeroed at each position."""
        copies = 1 + len(positions)
        layout = self.layout(x)

        def occlude(out: Tensor) -> Tensor:  # the layer's raw output -> its occluded copies, same layout
            return layout.from_map(occluded_copies(layout.to_map(out), positions), out)

        logits = None
        if plan.batched is not False:
            try:
                logits = self._occluded_logits(x, occlude)
            except Exception:  # any failure of the larger batch means: use the fallback
                logits = None
            if logits is not None and logits.shape[0] != len(x) * copies:
                logits = None
            if logits is not None and plan.batched is None:
                plain = self._occluded_logits(x, lambda out: out)
                intact = logits.view(len(x), copies, -1)[:, 0]
                tol = (2e-2 if self.amp else 1e-3) * float(plain.abs().max()) + 1e-5
                logits = logits if float((intact - plain).abs().max()) <= tol else None
            plan.batched = logits is not None
        if logits is None:  # the same copies at the same batch size: the input repeated per copy
            repeated = x.repeat_interleave(copies, 0)
            logits = self._occluded_logits(repeated, lambda out: occlude(out[::copies]))
        logits = logits.view(len(x), copies, -1)
        return logits.gather(2, targets[:, None, :].expand(-1, copies, -1))

    def _occluded_logits(self, x: Tensor, replace) -> Tensor:
        """Logits of x with the target's output mapped through `replace`, in inference mode."""
        with torch.inference_mode(), self._autocast(x.device):
            logits, _ = self._run_with(x, replace)
        return logits

    def _head(self, x: Tensor, logits: Tensor) -> _Head:
        """Decide once per input shape whether logits are affine in the target's output.

        Affine means: every autograd node from the target to the logits is linear in it (an
        exact check of the recorded graph), and a probe at random activations confirms
        additivity and a baseline f(0) that does not depend on the input.
        """
        key = tuple(x.shape[1:])
        if key not in self._heads:
            probe = self._probe_head(x[:1])
            affine = probe.affine and _graph_is_linear(logits.grad_fn)
            self._heads[key] = _Head(affine=affine, baseline=probe.baseline)
        return self._heads[key]

    def _probe_head(self, x: Tensor) -> _Head:
        """Test additivity, odd symmetry and independence from the input numerically."""
        with torch.inference_mode():
            _, (act,) = self._run_with(x, lambda out: out)
            generator = torch.Generator().manual_seed(_PROBE_SEED)
            scale = float(act.float().std().clamp_min(1e-3))
            r1, r2 = (torch.randn(act.shape, generator=generator) * scale for _ in range(2))
            r1, r2 = r1.to(act), r2.to(act)
            zero = torch.zeros_like(act)
            stacked = torch.cat([zero, r1, r2, r1 + r2, -r1, zero])
            inputs = torch.cat([x, x, x, x, x, torch.flip(x, dims=(-1,)) * 0.5 + 0.1])
            logits, _ = self._run_with(inputs, lambda out: stacked)
        f0, f1, f2, f12, fneg, f0_other = logits.double()
        d1, d2 = f1 - f0, f2 - f0
        tol = 1e-4 * float(torch.stack([f0, d1, d2]).abs().max()) + 1e-6
        affine = all(
            float(err.abs().max()) <= tol for err in (f12 - f0 - d1 - d2, fneg - f0 + d1, f0_other - f0)
        )
        return _Head(affine=affine, baseline=f0.float())


def occluded_copies(act_map: Tensor, positions: Tensor) -> Tensor:
    """(B, K, h, w) -> (B * (1 + n), K, h, w), image-major: each map, then a copy of it per
    position in `positions` (n flat grid indices) with every channel zeroed there."""
    height, width = act_map.shape[-2:]
    keep = torch.ones(1 + len(positions), height * width, dtype=torch.bool, device=act_map.device)
    keep[torch.arange(1, 1 + len(positions), device=act_map.device), positions] = False
    keep = keep.view(1, -1, 1, height, width)
    copies = torch.where(keep, act_map[:, None], torch.zeros((), dtype=act_map.dtype, device=act_map.device))
    return copies.flatten(0, 1)


def constant_over_grid(grads: Tensor) -> Tensor:
    """(B, T, K, h, w) gradients -> (B, T) bool: every channel's gradient is the same at every
    position (to CONSTANT_TOLERANCE of max |G|), so HiResCAM equals Grad-CAM by construction."""
    spread = grads.amax((-2, -1)) - grads.amin((-2, -1))
    scale = grads.abs().amax((-3, -2, -1))
    return (spread <= CONSTANT_TOLERANCE * scale[..., None]).all(-1)


def _occlusion_jobs(batch: int, positions: Tensor, chunk: int) -> list[tuple[slice, Tensor]]:
    """(images, positions) of each forward: as many whole images as fit `chunk` copies, or
    one image's positions in pieces when a single image's copies do not fit."""
    count = len(positions)
    if count + 1 <= chunk:
        per = chunk // (count + 1)
        return [(slice(i, i + per), positions) for i in range(0, batch, per)]
    piece = max(1, chunk - 1)
    return [(slice(i, i + 1), positions[j : j + piece]) for i in range(batch) for j in range(0, count, piece)]


def _graph_is_linear(root: object) -> bool:
    """True when every node of the autograd graph under `root` is linear in its inputs."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        inputs = [fn for fn, _ in node.next_functions if fn is not None]
        name = node.name()
        if name in _PRODUCT_NODES:
            if len(inputs) > 1:
                return False
        elif name not in _LINEAR_NODES and name != "torch::autograd::AccumulateGrad":
            return False
        stack.extend(inputs)
    return True


def _targets(
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
