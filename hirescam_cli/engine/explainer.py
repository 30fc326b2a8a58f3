"""The Explainer: one forward and one batched gradient give every CAM method's map.

It holds the model's state while it is open and composes the engine's parts: the capture
(capture.py), the head analysis (head.py), the methods over flat positions (methods.py), occlusion
(occlusion.py) and diagnostics (diagnostics.py). Maps are reshaped to the layer's grid once, here.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import Tensor, nn

from . import diagnostics, head, layers
from .capture import Capture, check_input, select_targets
from .layouts import Layout, LayoutSpec
from .methods import check_methods, compute
from .occlusion import Occluder
from .rows import PrefixRows


@dataclass
class Explanation:
    """What one call of an Explainer returns; every tensor has batch size B first."""

    maps: dict[str, Tensor]  # method -> raw float32 map (B, T, *grid) over the grid, signed, unnormalised
    classes: Tensor  # (B, T) long: the explained classes
    scores: Tensor  # (B, T) float32: their logits
    logits: Tensor  # (B, C) float32: all logits
    valid: Tensor  # (B, T) bool: False marks padding where images have fewer targets
    completeness_gap: Tensor  # (B, T): (score - baseline) - grid sum - prefix_sum; 0 under the guarantee
    baseline: Tensor  # (B, T): the score with the target layer's output set to zero
    guarantee: bool  # the head after the layer is affine, so HiResCAM sums to score - baseline
    target_layer: str
    layout: Layout  # how the target layer's output was read as (K, *grid)
    prefix_sum: Tensor  # (B, T): HiResCAM's G*A summed over prefix tokens and channels (0: no tokens)
    identical_by_construction: (
        Tensor  # (B, T) bool: G constant, not zero, over the grid: HiResCAM == Grad-CAM
    )
    zero_gradient: Tensor  # (B, T) bool: G is zero over the whole grid, so every map is zero

    def select(self, rows: Tensor) -> "Explanation":
        """The same explanation restricted to some of the batch's inputs."""
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


class Explainer:
    """HiResCAM, Grad-CAM and the gradient family for one model, from a single pass.

    Build once per model, call on batches of any spatial rank ((B, C, L), (B, C, H, W),
    (B, C, D, H, W)). The model is put in eval mode with frozen parameters while the Explainer is
    open; `close()` (or leaving the `with` block) restores it.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str = "auto",
        amp: bool = False,
        layout: LayoutSpec | None = None,
    ):
        self.model = model
        self.capture = Capture(model, target_layer, layout or LayoutSpec(), amp)
        self.occluder = Occluder(self.capture)
        self.rows = PrefixRows(self.capture)
        self._heads: dict[tuple[int, ...], head.Head] = {}
        self._saved = [(p, p.requires_grad) for p in model.parameters()]
        self._was_training = model.training
        for param, _ in self._saved:
            param.requires_grad_(False)
        model.eval()

    @property
    def target_layer(self) -> str:
        """The target layer's name ("auto" until the first call chooses it)."""
        return self.capture.target_layer

    @property
    def occlusion_batched(self) -> bool | None:
        """Whether the last occlusion ran as one larger batch (None: none ran)."""
        return self.occluder.batched

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
        """Explain a batch x (B, C, *spatial): top-k classes, given classes, or all above a threshold."""
        names = check_methods(methods)
        check_input(x)
        if classes is not None and threshold is not None:
            raise ValueError("give either classes or threshold, not both")
        layout = self.layout(x)
        with self.rows.restricted(x):  # token layers: the backward skips rows that cannot reach the scores
            leaf, logits = self.capture.forward(x)
        found = self._head(x, logits)
        targets, valid = select_targets(logits.detach(), top_k, classes, threshold)
        scores = logits.gather(1, targets)
        grads = self.capture.gradients(scores, leaf, valid)  # (B, T, *raw layout)
        acts, raw = leaf.detach(), grads.flatten(0, 1)
        flat_grads = layout.to_flat(raw).unflatten(0, grads.shape[:2])  # (B, T, K, N)
        maps = compute(tuple(dict.fromkeys(("hirescam", *names))), layout.to_flat(acts), flat_grads)
        prefix_grads = layout.prefix(raw).unflatten(0, grads.shape[:2]).float()
        prefix_sum = (prefix_grads * layout.prefix(acts).unsqueeze(1).float()).sum((-2, -1))
        scores = scores.detach().float()
        baseline = found.baseline.to(scores.device)[targets]
        gap = (scores - baseline) - maps["hirescam"].sum(-1) - prefix_sum
        if "hirescam" not in names:
            del maps["hirescam"]
        zero = diagnostics.zero_over_grid(flat_grads)
        return Explanation(
            maps={name: flat.unflatten(-1, layout.grid) for name, flat in maps.items()},
            classes=targets,
            scores=scores,
            logits=logits.detach().float(),
            valid=valid,
            completeness_gap=gap,
            baseline=baseline,
            guarantee=found.affine,
            target_layer=self.target_layer,
            layout=layout,
            prefix_sum=prefix_sum,
            identical_by_construction=diagnostics.constant_over_grid(flat_grads) & ~zero,
            zero_gradient=zero,
        )

    def layout(self, x: Tensor) -> Layout:
        """How the target layer's output is read for inputs shaped like x (decided once per shape;
        with target_layer "auto" the first call also chooses the layer)."""
        return self.capture.layout(x)

    def occlusion(
        self,
        x: Tensor,
        classes: int | Sequence[int] | Tensor,
        positions: Tensor | None = None,
        chunk: int | None = None,
    ) -> Tensor:
        """Layer occlusion: Delta (B, T, *grid) = s_c(A) - s_c(A with A[:, :, p] = 0), float32.

        `classes` as for a call (int, list or (B, T) tensor). `positions` (flat indices into the
        grid, the same for every image) limits the occluded positions; the others are NaN. The
        hook hands the rest of the network the activation and its occluded copies as one larger
        batch, so the layers below the target run once per image (up to `chunk` copies per
        forward). Where the rest of the network cannot take a larger batch (detected once per
        input size) the input is repeated instead: the same Delta at the cost of full forwards.
        A change within NOISE_ULPS float epsilons of the image's largest score is rounding (the
        copies' scores are summed in different orders) and is returned as exactly 0.
        """
        return self.occluder(x, classes, positions, chunk)

    def identical_layers(self, x: Tensor, spatial: Sequence[layers.LayerInfo]) -> dict[str, bool | None]:
        """Per layer: are HiResCAM and Grad-CAM identical by construction for x's top-1 classes?"""
        return diagnostics.identical_layers(self.capture, x, spatial)

    def differing_layer(self, x: Tensor) -> str | None:
        """The nearest layer before the target (not inside it) where HiResCAM and Grad-CAM differ for x."""
        return diagnostics.differing_layer(self.capture, x)

    def _head(self, x: Tensor, logits: Tensor) -> head.Head:
        """The head's analysis, once per input shape."""
        key = tuple(x.shape[1:])
        if key not in self._heads:
            self._heads[key] = head.analyse(self.capture, x, logits)
        return self._heads[key]
