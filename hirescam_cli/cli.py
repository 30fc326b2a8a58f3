"""The `hirescam` command line: parsing and error reporting only; the work lives in pipeline.py."""

import sys
from pathlib import Path

import click
import torch

from . import __version__
from .config import ConfigError, load
from .discovery import InputError
from .engine import Explainer
from .evaluation import run_eval
from .layers import choose_auto, probe_input, trace_layers
from .layouts import layout_spec
from .lock import OutLock, OutputLocked
from .models import ModelError, load_model
from .outputs import OutputError
from .pipeline import EXIT_LOCKED, EXIT_OUTPUT, EXIT_USAGE, make_preprocess, run_explain
from .report import ReportError, write_report

USAGE_ERRORS = (ConfigError, ModelError, InputError, ReportError)


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _classes(value: str | None) -> list[int | str] | None:
    return None if value is None else [int(v) if v.isdigit() else v for v in _split(value)]


def _model_flags(model: str | None) -> dict:
    """--model NAME is a torchvision arch, timm:NAME a timm one; --model pkg.mod:fn is a factory."""
    if model is None:
        return {}
    factory = ":" in model and not model.startswith("timm:")
    return {"model.factory": model} if factory else {"model.arch": model}


def _grid(value: str | None) -> list[int] | None:
    """--grid 14x14 (or 14,14, or 14) -> [h, w]."""
    if value is None:
        return None
    parts = value.lower().replace(",", "x").split("x")
    if not all(p.strip().isdigit() for p in parts) or len(parts) > 2:
        raise click.BadParameter(f"{value!r} is not HxW, e.g. 14x14", param_hint="--grid")
    sizes = [int(p) for p in parts]
    return sizes * 2 if len(sizes) == 1 else sizes


def layout_options(command):
    """--layout, --grid and --prefix-tokens: how the target layer holds its map."""
    prefix_help = "Tokens before the patch grid (class, distillation, registers)."
    command = click.option("--prefix-tokens", type=int, help=prefix_help)(command)
    command = click.option("--grid", help="Token grid HxW, e.g. 14x14.")(command)
    return click.option(
        "--layout",
        type=click.Choice(["auto", "nchw", "nhwc", "tokens"]),
        help="How the target layer holds its map (default: inferred).",
    )(command)


def _layout_flags(flags: dict) -> dict:
    return {
        "model.layout": flags.pop("layout"),
        "model.grid": _grid(flags.pop("grid")),
        "model.prefix_tokens": flags.pop("prefix_tokens"),
    }


config_option = click.option(
    "-c", "--config", type=click.Path(path_type=Path), help="TOML config (default: the shipped demo config)."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hirescam")
def cli() -> None:
    """Faithful HiResCAM and Grad-CAM explanations for PyTorch image classifiers."""


@cli.command()
@click.argument("inputs", nargs=-1)
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option(
    "--inputs-from", metavar="FILE", help="Also explain the paths listed in FILE, one per line ('-': stdin)."
)
@click.option("--allow-empty", is_flag=True, help="No image found is not an error: exit 0.")
@click.option("--wait", is_flag=True, help="If another run holds OUT, wait for it instead of exiting 4.")
@config_option
@click.option("--model", help="torchvision name, timm:NAME, or package.module:callable (runs that code).")
@click.option("--weights", help="torchvision weights name, e.g. IMAGENET1K_V2.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="state_dict file (loaded as data only).")
@click.option("--labels", type=click.Path(path_type=Path), help="Labels file, one per line.")
@click.option("--target-layer", help="Dotted module name, or 'auto'.")
@layout_options
@click.option(
    "--methods", help="Comma list: hirescam,gradcam,gradcam++,xgradcam,layercam,gradcam-elementwise."
)
@click.option("--top-k", type=int, help="Explain the k highest-scoring classes.")
@click.option("--classes", help="Comma list of class ids or label names to explain.")
@click.option("--threshold", type=float, help="Multi-label: explain every class with sigmoid >= this.")
@click.option("--batch-size", type=int)
@click.option("--workers", type=int, help="Decoding processes (0: in the main process; default: by cores).")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision forward (CUDA).")
@click.option("--colormap", help="Matplotlib colormap name.")
@click.option("--alpha", type=float, help="Heatmap opacity, 0..1.")
@click.option("--signed/--no-signed", default=None, help="Show HiResCAM signed, zero at the colormap centre.")
@click.option("--save-raw/--no-save-raw", default=None, help="Also write raw maps as float32 .npy.")
@click.option("--png", type=click.Choice(["fast", "small"]), help="PNG encoder: fast (fpng) or small (zlib).")
@click.option("--max-side", type=int, help="Overlays of larger images are scaled down to this long side.")
@click.option("--max-pixels", type=int, help="Refuse images with more pixels than this.")
@click.option("--overwrite", is_flag=True, help="Redo images whose outputs exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--report", is_flag=True, help="Also write OUT/report/index.html (see `hirescam report`).")
def explain(inputs, out, config, model, overwrite, quiet, inputs_from, allow_empty, wait, report, **flags):
    """Explain image files, folders (recursive) or glob patterns into OUT."""
    if not inputs and inputs_from is None:
        raise click.UsageError("give INPUTS, or --inputs-from FILE")
    overrides = {
        **_model_flags(model),
        **_layout_flags(flags),
        "model.weights": flags["weights"],
        "model.checkpoint": flags["checkpoint"],
        "model.labels": flags["labels"],
        "model.target_layer": flags["target_layer"],
        "explain.methods": _split(flags["methods"]),
        "explain.top_k": flags["top_k"],
        "explain.classes": _classes(flags["classes"]),
        "explain.threshold": flags["threshold"],
        "explain.batch_size": flags["batch_size"],
        "explain.workers": flags["workers"],
        "explain.device": flags["device"],
        "explain.amp": flags["amp"],
        "render.colormap": flags["colormap"],
        "render.alpha": flags["alpha"],
        "render.signed": flags["signed"],
        "output.save_raw": flags["save_raw"],
        "output.png": flags["png"],
        "output.max_side": flags["max_side"],
        "preprocess.max_pixels": flags["max_pixels"],
    }
    settings = load(config, overrides)
    options = {"wait": wait, "inputs_from": inputs_from, "allow_empty": allow_empty, "report": report}
    sys.exit(run_explain(settings, list(inputs), out, overwrite, quiet, **options))


@cli.command(name="report")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--wait", is_flag=True, help="If a run holds OUT, wait for it instead of exiting 4.")
def report_command(out, wait) -> None:
    """Write OUT/report/index.html: a static, offline gallery of the run in OUT."""
    if not out.is_dir():
        raise ReportError(f"{out} is not a folder: give the OUT of a `hirescam explain` run")
    lock = OutLock(out)  # a report never reads a run that is still writing
    lock.acquire(wait, waiting=lambda message: click.echo(f"hirescam: {message}", err=True))
    try:
        click.echo(write_report(out))
    finally:
        lock.release()


@cli.command()
@config_option
@click.option("--model", help="torchvision model name, timm:NAME, or package.module:callable.")
@click.option("--target-layer", help="Mark this layer instead of auto's pick.")
@layout_options
def layers(config, model, **flags) -> None:
    """List every spatial layer at the configured input size: layout, grid, prefix, auto's pick."""
    overrides = {**_model_flags(model), **_layout_flags(flags), "model.target_layer": flags["target_layer"]}
    settings = load(config, overrides)
    loaded = load_model(settings.model, load_weights=False)  # shapes need no weights: works offline
    preprocess = make_preprocess(settings.preprocess, loaded.transforms)
    height, width = preprocess.input_size
    probe = probe_input(torch.zeros(1, 3, height, width))
    traced = trace_layers(loaded.module, probe, layout_spec(settings.model), probe=True)
    try:
        auto = choose_auto(traced)
        click.echo(f"{loaded.name}, input {height}x{width}; 'auto' picks {auto}")
    except ValueError as e:
        auto = None
        click.echo(f"{loaded.name}, input {height}x{width}; 'auto' finds nothing: {e}")
    usable = [info for info in traced if info.layout is not None and info.calls == 1]
    with Explainer(loaded.module) as explainer:  # one forward and one gradient for every layer
        identical = explainer.identical_layers(probe, usable)
    header = f"{'layer':44s} {'output shape':16s} {'layout':7s} {'grid':7s} {'prefix':>6s}  {'runs':18s}"
    click.echo(f"{header} HiResCAM vs Grad-CAM")
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
        click.echo(f"{row}{note}{mark}")
    if auto is not None and identical.get(auto):
        click.echo(
            "identical: the gradient is constant over the grid (a global-average-pool head), so "
            "HiResCAM equals Grad-CAM there by construction; pick a layer marked 'differ' to see a difference"
        )


@cli.command(name="eval")
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--masks",
    type=click.Path(path_type=Path),
    help="Folder of MASKS/<image>/<label>.png: adds localisation and deletion/insertion.",
)
@config_option
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Write eval.json and eval.html here.")
@click.option(
    "--positions", type=int, help="Occlude this many grid positions per batch, sampled (default: all)."
)
@click.option("--batch-size", type=int)
@click.option("--workers", type=int, help="Decoding processes.")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps.")
def evaluate(images, masks, config, out, positions, batch_size, workers, device) -> None:
    """Faithfulness to the model (layer occlusion) of every method; with --masks, localisation too."""
    if masks is not None and not masks.is_dir():
        raise ConfigError(f"--masks {masks} is not a folder")
    overrides = {"explain.workers": workers, "explain.device": device, "explain.batch_size": batch_size}
    settings = load(config, overrides)
    run_eval(settings, list(images), masks, out, positions)


def main() -> None:
    """Entry point: one clear line and a documented exit code for every failure a user can cause."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("hirescam: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"hirescam: error: {e.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except USAGE_ERRORS as e:
        click.echo(f"hirescam: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except OutputError as e:
        click.echo(f"hirescam: error: {e}", err=True)
        sys.exit(EXIT_OUTPUT)
    except OutputLocked as e:
        click.echo(f"hirescam: error: {e}", err=True)
        sys.exit(EXIT_LOCKED)
    except KeyboardInterrupt:
        click.echo("hirescam: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
