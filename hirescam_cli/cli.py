"""The `hirescam` command line: parsing and error reporting only; the work lives in pipeline.py."""

import sys
from pathlib import Path

import click
import torch

from . import __version__
from .config import ConfigError, load
from .data import InputError
from .engine import Explainer
from .evaluation import run_eval
from .layers import choose_auto, trace_layers
from .models import ModelError, load_model
from .outputs import OutputError
from .pipeline import EXIT_OUTPUT, EXIT_USAGE, make_preprocess, run_explain

USAGE_ERRORS = (ConfigError, ModelError, InputError)


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _classes(value: str | None) -> list[int | str] | None:
    return None if value is None else [int(v) if v.isdigit() else v for v in _split(value)]


def _model_flags(model: str | None) -> dict:
    """--model NAME is a torchvision arch; --model pkg.mod:fn is a factory."""
    if model is None:
        return {}
    return {"model.factory": model} if ":" in model else {"model.arch": model}


config_option = click.option(
    "-c", "--config", type=click.Path(path_type=Path), help="TOML config (default: the shipped demo config)."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hirescam")
def cli() -> None:
    """Faithful HiResCAM and Grad-CAM explanations for PyTorch image classifiers."""


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@config_option
@click.option("--model", help="torchvision model name, or package.module:callable (runs that code).")
@click.option("--weights", help="torchvision weights name, e.g. IMAGENET1K_V2.")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="state_dict file (loaded as data only).")
@click.option("--labels", type=click.Path(path_type=Path), help="Labels file, one per line.")
@click.option("--target-layer", help="Dotted module name, or 'auto'.")
@click.option(
    "--methods", help="Comma list: hirescam,gradcam,gradcam++,xgradcam,layercam,gradcam-elementwise."
)
@click.option("--top-k", type=int, help="Explain the k highest-scoring classes.")
@click.option("--classes", help="Comma list of class ids or label names to explain.")
@click.option("--threshold", type=float, help="Multi-label: explain every class with sigmoid >= this.")
@click.option("--batch-size", type=int)
@click.option("--workers", type=int, help="Decoding processes (0: in the main process).")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision forward (CUDA).")
@click.option("--colormap", help="Matplotlib colormap name.")
@click.option("--alpha", type=float, help="Heatmap opacity, 0..1.")
@click.option("--signed/--no-signed", default=None, help="Show HiResCAM signed, zero at the colormap centre.")
@click.option("--save-raw/--no-save-raw", default=None, help="Also write raw maps as float32 .npy.")
@click.option("--png", type=click.Choice(["fast", "small"]), help="PNG encoder: fast (fpng) or small (zlib).")
@click.option("--max-pixels", type=int, help="Refuse images with more pixels than this.")
@click.option("--overwrite", is_flag=True, help="Redo images whose outputs exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def explain(inputs, out, config, model, overwrite, quiet, **flags) -> None:
    """Explain image files, folders (recursive) or glob patterns into OUT."""
    overrides = {
        **_model_flags(model),
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
        "preprocess.max_pixels": flags["max_pixels"],
    }
    settings = load(config, overrides)
    sys.exit(run_explain(settings, list(inputs), out, overwrite=overwrite, quiet=quiet))


@cli.command()
@config_option
@click.option("--model", help="torchvision model name, or package.module:callable.")
def layers(config, model) -> None:
    """List candidate target layers at the configured input size."""
    settings = load(config, _model_flags(model))
    loaded = load_model(settings.model, load_weights=False)  # shapes need no weights: works offline
    preprocess = make_preprocess(settings.preprocess, loaded.transforms)
    height, width = preprocess.input_size
    traced = trace_layers(loaded.module, torch.zeros(1, 3, height, width))
    auto = choose_auto(traced)
    usable = [info.name for info in traced if info.is_map and info.calls == 1]
    example = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    with Explainer(loaded.module) as explainer:  # one forward and one gradient for every layer
        identical = explainer.identical_layers(example, usable)
    click.echo(f"{loaded.name}, input {height}x{width}; 'auto' picks {auto}")
    click.echo(f"{'layer':40s} {'output shape':22s} {'runs':18s} HiResCAM vs Grad-CAM")
    for info in traced:
        if not info.is_map:
            continue
        mark = "  <- auto" if info.name == auto else ""
        once = "once" if info.calls == 1 else f"{info.calls}x (not usable)"
        maps = {True: "identical", False: "differ", None: "-"}[identical.get(info.name)]
        click.echo(f"{info.name:40s} {'x'.join(map(str, info.shape[1:])):22s} {once:18s} {maps}{mark}")
    if identical.get(auto):
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
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Write eval.json here.")
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
    except KeyboardInterrupt:
        click.echo("hirescam: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
