"""Layouts: how a layer's output holds a spatial map, read as the (B, K, N) flat positions the methods need.

Three families, at any spatial rank (1, 2 or 3 grid axes): channels-first (B, K, *grid) — `nchw` for a
2-D grid, `ncl` and `ncdhw` for 1-D and 3-D —, channels-last (B, *grid, K) — `nhwc`, `nlc`, `ndhwc` —
and `tokens` (B, N, K): P prefix tokens (class, distillation, register tokens) followed by the grid
in row-major order. Reading a layer is a view change, never new math: every layout gives the
methods the same (B, K, N) over the N = prod(grid) positions, and maps are reshaped to the grid once,
at the end. The layout is inferred from the module, the model and the shapes; where two readings stay
possible, inference refuses and names the config key that decides it.
"""

import itertools
import math
from dataclasses import dataclass

import torch
import torchvision
from torch import Tensor, nn

FIRST, LAST, TOKENS = "nchw", "nhwc", "tokens"  # the families, by their 2-D names
KINDS = (FIRST, LAST, TOKENS)
NAMES = {FIRST: {1: "ncl", 2: "nchw", 3: "ncdhw"}, LAST: {1: "nlc", 2: "nhwc", 3: "ndhwc"}}
# model.layout values: a family's name at any rank, or the family itself
SPEC_KINDS = {"auto": "auto", TOKENS: TOKENS, "channels_first": FIRST, "channels_last": LAST} | {
    name: family for family, names in NAMES.items() for name in names.values()
}
Grid = tuple[int, ...]


class LayoutError(ValueError):
    """A layer's output cannot be read as a map; the message names the key to set, if any.

    `ambiguous` is True when it looks spatial but two readings stay possible.
    """

    def __init__(self, message: str, ambiguous: bool = False):
        super().__init__(message)
        self.ambiguous = ambiguous


@dataclass(frozen=True)
class Layout:
    """How one layer's output (batch first) holds a map of K channels over a grid of 1 to 3 axes."""

    kind: str  # FIRST, LAST or TOKENS
    grid: Grid  # (h, w), or (l,), or (d, h, w)
    prefix_tokens: int = 0  # tokens before the grid; 0 unless kind is TOKENS

    @property
    def name(self) -> str:
        """The layout's name at its rank: nchw, ncdhw, nhwc, tokens, ..."""
        return NAMES[self.kind].get(len(self.grid), self.kind) if self.kind != TOKENS else TOKENS

    def __str__(self) -> str:
        size = "x".join(map(str, self.grid))
        return f"tokens {self.prefix_tokens}+{size}" if self.kind == TOKENS else f"{self.name} {size}"

    @property
    def positions(self) -> int:
        """Grid positions N = prod(grid)."""
        return math.prod(self.grid)

    def fits(self, shape: tuple[int, ...]) -> bool:
        """True when a raw output of this shape (batch first) is read by this layout."""
        if self.kind == TOKENS:
            return len(shape) == 3 and shape[1] == self.prefix_tokens + self.positions
        spatial = shape[2:] if self.kind == FIRST else shape[1:-1]
        return len(shape) == 2 + len(self.grid) and tuple(spatial) == self.grid

    def channels(self, shape: tuple[int, ...]) -> int:
        """K of a raw output of this layout."""
        return shape[1] if self.kind == FIRST else shape[-1]

    def to_flat(self, output: Tensor) -> Tensor:
        """The grid part of a raw output (B, ...) as a (B, K, N) view over the flat positions."""
        if self.kind == FIRST:
            return output.flatten(2)
        if self.kind == LAST:
            return output.flatten(1, -2).transpose(1, 2)
        return output[:, self.prefix_tokens :].transpose(1, 2)

    def prefix(self, output: Tensor) -> Tensor:
        """The prefix tokens of a raw output as (B, P, K); (B, 0, K) for grid-only layouts."""
        if self.kind == TOKENS:
            return output[:, : self.prefix_tokens]
        return output.new_zeros((output.shape[0], 0, self.channels(tuple(output.shape))))

    def from_flat(self, flat: Tensor, like: Tensor) -> Tensor:
        """The raw layout of (B*m, K, N) flat maps, taking prefix tokens from `like`.

        `like` is a raw output of this layout with batch B; `flat`'s batch may be any multiple m of
        it, image-major: rows i*m .. i*m+m-1 belong to image i and get image i's prefix tokens
        (repeat_interleave). So m modified copies of every image's map (occlusions) become one
        larger batch the rest of the network can run on.
        """
        batch, rows = like.shape[0], flat.shape[0]
        if rows % batch:
            raise ValueError(f"map batch {rows} is not a multiple of the layer's batch {batch}")
        if self.kind == FIRST:
            return flat.unflatten(2, self.grid)
        if self.kind == LAST:
            return flat.transpose(1, 2).unflatten(1, self.grid)
        tokens = flat.transpose(1, 2)
        prefix = self.prefix(like).repeat_interleave(rows // batch, 0).to(tokens.dtype)
        return torch.cat((prefix, tokens), 1)

    def to_dict(self) -> dict:
        """JSON form, as in summary.json and run.json."""
        return {"kind": self.name, "grid": list(self.grid), "prefix_tokens": self.prefix_tokens}


@dataclass(frozen=True)
class LayoutSpec:
    """What the config fixes (model.layout, model.grid, model.prefix_tokens); None/auto: infer."""

    kind: str = "auto"  # a model.layout value (see SPEC_KINDS)
    grid: Grid | None = None
    prefix_tokens: int | None = None

    @property
    def family(self) -> str:
        """auto, or the family (FIRST, LAST, TOKENS) the configured name belongs to."""
        if self.kind not in SPEC_KINDS:
            raise LayoutError(f"model.layout = {self.kind!r} is not one of {', '.join(SPEC_KINDS)}")
        return SPEC_KINDS[self.kind]


def layout_spec(model_config: object) -> LayoutSpec:
    """The LayoutSpec of a config's [model] table (model.layout, model.grid, model.prefix_tokens)."""
    return LayoutSpec(model_config.layout, model_config.grid, model_config.prefix_tokens)


@dataclass(frozen=True)
class ModelHints:
    """What the model itself says about its token layers at one input size."""

    input_size: Grid  # the spatial size of the model input: (H, W), or (D, H, W), ...
    prefix_tokens: int | None = None  # timm's num_prefix_tokens; 1 for torchvision's ViT
    patch_grid: Grid | None = None  # input size over the patch size


def model_hints(model: nn.Module, input_size: Grid) -> ModelHints:
    """Prefix count and patch grid from timm's and torchvision's model attributes, when known."""
    prefix, patch = getattr(model, "num_prefix_tokens", None), None
    if isinstance(model, torchvision.models.VisionTransformer):
        prefix, patch = 1, model.patch_size
    embed = getattr(model, "patch_embed", None)
    if isinstance(embed, nn.Module) and getattr(embed, "patch_size", None) is not None:
        patch = embed.patch_size
    if isinstance(patch, int):
        patch = (patch,) * len(input_size)
    fits = patch is not None and len(patch) == len(input_size)
    grid = tuple(size // step for size, step in zip(input_size, patch, strict=True)) if fits else None
    prefix = prefix if isinstance(prefix, int) and not isinstance(prefix, bool) else None
    return ModelHints(input_size=tuple(input_size), prefix_tokens=prefix, patch_grid=grid)


# Module families whose output is certainly channels-first, or channels-last (K on the last axis).
_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm)


def module_evidence(module: nn.Module, shape: tuple[int, ...]) -> str | None:
    """FIRST or LAST when the module type alone says how its output of 1 to 3 grid axes is ordered.

    'none' for a softmax over a map-shaped output: attention weights, not a map.
    """
    if len(shape) < 3:
        return None
    if isinstance(module, nn.Softmax | nn.LogSoftmax):
        return "none" if len(shape) >= 4 else None
    if isinstance(module, _CHANNELS_FIRST):
        return FIRST
    if isinstance(module, _CHANNELS_LAST) and len(shape) >= 4:  # rank 3 is a token output
        width = module.out_features if isinstance(module, nn.Linear) else module.normalized_shape[-1]
        if (shape[1] == width) != (shape[-1] == width):  # unless a subclass moved K (LayerNorm2d)
            return FIRST if shape[1] == width else LAST
        return None
    if isinstance(module, torchvision.ops.Permute) and len(shape) == 4:
        return {(0, 2, 3, 1): LAST, (0, 3, 1, 2): FIRST}.get(tuple(module.dims))
    return None


def _divided(size: int, stride: int) -> tuple[int, int]:
    return size // stride, -(-size // stride)


def consistent(grid: Grid, input_size: Grid) -> bool:
    """True when grid is the input size divided by one integer stride (rounded either way)."""
    if len(grid) != len(input_size) or not all(1 <= g <= s for g, s in zip(grid, input_size, strict=True)):
        return False
    strides = {s for g, size in zip(grid, input_size, strict=True) for s in _divided(size, g)}
    return any(
        all(g in _divided(size, s) for g, size in zip(grid, input_size, strict=True))
        for s in strides
        if s >= 1
    )


def infer(
    name: str,
    shape: tuple[int, ...],
    hints: ModelHints,
    spec: LayoutSpec = LayoutSpec(),
    evidence: str | None = None,
    conv_grids: tuple[tuple[int, Grid], ...] = (),
) -> Layout:
    """The layout of layer `name`'s output (batch first), or a LayoutError naming the key to set.

    `evidence` is what the module type (or the module it passes through) says about the output;
    `conv_grids` lists (channels, grid) of the model's channels-first layers, so a token layer of
    width K can find the grid of the patch embedding that made its tokens. A (B, N, K) output is
    tokens, unless the module says it is channels-first (a 1-D convolution or pooling): then it is a
    1-D map, readable when the model input has one grid axis too, or the config says it is a 1-D map.
    """
    family = spec.family
    rank = len(hints.input_size)
    if len(shape) == 3 and rank == 1 and (evidence == FIRST or family in (FIRST, LAST)):
        return _infer_map(name, shape, hints.input_size, family, evidence)
    if len(shape) == 3:
        if evidence == FIRST:
            raise LayoutError(
                f"layer {name!r} outputs {shape} from a channels-first module: a 1-D map (B, K, L), not "
                f"tokens over the input's {rank}-D grid"
            )
        if family in (FIRST, LAST):
            raise LayoutError(
                f"layer {name!r} outputs tokens {shape}, not a map over the input's grid: model.layout = "
                f"{spec.kind}"
            )
        return _infer_tokens(name, shape, hints, spec, conv_grids)
    if len(shape) >= 4:
        if family == TOKENS:
            raise LayoutError(f"layer {name!r} outputs {shape}, not tokens (B, N, K): model.layout = tokens")
        return _infer_map(name, shape, hints.input_size, family, evidence)
    raise LayoutError(
        f"layer {name!r} outputs {shape}, not a spatial map: (B, K, *grid), (B, *grid, K) or tokens (B, N, K)"
    )


def _infer_map(
    name: str, shape: tuple[int, ...], input_size: Grid, family: str, evidence: str | None
) -> Layout:
    readings = {FIRST: tuple(shape[2:]), LAST: tuple(shape[1:-1])}
    names = f"{NAMES[FIRST].get(len(shape) - 2, FIRST)} or {NAMES[LAST].get(len(shape) - 2, LAST)}"
    if evidence == "none":
        raise LayoutError(f"layer {name!r} outputs {shape} from a softmax: attention weights, not a map")
    if family != "auto" and evidence not in (None, family):
        raise LayoutError(
            f"layer {name!r} outputs {NAMES[evidence].get(len(shape) - 2, evidence)} by its module type, "
            f"not model.layout = {NAMES[family].get(len(shape) - 2, family)}"
        )
    kind = family if family != "auto" else evidence
    if kind is None:
        fitting = [k for k, grid in readings.items() if consistent(grid, input_size)]
        size = "x".join(map(str, input_size))
        if not fitting:
            raise LayoutError(
                f"layer {name!r} outputs {shape}, in which no grid of the {size} input shows; if it is a "
                f"map, set model.layout (--layout) to {names}"
            )
        if len(fitting) != 1:
            raise LayoutError(
                f"cannot tell whether layer {name!r} output {shape} is channels-first (B, K, *grid) or "
                f"channels-last (B, *grid, K); set model.layout (--layout) to {names}",
                ambiguous=True,
            )
        kind = fitting[0]
    return Layout(kind, readings[kind])


def _grids_of(count: int, input_size: Grid) -> list[Grid]:
    """Every grid of len(input_size) axes with `count` positions that one integer stride makes from
    the input size."""
    divisors = [d for d in range(1, count + 1) if count % d == 0]
    grids = (g for g in itertools.product(divisors, repeat=len(input_size)) if math.prod(g) == count)
    return [g for g in grids if consistent(g, input_size)]


def _infer_tokens(
    name: str,
    shape: tuple[int, ...],
    hints: ModelHints,
    spec: LayoutSpec,
    conv_grids: tuple[tuple[int, Grid], ...],
) -> Layout:
    """Grid and prefix count of a (B, N, K) token output.

    The grid is the one the config gives, else the model's patch grid or the grid of a
    channels-first layer as wide as the tokens (the patch embedding); the prefix count is then
    what is left of N, which must match the config or the model (or be 0: tokens before the
    prefix is added). With only a prefix count known, N - P must factor into one grid the input
    size explains.
    """
    count, width = shape[1], shape[2]
    fixed, known = spec.prefix_tokens, hints.prefix_tokens
    if spec.grid is not None:
        grids = [tuple(spec.grid)]
    else:
        from_conv = sorted({tuple(grid) for channels, grid in conv_grids if channels == width})
        grids = list(dict.fromkeys(g for g in (hints.patch_grid, *from_conv) if g is not None))

    def allowed(prefix: int) -> bool:
        if fixed is not None:
            return prefix == fixed
        return prefix >= 0 and (known is None or prefix in (known, 0))

    fitting = [(g, count - math.prod(g)) for g in grids if allowed(count - math.prod(g))]
    prefix = fixed if fixed is not None else known
    if not fitting and spec.grid is None and prefix is not None and count > prefix:
        fitting = [(g, prefix) for g in _grids_of(count - prefix, hints.input_size)]
    if len(fitting) > 1 and spec.grid is None:
        fitting = [f for f in fitting if f[0] == hints.patch_grid] or fitting
    if len(fitting) != 1:
        given = [f"model.grid = {list(spec.grid)}"] if spec.grid is not None else []
        given += [f"model.prefix_tokens = {fixed}"] if fixed is not None else []
        why = f"; {' and '.join(given)} do not fit {count} tokens" if given else ""
        raise LayoutError(
            f"cannot tell how the {count} tokens of layer {name!r} split into prefix tokens and a patch "
            f"grid{why}; set model.prefix_tokens (--prefix-tokens) and model.grid (--grid)",
            ambiguous=True,
        )
    (grid, prefix) = fitting[0]
    return Layout(TOKENS, tuple(int(g) for g in grid), int(prefix))
