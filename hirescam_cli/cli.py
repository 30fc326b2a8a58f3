"""The `hirescam` command line: parsing and error reporting only; the work lives in run.py and below.

Nothing heavy is imported here: `--help`, `--version` and usage errors answer before torch loads.
"""

import sys
from pathlib import Path

import click

from . import __version__
from .config import load
from .errors import EXIT_INTERRUPTED, EXIT_USAGE, Failure, UsageError
from .sources import has_source_prefix

EXIT_CODES = {
    0: "every input explained or skipped",
    1: "at least one input failed (see OUT/results.jsonl); the others were done",
    2: "usage or config error: one line on stderr, nothing written",
    3: "outputs cannot be written (folder unusable, disk full): the run stops",
    4: "OUT is locked by another run (--wait waits for it instead)",
    5: "torchrun job: a process stopped before finishing; rerun to complete",
    6: "compare: a gate failed (one line per failed gate on stderr)",
    130: "interrupted (Ctrl-C, SIGTERM): stopped after the current batch",
}


def epilog(examples: list[str], codes: tuple[int, ...], meanings: dict[int, str] | None = None) -> str:
    """Examples and exit codes for a command's --help, kept as typed (\\b stops click rewrapping);
    `meanings` says what a code means for this command where EXIT_CODES's words do not fit."""
    lines = ["\b", "Examples:", *(f"  {example}" for example in examples), "", "\b", "Exit codes:"]
    lines += [f"  {code:<4d}{(meanings or {}).get(code, EXIT_CODES[code])}" for code in codes]
    return "\n".join(lines)


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _classes(value: str | None) -> list[int | str] | None:
    return None if value is None else [int(v) if v.isdigit() else v for v in _split(value)]


def _model_flags(model: str | None) -> dict:
    """--model NAME is a torchvision arch, timm:NAME or hf:NAME (a hub prefix) a hub's; --model pkg.mod:fn
    a factory."""
    if model is None:
        return {}
    factory = ":" in model and not has_source_prefix(model)
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


def _options(*options):
    """A decorator applying click options in the order they are listed."""

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


config_option = click.option(
    "-c", "--config", type=click.Path(path_type=Path), help="TOML config (default: the shipped demo config)."
)
model_options = _options(
    click.option(
        "--model",
        help="A torchvision model name (resnet50), timm:NAME, hf:PATH_OR_NAME (a Hugging Face folder or hub "
        "name), or package.module:callable (runs that code).",
    ),
    click.option(
        "--weights",
        help="torchvision weights name (default: the model's DEFAULT weights), or 'none' for random "
        "weights (seeded; timm models too).",
    ),
    click.option(
        "--checkpoint", type=click.Path(path_type=Path), help="A state_dict file to load (as data only)."
    ),
    click.option(
        "--allow-pickle/--no-allow-pickle",
        default=None,
        help="hf: models: also load pickled weights (pytorch_model.bin, as tensors only) if there are no "
        "safetensors.",
    ),
    click.option("--labels", type=click.Path(path_type=Path), help="Labels file, one label per line."),
    click.option(
        "--target-layer", help="Dotted module name to explain at, or 'auto' (see `hirescam layers`)."
    ),
    click.option(
        "--layout",
        type=click.Choice(["auto", "nchw", "nhwc", "tokens"]),
        help="How the target layer holds its map (default: inferred).",
    ),
    click.option("--grid", help="Token layers: the patch grid HxW, e.g. 14x14 (default: inferred)."),
    click.option(
        "--prefix-tokens",
        type=int,
        help="Token layers: tokens before the grid (class, distillation, registers).",
    ),
)
selection_options = _options(
    click.option("--top-k", type=int, help="Explain the k highest-scoring classes (default 1)."),
    click.option("--classes", help="Comma list of class ids or label names to explain, e.g. 3,tabby."),
    click.option(
        "--threshold", type=float, help="Multi-label models: explain every class with sigmoid >= this."
    ),
)
resource_options = _options(
    click.option("--batch-size", type=int, help="Images per forward pass (default: 8 on CPU, 32 on CUDA)."),
    click.option(
        "--workers", type=int, help="Decoding processes (0: in the main process; default: by cores)."
    ),
    click.option("--device", help="auto (default), cpu, cuda, cuda:N or mps."),
    click.option("--amp/--no-amp", default=None, help="Mixed-precision forward (CUDA)."),
)


def model_overrides(model: str | None, flags: dict) -> dict:
    """Config overrides of the model, layout, selection and resource flags (None: not given)."""
    overrides = {
        **_model_flags(model),
        "model.weights": flags.pop("weights", None),
        "model.checkpoint": flags.pop("checkpoint", None),
        "model.allow_pickle": flags.pop("allow_pickle", None),
        "model.labels": flags.pop("labels", None),
        "model.target_layer": flags.pop("target_layer", None),
        "model.layout": flags.pop("layout", None),
        "model.grid": _grid(flags.pop("grid", None)),
        "model.prefix_tokens": flags.pop("prefix_tokens", None),
        "explain.top_k": flags.pop("top_k", None),
        "explain.classes": _classes(flags.pop("classes", None)),
        "explain.threshold": flags.pop("threshold", None),
        "explain.batch_size": flags.pop("batch_size", None),
        "explain.workers": flags.pop("workers", None),
        "explain.device": flags.pop("device", None),
        "explain.amp": flags.pop("amp", None),
    }
    return overrides


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hirescam")
def cli() -> None:
    """Faithful HiResCAM and Grad-CAM explanations for PyTorch image classifiers.

    Run `hirescam COMMAND --help` for a command's flags, examples and exit codes.
    """


@cli.command(
    short_help="Explain images into OUT: heatmaps and summaries.",
    epilog=epilog(
        [
            "hirescam explain sample_images -o out",
            "hirescam explain photos/ -o out --model resnet50 --top-k 3",
            "hirescam explain 'shots/**/*.jpg' -o out -c my.toml --checkpoint ft.pt --classes 3,tabby",
            "find /data -name '*.jpg' | hirescam explain --inputs-from - -o out --wait",
        ],
        (0, 1, 2, 3, 4, 5, 130),
    ),
)
@click.argument("inputs", nargs=-1)
@click.option(
    "-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder (made if missing)."
)
@click.option(
    "--inputs-from", metavar="FILE", help="Also explain the paths listed in FILE, one per line ('-': stdin)."
)
@click.option("--allow-empty", is_flag=True, help="No image found is not an error: exit 0.")
@click.option("--wait", is_flag=True, help="If another run holds OUT, wait for it instead of exiting 4.")
@config_option
@model_options
@click.option(
    "--methods", help="Comma list: hirescam,gradcam,gradcam++,xgradcam,layercam,gradcam-elementwise."
)
@selection_options
@resource_options
@click.option("--colormap", help="Matplotlib colormap name (default jet).")
@click.option("--alpha", type=float, help="Heatmap opacity, 0..1 (default 0.5).")
@click.option("--signed/--no-signed", default=None, help="Show HiResCAM signed, zero at the colormap centre.")
@click.option("--save-raw/--no-save-raw", default=None, help="Also write raw maps as float32 .npy.")
@click.option(
    "--format",
    "picture_format",
    type=click.Choice(["png", "jpeg", "webp"]),
    help="Overlay pictures: png (lossless, default), jpeg or webp (lossy, much smaller).",
)
@click.option("--quality", type=int, help="Quality of jpeg and webp overlays, 1..100 (default 90).")
@click.option("--png", type=click.Choice(["fast", "small"]), help="PNG encoder: fast (fpng) or small (zlib).")
@click.option(
    "--max-side", type=int, help="Overlays of larger images are scaled down to this long side (default 4096)."
)
@click.option(
    "--max-pixels", type=int, help="Refuse images with more pixels than this (default 100,000,000)."
)
@click.option("--overwrite", is_flag=True, help="Redo every input, even those whose outputs are complete.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--report", is_flag=True, help="Also write OUT/report/index.html (see `hirescam report`).")
def explain(inputs, out, config, model, overwrite, quiet, inputs_from, allow_empty, wait, report, **flags):
    """Explain image files, folders (recursive) or glob patterns into OUT.

    Writes OUT/<input>/<method>-<class>.png heatmaps over each image (.jpg or .webp with
    --format) and OUT/<input>/summary.json, plus OUT/results.jsonl and OUT/run.json. A rerun
    skips inputs already done with the same config; without -c the shipped demo config is used.
    """
    if not inputs and inputs_from is None:
        raise click.UsageError("give INPUTS, or --inputs-from FILE")
    overrides = {
        **model_overrides(model, flags),
        "explain.methods": _split(flags["methods"]),
        "render.colormap": flags["colormap"],
        "render.alpha": flags["alpha"],
        "render.signed": flags["signed"],
        "output.save_raw": flags["save_raw"],
        "output.format": flags["picture_format"],
        "output.quality": flags["quality"],
        "output.png": flags["png"],
        "output.max_side": flags["max_side"],
        "preprocess.max_pixels": flags["max_pixels"],
    }
    settings = load(config, overrides)
    from .run import run_explain

    options = {"wait": wait, "inputs_from": inputs_from, "allow_empty": allow_empty, "report": report}
    sys.exit(run_explain(settings, list(inputs), out, overwrite, quiet, **options))


@cli.command(
    name="report",
    short_help="Write OUT/report/index.html: a gallery of a run.",
    epilog=epilog(
        ["hirescam report out", "hirescam report out --wait   # after the run that holds out"], (0, 2, 3, 4)
    ),
)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--wait", is_flag=True, help="If a run holds OUT, wait for it instead of exiting 4.")
def report_command(out, wait) -> None:
    """Write OUT/report/index.html: a static, offline gallery of the run in OUT.

    Reads run.json, results.jsonl and the summaries; thumbnails are made once and kept while their
    pictures are unchanged. Works for a finished or an interrupted run.
    """
    from .lock import OutLock
    from .report import ReportError, write_report

    if not out.is_dir():
        raise ReportError(f"{out} is not a folder: give the OUT of a `hirescam explain` run")
    lock = OutLock(out)  # a report never reads a run that is still writing
    lock.acquire(wait, waiting=lambda message: click.echo(f"hirescam: {message}", err=True))
    try:
        click.echo(write_report(out))
    finally:
        lock.release()


@cli.command(
    name="compare",
    short_help="Compare two runs' explanations; gate a release in CI.",
    epilog=epilog(
        [
            "hirescam compare base_out new_out",
            "hirescam compare base_out new_out -o compare --min-agreement 0.9 --max-changed 0.02",
            "hirescam compare base_out new_out --min-agreement-each 0.5 --wait",
        ],
        (0, 2, 3, 4, 6),
        {
            0: "compared; every gate set passed",
            2: "usage error, or runs that cannot be compared: one line on stderr, nothing written",
            3: "-o DIR cannot be written",
            4: "BASE or NEW is locked by a run (--wait waits for it instead)",
        },
    ),
)
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", type=click.Path(path_type=Path), help="Write compare.json and compare.html here."
)
@click.option(
    "--min-agreement",
    type=click.FloatRange(-1, 1),
    metavar="R",
    help="Gate: the median over inputs of HiResCAM's Pearson r (BASE vs NEW) must reach R.",
)
@click.option(
    "--max-changed",
    type=click.FloatRange(0, 1),
    metavar="F",
    help="Gate: the fraction of inputs whose top-1 class changed must not exceed F.",
)
@click.option(
    "--min-agreement-each",
    type=click.FloatRange(-1, 1),
    metavar="R",
    help="Gate: every input's HiResCAM Pearson r must reach R.",
)
@click.option("--wait", is_flag=True, help="If a run holds BASE or NEW, wait for it instead of exiting 4.")
def compare_command(base, new, out, min_agreement, max_changed, min_agreement_each, wait) -> None:
    """Compare two runs (OUT folders of `hirescam explain`) of the same inputs: BASE and NEW.

    Inputs are matched by key and sha256. Per input and class explained on both sides: the prediction
    change, and per method how far the maps agree once both are registered onto the original (Pearson r
    of the normalised maps, top-20% IoU, peak distance). Prints a Markdown summary (appended to
    $GITHUB_STEP_SUMMARY when set); -o writes compare.json and compare.html. A failed gate exits 6.
    """
    from .compare import Gates, run_compare

    gates = Gates(min_agreement, max_changed, min_agreement_each)
    say = lambda message: click.echo(f"hirescam: {message}", err=True)  # noqa: E731
    sys.exit(run_compare(base, new, out, gates, wait, say))


@cli.command(
    short_help="List the model's spatial layers and auto's pick.",
    epilog=epilog(
        [
            "hirescam layers",
            "hirescam layers --model vgg16",
            "hirescam layers -c my.toml --target-layer layer4.2",
        ],
        (0, 2),
    ),
)
@config_option
@model_options
def layers(config, model, **flags) -> None:
    """List every spatial layer at the configured input size: its output shape, layout, grid and
    prefix tokens, whether it runs once, whether HiResCAM and Grad-CAM differ there, and the layer
    `auto` picks. Needs no weights (works offline)."""
    settings = load(config, model_overrides(model, flags))
    from .layer_table import layer_table

    for line in layer_table(settings):
        click.echo(line)


@cli.command(
    name="eval",
    short_help="Score every method's faithfulness (and localisation).",
    epilog=epilog(
        [
            "hirescam eval sample_images -o eval_out",
            "hirescam eval sample_images --masks sample_masks -o eval_out",
            "hirescam eval photos/ --model resnet50 --checkpoint r50.pth --top-k 3 --positions 20",
        ],
        (0, 2, 3),
    ),
)
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
@model_options
@selection_options
@resource_options
def evaluate(images, masks, config, out, positions, model, **flags) -> None:
    """Faithfulness to the model (layer occlusion) of every method; with --masks, localisation too.

    Needs no ground truth: the score drop when each grid position of the target layer is zeroed is
    compared with every method's map. Prints Markdown tables; -o writes eval.json and eval.html.
    """
    if masks is not None and not masks.is_dir():
        raise UsageError(f"--masks {masks} is not a folder")
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file, not a folder: give the folder eval.json goes to")
    settings = load(config, model_overrides(model, flags))
    from .evaluation import run_eval

    run_eval(settings, list(images), masks, out, positions)


def main() -> None:
    """Entry point: one clear line and a documented exit code for every failure a user can cause."""
    try:
        cli.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("hirescam: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        click.echo(f"hirescam: error: {e.format_message()}", err=True)
        sys.exit(EXIT_USAGE)
    except Failure as e:
        click.echo(f"hirescam: error: {e}", err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
