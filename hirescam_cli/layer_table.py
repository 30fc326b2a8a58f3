"""`hirescam layers`: every spatial layer of the configured model, as the lines of a table."""

from collections.abc import Iterator

import torch

from .config import Config
from .engine import Explainer
from .engine.layers import choose_auto, probe_input, trace_layers
from .engine.layouts import layout_spec
from .pipeline import make_preprocess
from .sources import load_model


def layer_table(settings: Config) -> Iterator[str]:
    """The table's lines: each spatial layer's shape, layout, grid, prefix, calls and HiResCAM vs Grad-CAM."""
    loaded = load_model(settings.model, load_weights=False)  # shapes need no weights: works offline
    preprocess = make_preprocess(settings.preprocess, loaded.transforms)
    height, width = preprocess.input_size
    probe = probe_input(torch.zeros(1, 3, height, width))
    traced = trace_layers(loaded.module, probe, layout_spec(settings.model), probe=True)
    try:
        auto = choose_auto(traced)
        yield f"{loaded.name}, input {height}x{width}; 'auto' picks {auto}"
    except ValueError as e:
        auto = None
        yield f"{loaded.name}, input {height}x{width}; 'auto' finds nothing: {e}"
    usable = [info for info in traced if info.layout is not None and info.calls == 1]
    with Explainer(loaded.module) as explainer:  # one forward and one gradient for every layer
        identical = explainer.identical_layers(probe, usable)
    header = f"{'layer':44s} {'output shape':16s} {'layout':7s} {'grid':7s} {'prefix':>6s}  {'runs':18s}"
    yield f"{header} HiResCAM vs Grad-CAM"
    for info in traced:
        if info.layout is None and not info.ambiguous:
            continue  # not spatial at all
        once = "once" if info.calls == 1 else f"{info.calls}x (not usable)"
        if info.layout is None:
            kind, grid, prefix = "?", "?", "?"
            note = f"  ({info.problem.rsplit('; ', 1)[1]})"
        else:
            kind, grid = info.layout.kind, "x".join(map(str, info.layout.grid))
            prefix = str(info.layout.prefix_tokens)
            note = "  (scores do not depend on its grid)" if info.grid_gradient is False else ""
        mark = "  <- auto" if info.name == auto else ""
        mark += "  <- target" if info.name == settings.model.target_layer != "auto" else ""
        shape = "x".join(map(str, info.shape[1:]))
        maps = {True: "identical", False: "differ", None: "-"}[identical.get(info.name)]
        row = f"{info.name:44s} {shape:16s} {kind:7s} {grid:7s} {prefix:>6s}  {once:18s} {maps}"
        yield f"{row}{note}{mark}"
    if auto is not None and identical.get(auto):
        yield (
            "identical: the gradient is constant over the grid (a global-average-pool head), so "
            "HiResCAM equals Grad-CAM there by construction; pick a layer marked 'differ' to see a difference"
        )
