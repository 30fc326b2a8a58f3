"""`hirescam layers`: every spatial layer of the configured model, as the lines of a table."""

from collections.abc import Iterator

from .config import Config, ConfigError
from .engine import Explainer
from .engine.layers import choose_auto, probe_input, trace_layers
from .engine.layouts import layout_spec
from .session import Session


def layer_table(settings: Config) -> Iterator[str]:
    """The table's lines: each spatial layer's shape, layout, grid, prefix, calls and HiResCAM vs Grad-CAM."""
    session = Session.open(settings, load_weights=False, explainer=False)  # shapes need no weights: offline
    loaded = session.loaded
    probe = probe_input(session.probe())
    size = "x".join(map(str, probe.shape[2:]))
    try:
        traced = trace_layers(loaded.module, probe, layout_spec(settings.model), probe=True)
    except RuntimeError as e:  # the model cannot take inputs of this size
        raise ConfigError(f"the model cannot take inputs of {size}: {str(e).splitlines()[0]}") from None
    try:
        auto = choose_auto(traced)
        yield f"{loaded.name}, input {size}; 'auto' picks {auto}"
    except ValueError as e:
        auto = None
        yield f"{loaded.name}, input {size}; 'auto' finds nothing: {e}"
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
            kind, grid = info.layout.name, "x".join(map(str, info.layout.grid))
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
