"""Layer occlusion: Delta_c(p) = s_c(A) - s_c(A with every channel zeroed at grid position p).

The faithfulness yardstick of `hirescam eval`: under an affine head Delta equals HiResCAM exactly.
The occluded copies of A are handed to the rest of the network as one larger batch from the target
layer's hook, so the layers below it run once per image.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .capture import Capture, check_input, select_targets

NOISE_ULPS = 16  # an occlusion effect within this many float epsilons of the score is rounding: 0
CHUNK = {"cuda": 1024, "cpu": 256}  # occluded copies per forward, by device type


@dataclass
class _Plan:
    """What occlusion needs to know about the model at one input size."""

    positions: int
    classes: int
    batched: bool | None = None  # the rest of the network takes the larger batch; None: not tried yet


class Occluder:
    """Layer occlusion for one model; remembers per input size whether the larger batch works."""

    def __init__(self, capture: Capture):
        self.capture = capture
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self.batched: bool | None = None  # the last occlusion ran as one larger batch

    def __call__(
        self,
        x: Tensor,
        classes: int | Sequence[int] | Tensor,
        positions: Tensor | None = None,
        chunk: int | None = None,
    ) -> Tensor:
        """Delta (B, T, *grid), float32; see `Explainer.occlusion`."""
        check_input(x)
        plan = self._plan(x)
        batch, cells = x.shape[0], plan.positions
        empty = isinstance(classes, Tensor) and classes.ndim == 2 and classes.shape == (batch, 0)
        targets = classes if empty else select_targets(x.new_zeros(batch, plan.classes), 1, classes, None)[0]
        if positions is None:
            positions = torch.arange(cells, device=x.device)
        positions = torch.as_tensor(positions, device=x.device)
        if positions.ndim != 1 or positions.is_floating_point() or len(positions) == 0:
            raise ValueError("positions must be a non-empty 1-D tensor of flat grid indices")
        distinct = len(positions.unique()) == len(positions)
        if int(positions.min()) < 0 or int(positions.max()) >= cells or not distinct:
            raise ValueError(f"positions must be distinct indices in 0..{cells - 1}")
        chunk = chunk or CHUNK.get(x.device.type, CHUNK["cpu"])
        delta = torch.full((batch, targets.shape[1], cells), float("nan"), device=x.device)
        for images, part in jobs(batch, positions, chunk) if not empty else ():
            scores = self._scores(x[images], targets[images], part, plan)  # (b, 1 + n, T)
            change = scores[:, :1] - scores[:, 1:]
            noise = NOISE_ULPS * torch.finfo(scores.dtype).eps * scores.abs().amax(1, keepdim=True)
            change = torch.where(change.abs() <= noise, 0.0, change)  # rounding of the score, not an effect
            delta[images][:, :, part] = change.transpose(1, 2).float()
        self.batched = plan.batched
        return delta.unflatten(2, self.capture.layout(x).grid)

    def _plan(self, x: Tensor) -> _Plan:
        """Grid size and class count of the target at this input size, from one plain forward of x[:1]."""
        key = tuple(x.shape[1:])
        if key not in self._plans:
            with torch.inference_mode(), self.capture.autocast(x.device):
                logits, _ = self.capture.run_with(x[:1], lambda out: out)
            self._plans[key] = _Plan(positions=self.capture.layout(x).positions, classes=logits.shape[1])
        return self._plans[key]

    def _scores(self, x: Tensor, targets: Tensor, positions: Tensor, plan: _Plan) -> Tensor:
        """Scores (b, 1 + n, T) of x's targets: the layer's output intact, then zeroed at each position."""
        copies = 1 + len(positions)
        layout = self.capture.layout(x)

        def occlude(out: Tensor) -> Tensor:  # the layer's raw output -> its occluded copies, same layout
            return layout.from_flat(occluded_copies(layout.to_flat(out), positions), out)

        logits = None
        if plan.batched is not False:
            try:
                logits = self._logits(x, occlude)
            except Exception:  # any failure of the larger batch means: use the fallback
                logits = None
            if logits is not None and logits.shape[0] != len(x) * copies:
                logits = None
            if logits is not None and plan.batched is None:
                plain = self._logits(x, lambda out: out)
                intact = logits.view(len(x), copies, -1)[:, 0]
                logits = logits if self.capture.gives_the_same_logits(intact, plain) else None
            plan.batched = logits is not None
        if logits is None:  # the same copies at the same batch size: the input repeated per copy
            repeated = x.repeat_interleave(copies, 0)
            logits = self._logits(repeated, lambda out: occlude(out[::copies]))
        logits = logits.view(len(x), copies, -1)
        return logits.gather(2, targets[:, None, :].expand(-1, copies, -1))

    def _logits(self, x: Tensor, replace) -> Tensor:
        """Logits of x with the target's output mapped through `replace`, in inference mode."""
        with torch.inference_mode(), self.capture.autocast(x.device):
            logits, _ = self.capture.run_with(x, replace)
        return logits


def occluded_copies(flat: Tensor, positions: Tensor) -> Tensor:
    """(B, K, N) -> (B * (1 + n), K, N), image-major: each map, then a copy of it per position in
    `positions` (n flat grid indices) with every channel zeroed there."""
    keep = torch.ones(1 + len(positions), flat.shape[-1], dtype=torch.bool, device=flat.device)
    keep[torch.arange(1, 1 + len(positions), device=flat.device), positions] = False
    keep = keep.view(1, -1, 1, flat.shape[-1])
    copies = torch.where(keep, flat[:, None], torch.zeros((), dtype=flat.dtype, device=flat.device))
    return copies.flatten(0, 1)


def jobs(batch: int, positions: Tensor, chunk: int) -> list[tuple[slice, Tensor]]:
    """(images, positions) of each forward: as many whole images as fit `chunk` copies, or
    one image's positions in pieces when a single image's copies do not fit."""
    count = len(positions)
    if count + 1 <= chunk:
        per = chunk // (count + 1)
        return [(slice(i, i + per), positions) for i in range(0, batch, per)]
    piece = max(1, chunk - 1)
    return [(slice(i, i + 1), positions[j : j + piece]) for i in range(batch) for j in range(0, count, piece)]
