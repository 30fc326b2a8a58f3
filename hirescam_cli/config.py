"""TOML config -> validated, frozen dataclasses; command-line flags override single keys."""

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from . import modalities
from .engine.methods import METHODS
from .errors import UsageError

DEFAULT_CONFIG = Path(__file__).parent / "demo" / "demo.toml"
Size = int | tuple[int, int]


class ConfigError(UsageError):
    """A config or flag value that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class InputConfig:
    kind: str = "images"  # the modality of the inputs (hirescam_cli.modalities)


@dataclass(frozen=True)
class ModelConfig:
    arch: str | None = None
    factory: str | None = None
    weights: str | None = None  # torchvision weights name; None: DEFAULT (no checkpoint); "none": random
    checkpoint: Path | None = None
    num_classes: int | None = None
    labels: Path | None = None
    multilabel: bool | None = None  # sigmoid outputs (probabilities, thresholds); None: the model's own
    allow_pickle: bool = False  # hf: also pickled weights (pytorch_model.bin, read as tensors only)
    target_layer: str = "auto"
    layout: str = "auto"  # how the target layer holds its map: auto, nchw, nhwc or tokens
    grid: tuple[int, int] | None = None  # the token grid (h, w); None: inferred
    prefix_tokens: int | None = None  # tokens before the grid (class, distillation, registers)
    kwargs: dict[str, Any] | None = None  # [model.kwargs]: constructor arguments (monai:NAME, factories)


@dataclass(frozen=True)
class PreprocessConfig:
    resize: Size | None = None  # None: from the torchvision weights, else 256
    crop: Size | None = None  # None: from the torchvision weights, else 224 unless resize is exact
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None  # None: from the model's preset, else bilinear
    max_pixels: int = 100_000_000


@dataclass(frozen=True)
class ExplainConfig:
    methods: tuple[str, ...] = ("hirescam", "gradcam")
    top_k: int = 1
    classes: tuple[int | str, ...] | None = None
    threshold: float | None = None
    batch_size: int | None = None  # None: 8 on CPU (faster there than larger batches), 32 on GPUs
    workers: int | None = None  # None: from the usable cores and the device (resources.py)
    device: str = "auto"
    amp: bool = False


@dataclass(frozen=True)
class RenderConfig:
    colormap: str = "jet"
    signed_colormap: str = "RdBu_r"
    alpha: float = 0.5
    signed: bool = False
    window: tuple[float, float] | None = None  # volumes: the scan's window under the maps (CT: HU)


@dataclass(frozen=True)
class OutputConfig:
    save_raw: bool = False
    format: str = "png"  # the overlays' format: png (lossless), jpeg or webp (lossy, at `quality`)
    quality: int = 90  # of jpeg and webp overlays, 1..100
    png: str = "fast"  # fast: fpng; small: zlib, ~25% smaller files, ~20x slower to encode
    max_side: int = 4096  # overlays of images with a longer side are scaled down to it (aspect kept)
    sink: str = "folders"  # where the outputs go (hirescam_cli.sinks)


@dataclass(frozen=True)
class Config:
    input: InputConfig
    model: ModelConfig
    preprocess: Any  # PreprocessConfig for pictures, else the kind's own (modalities.preprocess_table)
    explain: ExplainConfig
    render: RenderConfig
    output: OutputConfig
    source: Path | None = None  # the file it came from

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, for run.json and the resume fingerprint."""
        return {
            section.name: {
                f.name: _plain(getattr(getattr(self, section.name), f.name))
                for f in fields(getattr(self, section.name))
            }
            for section in fields(self)
            if section.name != "source"
        }


SECTIONS = {
    "input": InputConfig,
    "model": ModelConfig,
    "preprocess": PreprocessConfig,
    "explain": ExplainConfig,
    "render": RenderConfig,
    "output": OutputConfig,
}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# -- validators: (key, raw value, config folder) -> clean value, or ConfigError --------------


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r} is not allowed: expected {allowed}")


def _text(key: str, value: Any, _base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(key, value, "a non-empty string")
    return value


def _arch(key: str, value: Any, base: Path) -> str:
    """A model name; hf:PATH with PATH a folder relative to the config's folder is made absolute."""
    name = _text(key, value, base)
    folder = Path(name.removeprefix("hf:")).expanduser()
    if name.startswith("hf:") and not folder.is_absolute() and (base / folder).is_dir():
        return f"hf:{(base / folder).resolve()}"
    return name


def _path(key: str, value: Any, base: Path) -> Path:
    path = Path(_text(key, value, base)).expanduser()
    return path if path.is_absolute() else (base / path)


def _positive(key: str, value: Any, _base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(key, value, "a positive integer")
    return value


def _workers(key: str, value: Any, _base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(key, value, "an integer >= 0 (0 decodes in the main process)")
    return value


def _size(key: str, value: Any, base: Path) -> Size:
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise _fail(key, value, "an integer or [height, width]")
        return (_positive(key, value[0], base), _positive(key, value[1], base))
    return _positive(key, value, base)


def _triple(key: str, value: Any, _base: Path) -> tuple[float, float, float]:
    ok = isinstance(value, list | tuple) and len(value) == 3
    ok = ok and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok:
        raise _fail(key, value, "three finite numbers, one per RGB channel")
    return tuple(float(v) for v in value)


def _std(key: str, value: Any, base: Path) -> tuple[float, float, float]:
    triple = _triple(key, value, base)
    if min(triple) <= 0:
        raise _fail(key, value, "three positive numbers")
    return triple


def _fraction(key: str, value: Any, _base: Path) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
    if not ok:  # NaN fails the comparison too
        raise _fail(key, value, "a number between 0 and 1")
    return float(value)


def _count(key: str, value: Any, _base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(key, value, "an integer >= 0")
    return value


def _grid(key: str, value: Any, base: Path) -> tuple[int, int]:
    size = _size(key, value, base)
    return size if isinstance(size, tuple) else (size, size)


def _choice(*allowed: str):
    def check(key: str, value: Any, _base: Path) -> str:
        if value not in allowed:
            raise _fail(key, value, f"one of {', '.join(allowed)}")
        return value

    return check


def _flag(key: str, value: Any, _base: Path) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false")
    return value


def _methods(key: str, value: Any, _base: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(key, value, f"a list of methods from {', '.join(METHODS)}")
    unknown = [v for v in value if v not in METHODS]
    if unknown:
        raise _fail(key, unknown[0], f"one of {', '.join(METHODS)}")
    return tuple(dict.fromkeys(value))


def _classes(key: str, value: Any, _base: Path) -> tuple[int | str, ...]:
    if isinstance(value, int | str):
        value = [value]
    ok = isinstance(value, list | tuple) and value
    ok = ok and all(
        (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or isinstance(v, str) for v in value
    )
    if not ok:
        raise _fail(key, value, "a list of class ids (>= 0) or label names")
    return tuple(value)


def _colormap(key: str, value: Any, base: Path) -> str:
    import matplotlib  # here, not at the top: loading a config stays quick

    name = _text(key, value, base)
    if name not in matplotlib.colormaps:
        raise _fail(key, value, "a matplotlib colormap name such as jet, viridis, inferno or turbo")
    return name


def _device(key: str, value: Any, base: Path) -> str:
    name = _text(key, value, base)
    index = name.removeprefix("cuda:")
    if name in ("auto", "cpu", "cuda", "mps") or (name.startswith("cuda:") and index.isdigit()):
        return name
    raise _fail(key, value, "auto, cpu, cuda, cuda:N or mps")


def _kwargs(key: str, value: Any, _base: Path) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isidentifier() for k in value):
        raise _fail(key, value, "a table of keyword arguments ([model.kwargs] with name = value lines)")
    return dict(value)


def _window(key: str, value: Any, _base: Path) -> tuple[float, float]:
    ok = isinstance(value, list | tuple) and len(value) == 2
    ok = ok and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok or value[0] >= value[1]:
        raise _fail(key, value, "[low, high] with low < high, in the scan's units (CT: Hounsfield units)")
    return float(value[0]), float(value[1])


def _quality(key: str, value: Any, _base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise _fail(key, value, "an integer from 1 (smallest files) to 100 (best pictures)")
    return value


def _png(key: str, value: Any, _base: Path) -> str:
    if value not in ("fast", "small"):
        raise _fail(key, value, '"fast" (fpng) or "small" (zlib)')
    return value


VALIDATORS = {
    "input": {"kind": _choice(*modalities.KINDS)},
    "model": {
        "arch": _arch,
        "factory": _text,
        "weights": _text,
        "checkpoint": _path,
        "num_classes": _positive,
        "labels": _path,
        "multilabel": _flag,
        "allow_pickle": _flag,
        "target_layer": _text,
        "layout": _choice("auto", "nchw", "nhwc", "tokens"),
        "grid": _grid,
        "prefix_tokens": _count,
        "kwargs": _kwargs,
    },
    "preprocess": {
        "resize": _size,
        "crop": _size,
        "mean": _triple,
        "std": _std,
        "interpolation": _choice("bilinear", "bicubic", "nearest"),
        "max_pixels": _positive,
    },
    "explain": {
        "methods": _methods,
        "top_k": _positive,
        "classes": _classes,
        "threshold": _fraction,
        "batch_size": _positive,
        "workers": _workers,
        "device": _device,
        "amp": _flag,
    },
    "render": {
        "colormap": _colormap,
        "signed_colormap": _colormap,
        "alpha": _fraction,
        "signed": _flag,
        "window": _window,
    },
    "output": {
        "save_raw": _flag,
        "format": _choice("png", "jpeg", "webp"),
        "quality": _quality,
        "png": _png,
        "max_side": _positive,
        "sink": _text,
    },
}


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed file, or a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e}") from None


def build(raw: dict[str, Any], base: Path, source: Path | None = None) -> Config:
    """Validate a raw {section: {key: value}} mapping into a Config."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section [{unknown[0]}]; valid sections: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of keys")
        validators = VALIDATORS[name]
        if name == "preprocess":  # the kind of input declares its own table (pictures: PreprocessConfig's)
            cls, validators = modalities.preprocess_table(sections["input"].kind) or (cls, validators)
        bad = sorted(set(values) - set(validators))
        if bad:
            raise ConfigError(f"unknown key {name}.{bad[0]}; valid keys: {', '.join(validators)}")
        clean = {k: validators[k](f"{name}.{k}", v, base) for k, v in values.items() if v is not None}
        sections[name] = cls(**clean)
    config = Config(**sections, source=source)
    _check_whole(config)
    return config


def _check_whole(config: Config) -> None:
    """Rules that involve more than one key."""
    model = config.model
    if bool(model.arch) == bool(model.factory):
        raise ConfigError(
            "set exactly one of model.arch (a torchvision model name, timm:NAME or hf:PATH_OR_NAME) "
            "or model.factory (module:callable)"
        )
    if model.arch and model.arch.startswith(("timm:", "hf:")) and model.weights not in (None, "none"):
        hub = "timm" if model.arch.startswith("timm:") else "Hugging Face"
        raise ConfigError(
            f'model.weights names torchvision weights; {hub} models take "none" (random weights) or '
            "model.checkpoint"
        )
    if model.factory and model.weights:
        raise ConfigError("model.weights names torchvision weights; with model.factory use model.checkpoint")
    if model.factory and ":" not in model.factory:
        raise ConfigError(f"model.factory = {model.factory!r} must look like 'package.module:callable'")
    if config.explain.classes is not None and config.explain.threshold is not None:
        raise ConfigError("set either explain.classes or explain.threshold, not both")
    if model.kwargs is not None and not (model.factory or (model.arch or "").startswith("monai:")):
        raise ConfigError("[model.kwargs] are constructor arguments of a monai:NAME model or a model.factory")


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a config file and apply flag overrides.

    `overrides` maps "section.key" to a value; None values are ignored. Without a file, the
    shipped demo config is the base, unless the flags name a model of their own (--model), which
    then starts from the built-in defaults. A model named by flags replaces the file's whole
    [model] table. Paths given as flags resolve against the current folder, paths in the file
    against the file's folder.
    """
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    new_model = "model.arch" in flags or "model.factory" in flags
    if path is None and new_model:
        path, raw, base = None, {}, Path.cwd()
    else:
        path = DEFAULT_CONFIG if path is None else Path(path)
        raw, base = read_toml(path), path.resolve().parent
    if new_model:
        raw["model"] = {}
    for dotted, value in flags.items():
        section, key = dotted.split(".")
        if key in ("checkpoint", "labels"):
            value = str(Path(value).resolve())
        if key == "arch" and value.startswith("hf:") and Path(value[3:]).expanduser().is_dir():
            value = f"hf:{Path(value[3:]).expanduser().resolve()}"  # a folder, relative to this folder
        raw.setdefault(section, {})[key] = value
    chosen = [key for key in SELECTION if f"explain.{key}" in flags]
    if len(chosen) > 1:
        raise ConfigError(f"give one of --top-k, --classes, --threshold, not {' and '.join(chosen)}")
    for key in chosen:  # a selection given as a flag replaces the config's
        for other in SELECTION:
            if other != key:
                raw["explain"].pop(other, None)
    return build(raw, base, source=path)


SELECTION = ("top_k", "classes", "threshold")  # how [explain] picks the classes: one of these
