"""Layouts: how a layer's output holds a spatial map, read as the (B, K, h, w) the methods need.

Three layouts exist: `nchw` (B, K, h, w), `nhwc` (B, h, w, K) (torchvision Swin, timm's
channels-last stages) and `tokens` (B, N, K): P prefix tokens (class, distillation, register
tokens) followed by the h x w patch grid in row-major order. Reading a layer is a view change,
never new math. The layout is inferred from the module, the model and the shapes; where two
readings stay possible, inference refuses and names the config key that decides it.
"""

from dataclasses import dataclass

import torch
import torchvision
from torch import Tensor, nn

KINDS = ("nchw", "nhwc", "tokens")


class LayoutError(ValueError):
    """A layer's output cannot be read as a map; the message names the key to set, if any.

    `ambiguous` is True when it looks spatial but two readings stay possible.
    """

    def __init__(self, message: str, ambiguous: bool = False):
        super().__init__(message)
        self.ambiguous = ambiguous


@dataclass(frozen=True)
class Layout:
    """How one layer's output (batch first) holds a map of K channels over an h x w grid."""

    kind: str  # "nchw" | "nhwc" | "tokens"
    grid: tuple[int, int]  # (h, w)
    prefix_tokens: int = 0  # tokens before the grid; 0 unless kind is "tokens"

    def __str__(self) -> str:
        h, w = self.grid
        return f"tokens {self.prefix_tokens}+{h}x{w}" if self.kind == "tokens" else f"{self.kind} {h}x{w}"

    @property
    def positions(self) -> int:
        """Grid positions h*w."""
        return self.grid[0] * self.grid[1]

    def fits(self, shape: tuple[int, ...]) -> bool:
        """True when a raw output of this shape (batch first) is read by this layout."""
        h, w = self.grid
        if self.kind == "tokens":
            return len(shape) == 3 and shape[1] == self.prefix_tokens + h * w
        spatial = shape[2:] if self.kind == "nchw" else shape[1:3]
        return len(shape) == 4 and tuple(spatial) == (h, w)

    def channels(self, shape: tuple[int, ...]) -> int:
        """K of a raw output of this layout."""
        return shape[1] if self.kind == "nchw" else shape[-1]

    def to_map(self, output: Tensor) -> Tensor:
        """The grid part of a raw output (B, ...) as a (B, K, h, w) view."""
        if self.kind == "nchw":
            return output
        if self.kind == "nhwc":
            return output.permute(0, 3, 1, 2)
        return output[:, self.prefix_tokens :].transpose(1, 2).unflatten(2, self.grid)

    def prefix(self, output: Tensor) -> Tensor:
        """The prefix tokens of a raw output as (B, P, K); (B, 0, K) for grid-only layouts."""
        if self.kind == "tokens":
            return output[:, : self.prefix_tokens]
        return output.new_zeros((output.shape[0], 0, self.channels(tuple(output.shape))))

    def from_map(self, grid_map: Tensor, like: Tensor) -> Tensor:
        """The raw layout of a (B*m, K, h, w) grid map, taking prefix tokens from `like`.

        `like` is a raw output of this layout with batch B; `grid_map`'s batch may be any multiple
        m of it, image-major: rows i*m .. i*m+m-1 belong to image i and get image i's prefix
        tokens (repeat_interleave). So m modified copies of every image's map (occlusions) become
        one larger batch the rest of the network can run on.
        """
        batch, rows = like.shape[0], grid_map.shape[0]
        if rows % batch:
            raise ValueError(f"grid map batch {rows} is not a multiple of the layer's batch {batch}")
        if self.kind == "nchw":
            return grid_map
        if self.kind == "nhwc":
            return grid_map.permute(0, 2, 3, 1)
        tokens = grid_map.flatten(2).transpose(1, 2)
        prefix = self.prefix(like).repeat_interleave(rows // batch, 0).to(tokens.dtype)
        return torch.cat((prefix, tokens), 1)

    def to_dict(self) -> dict:
        """JSON form, as in summary.json and run.json."""
        return {"kind": self.kind, "grid": list(self.grid), "prefix_tokens": self.prefix_tokens}


@dataclass(frozen=True)
class LayoutSpec:
    """What the config fixes (model.layout, model.grid, model.prefix_tokens); None/auto: infer."""

    kind: str = "auto"
    grid: tuple[int, int] | None = None
    prefix_tokens: int | None = None


def layout_spec(model_config: object) -> LayoutSpec:
    """The LayoutSpec of a config's [model] table (model.layout, model.grid, model.prefix_tokens)."""
    return LayoutSpec(model_config.layout, model_config.grid, model_config.prefix_tokens)


@dataclass(frozen=True)
class ModelHints:
    """What the model itself says about its token layers at one input size."""

    input_size: tuple[int, int]  # (H, W) of the model input
    prefix_tokens: int | None = None  # timm's num_prefix_tokens; 1 for torchvision's ViT
    patch_grid: tuple[int, int] | None = None  # input size over the patch size


def model_hints(model: nn.Module, input_size: tuple[int, int]) -> ModelHints:
    """Prefix count and patch grid from timm's and torchvision's model attributes, when known."""
    height, width = input_size
    prefix, patch = getattr(model, "num_prefix_tokens", None), None
    if isinstance(model, torchvision.models.VisionTransformer):
        prefix, patch = 1, model.patch_size
    embed = getattr(model, "patch_embed", None)
    if isinstance(embed, nn.Module) and getattr(embed, "patch_size", None) is not None:
        patch = embed.patch_size
    if isinstance(patch, int):
        patch = (patch, patch)
    grid = (height // patch[0], width // patch[1]) if patch else None
    prefix = prefix if isinstance(prefix, int) and not isinstance(prefix, bool) else None
    return ModelHints(input_size=(height, width), prefix_tokens=prefix, patch_grid=grid)


# Module types whose output is certainly channels-first, or channels-last (K on the last axis).
_CHANNELS_FIRST = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.BatchNorm2d,
    nn.InstanceNorm2d,
    nn.GroupNorm,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm)


def module_evidence(module: nn.Module, shape: tuple[int, ...]) -> str | None:
    """'nchw' or 'nhwc' when the module type alone says how its 4-D output is ordered.

    'none' for a softmax: a 4-D softmax output is attention weights, not a map.
    """
    if len(shape) != 4:
        return None
    if isinstance(module, nn.Softmax | nn.LogSoftmax):
        return "none"
    if isinstance(module, _CHANNELS_FIRST):
        return "nchw"
    if isinstance(module, _CHANNELS_LAST):  # K on the last axis, unless a subclass moved it (LayerNorm2d)
        width = module.out_features if isinstance(module, nn.Linear) else module.normalized_shape[-1]
        if (shape[1] == width) != (shape[3] == width):
            return "nchw" if shape[1] == width else "nhwc"
        return None
    if isinstance(module, torchvision.ops.Permute):
        return {(0, 2, 3, 1): "nhwc", (0, 3, 1, 2): "nchw"}.get(tuple(module.dims))
    return None


def _divided(size: int, stride: int) -> tuple[int, int]:
    return size // stride, -(-size // stride)


def consistent(grid: tuple[int, int], input_size: tuple[int, int]) -> bool:
    """True when grid is the input size divided by one integer stride (rounded either way)."""
    (gh, gw), (height, width) = grid, input_size
    if not (1 <= gh <= height and 1 <= gw <= width):
        return False
    strides = {*_divided(height, gh), *_divided(width, gw)}
    return any(gh in _divided(height, s) and gw in _divided(width, s) for s in strides if s >= 1)


def infer(
    name: str,
    shape: tuple[int, ...],
    hints: ModelHints,
    spec: LayoutSpec = LayoutSpec(),
    evidence: str | None = None,
    conv_grids: tuple[tuple[int, tuple[int, int]], ...] = (),
) -> Layout:
    """The layout of layer `name`'s output (batch first), or a LayoutError naming the key to set.

    `evidence` is what the module type (or the module it passes through) says about a 4-D
    output; `conv_grids` lists (channels, grid) of the model's channels-first layers, so a token
    layer of width K can find the grid of the patch embedding that made its tokens.
    """
    if spec.kind not in ("auto", *KINDS):
        raise LayoutError(f"model.layout = {spec.kind!r} is not one of auto, {', '.join(KINDS)}")
    if len(shape) == 4:
        if spec.kind == "tokens":
            raise LayoutError(f"layer {name!r} outputs {shape}, not tokens (B, N, K): model.layout = tokens")
        return _infer_4d(name, shape, hints.input_size, spec.kind, evidence)
    if len(shape) == 3:
        if spec.kind in ("nchw", "nhwc"):
            raise LayoutError(
                f"layer {name!r} outputs tokens {shape}, not a 4-D map: model.layout = {spec.kind}"
            )
        return _infer_tokens(name, shape, hints, spec, conv_grids)
    raise LayoutError(
        f"layer {name!r} outputs {shape}, not a spatial map ((B, K, h, w), (B, h, w, K) or tokens (B, N, K))"
    )


def _infer_4d(
    name: str, shape: tuple[int, ...], input_size: tuple[int, int], kind: str, evidence: str | None
) -> Layout:
    readings = {"nchw": (shape[2], shape[3]), "nhwc": (shape[1], shape[2])}
    if evidence == "none":
        raise LayoutError(f"layer {name!r} outputs {shape} from a softmax: attention weights, not a map")
    if kind != "auto" and evidence not in (None, kind):
        raise LayoutError(f"layer {name!r} outputs {evidence} by its module type, not model.layout = {kind}")
    kind = kind if kind != "auto" else evidence
    if kind is None:
        fitting = [k for k, grid in readings.items() if consistent(grid, input_size)]
        if not fitting:
            raise LayoutError(
                f"layer {name!r} outputs {shape}, in which no grid of the {input_size[0]}x{input_size[1]} "
                "input shows; if it is a map, set model.layout (--layout) to nchw or nhwc"
            )
        if len(fitting) != 1:
            raise LayoutError(
                f"cannot tell whether layer {name!r} output {shape} is channels-first (B, K, h, w) or "
                "channels-last (B, h, w, K); set model.layout (--layout) to nchw or nhwc",
                ambiguous=True,
            )
        kind = fitting[0]
    return Layout(kind, readings[kind])


def _grids_of(count: int, input_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Every (h, w) with h*w == count that one integer stride makes from the input size."""
    divisors = (h for h in range(1, count + 1) if count % h == 0)
    return [(h, count // h) for h in divisors if consistent((h, count // h), input_size)]


def _infer_tokens(
    name: str,
    shape: tuple[int, ...],
    hints: ModelHints,
    spec: LayoutSpec,
    conv_grids: tuple[tuple[int, tuple[int, int]], ...],
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
        grids = [spec.grid]
    else:
        from_conv = sorted({grid for channels, grid in conv_grids if channels == width})
        grids = list(dict.fromkeys(g for g in (hints.patch_grid, *from_conv) if g is not None))

    def allowed(prefix: int) -> bool:
        if fixed is not None:
            return prefix == fixed
        return prefix >= 0 and (known is None or prefix in (known, 0))

    fitting = [(g, count - g[0] * g[1]) for g in grids if allowed(count - g[0] * g[1])]
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
    return Layout("tokens", (int(grid[0]), int(grid[1])), int(prefix))
