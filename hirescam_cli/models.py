"""Model sources: a torchvision name (+ weights), timm:NAME, a checkpoint, or a "module:callable" factory.

Weights are a choice, never an accident: a torchvision or timm model without a checkpoint gets its
pretrained weights (downloaded when online, from the local cache otherwise), random weights only when
the config says `weights = "none"`, and every model is built under a fixed seed, so whatever it
initialises at random is the same in every run.
"""

import difflib
import importlib
import math
import os
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from .config import ModelConfig
from .errors import UsageError

_RESIZES = ("bilinear", "bicubic", "nearest")  # timm interpolations the preprocessing has
NO_WEIGHTS = "none"  # model.weights for random (seeded) weights
BUILD_SEED = 0  # every model is built under this seed
CONNECT_TIMEOUT_S = 3.0  # how long a download waits to learn the machine is offline


class ModelError(UsageError):
    """The model cannot be built or loaded; the message says what to change."""


@dataclass
class LoadedModel:
    """A ready model with what the run needs to know about it."""

    module: nn.Module
    name: str  # for summaries: "resnet50 (IMAGENET1K_V2)", "pkg.mod:fn + ckpt.pt"
    labels: list[str] | None
    transforms: Any | None  # the preprocessing preset (torchvision weights' or a TimmPreset), if any
    random_weights: bool = False  # weights = "none": the model was asked for with random weights


@dataclass(frozen=True)
class TimmPreset:
    """A timm model's pretrained preprocessing, in the terms of torchvision's presets."""

    resize_size: list[int]  # shorter side (or [h, w] when crop_mode is "squash")
    crop_size: list[int]  # [h, w]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


def load_model(config: ModelConfig, load_weights: bool = True) -> LoadedModel:
    """Build the model the config describes, load its weights, and put it in eval mode.

    With load_weights False only the architecture is built (for listing layers offline); the
    weights' preprocessing preset and labels are still used, as they need no download.
    """
    if config.arch and config.arch.startswith("timm:"):
        return _from_timm(config, load_weights)
    random = config.weights == NO_WEIGHTS
    weights = _weights(config) if config.arch and not random else None
    if config.factory:
        module = _seeded(lambda: _from_factory(config.factory))
        name = config.factory
    else:
        module = _from_torchvision(config, weights if load_weights else None)
        name = f"{config.arch} ({weights.name})" if weights is not None else config.arch
    if config.checkpoint and load_weights:
        load_checkpoint(module, config.checkpoint)
        name = f"{name} + {config.checkpoint.name}"
    elif random:
        name = f"{name} (random weights)"
    labels = read_labels(config.labels) if config.labels else None
    if labels is None and weights is not None:
        labels = list(weights.meta.get("categories") or []) or None
    return LoadedModel(
        module=module.eval(),
        name=name,
        labels=labels,
        transforms=weights.transforms() if weights is not None else None,
        random_weights=random and not config.checkpoint,
    )


def _seeded(build):
    """What `build()` returns, built under BUILD_SEED without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILD_SEED)
        return build()


def _weights(config: ModelConfig) -> Any:
    """The torchvision weights enum member the config names; unset: DEFAULT, unless a checkpoint is given."""
    if config.weights is None and config.checkpoint:
        return None
    name = config.weights or "DEFAULT"
    if config.arch not in torchvision.models.list_models(module=torchvision.models):
        return None  # _from_torchvision says what is wrong with the name
    available = torchvision.models.get_model_weights(config.arch)
    try:
        weights = available[name]
    except KeyError:
        names = ", ".join(w.name for w in available) or "none exist"
        if config.weights is None:
            raise ModelError(
                f"{config.arch} has no pretrained torchvision weights ({names}); set model.checkpoint "
                '(--checkpoint) to a state_dict, or model.weights = "none" (--weights none) for random '
                "weights"
            ) from None
        raise ModelError(
            f"model.weights = {config.weights!r} is not a weights name of {config.arch}; choose {names}, "
            'or "none" for random weights'
        ) from None
    categories = len(weights.meta.get("categories") or [])
    if (
        config.num_classes is not None
        and categories
        and config.num_classes != categories
        and not config.checkpoint
    ):
        raise ModelError(
            f"model.num_classes = {config.num_classes} does not fit {config.arch}'s {weights.name} weights "
            f'({categories} classes): set model.checkpoint (--checkpoint), or model.weights = "none"'
        )
    return weights


def _from_torchvision(config: ModelConfig, weights: Any) -> nn.Module:
    arch = config.arch
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(
            f"model.arch = {arch!r} is not a torchvision classification model (e.g. resnet50, vgg16)"
        )
    kwargs = {} if config.num_classes is None else {"num_classes": config.num_classes}
    download = weights is not None and not config.checkpoint
    if download:
        _offline_check(weights.url, f"torchvision weights {weights}")
    module = _seeded(lambda: torchvision.models.get_model(arch, weights=None, **kwargs))
    if download:
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            raise ModelError(
                f"cannot get torchvision weights {weights} ({reason}); "
                f"download {weights.url} elsewhere and set model.checkpoint (--checkpoint) to the file"
            ) from None
        _load_state(module, state, str(weights))
    return module


def _offline_check(url: str, what: str) -> None:
    """ModelError at once when `url` is not in torch's cache and its host cannot be reached."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if not os.path.exists(cached) and not reachable(urlparse(url).hostname or ""):
        raise ModelError(
            f"cannot download {what}: {urlparse(url).hostname} cannot be reached (offline?); download "
            f"{url} elsewhere and set model.checkpoint (--checkpoint) to the file, or model.weights = "
            '"none" (--weights none) for random weights'
        )


def reachable(host: str, port: int = 443) -> bool:
    """Whether a TCP connection to host:port opens within CONNECT_TIMEOUT_S (False when offline)."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") and host.endswith("huggingface.co"):
        return False
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _from_timm(config: ModelConfig, load_weights: bool) -> LoadedModel:
    """A timm model with its pretrained preprocessing: weights from the checkpoint, else the hub."""
    try:
        import timm
        from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config
    except ImportError:
        raise ModelError("timm models need timm: pip install 'hirescam-cli[timm]'") from None
    arch = config.arch.removeprefix("timm:")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"model.arch = {config.arch!r} is not a timm model{hint}")
    if config.weights not in (None, NO_WEIGHTS):
        raise ModelError(
            f'model.weights = {config.weights!r}: timm models take "none" (random weights) or a checkpoint; '
            "name a pretrained tag in the model name (timm:resnet50.a1_in1k)"
        )
    kwargs = {} if config.num_classes is None else {"num_classes": config.num_classes}
    random = config.weights == NO_WEIGHTS
    pretrained = load_weights and not config.checkpoint and not random
    if pretrained:
        kwargs |= _timm_source(arch)
    try:
        module = _seeded(lambda: timm.create_model(arch, pretrained=pretrained, **kwargs))
    except (OSError, RuntimeError, ValueError) as e:  # no cached file, a bad download
        if not pretrained:
            raise ModelError(f"cannot build timm model {arch}: {str(e).splitlines()[0][:160]}") from None
        raise ModelError(
            f"cannot get timm weights for {arch} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "download them elsewhere and set model.checkpoint (--checkpoint) to the file"
        ) from None
    name = config.arch
    if config.checkpoint and load_weights:
        load_checkpoint(module, config.checkpoint)
        name = f"{name} + {config.checkpoint.name}"
    elif random:
        name = f"{name} (random weights)"
    labels = read_labels(config.labels) if config.labels else None
    subset = infer_imagenet_subset(module) if labels is None else None
    if subset and ImageNetInfo(subset).num_classes() == module.num_classes:
        info = ImageNetInfo(subset)
        labels = [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]
    data = resolve_data_config({}, model=module)
    crop = list(data["input_size"][1:])
    scale = [math.floor(side / data["crop_pct"]) for side in crop]
    return LoadedModel(
        module=module.eval(),
        name=name,
        labels=labels,
        transforms=TimmPreset(
            resize_size=scale if data.get("crop_mode") == "squash" else [min(scale)],
            crop_size=crop,
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=data["interpolation"] if data["interpolation"] in _RESIZES else "bilinear",
        ),
        random_weights=random and not config.checkpoint,
    )


def _timm_source(arch: str) -> dict:
    """create_model arguments that load a timm model's pretrained weights from the local cache when
    they are there; {} to download them; a ModelError at once when uncached and the machine is offline."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        raise ModelError(
            f"timm model {arch} has no pretrained weights: set model.checkpoint (--checkpoint), or "
            'model.weights = "none" (--weights none) for random weights'
        )
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(cached, str):
                return {"pretrained_cfg_overlay": {"file": cached}}
        if not reachable("huggingface.co"):
            raise ModelError(
                f"cannot download timm weights for {arch}: huggingface.co cannot be reached (offline?) and "
                f"they are not in the local cache; download them elsewhere (hf download {cfg.hf_hub_id}) or "
                'set model.checkpoint (--checkpoint) to a state_dict, or model.weights = "none" '
                "(--weights none)"
            )
        return {}
    if cfg.url:
        _offline_check(cfg.url, f"timm weights for {arch}")
    return {}


def _from_factory(spec: str) -> nn.Module:
    """Import `package.module:callable` and call it; this runs code the config names."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise ModelError(f"model.factory: cannot import {module_name!r} ({e})") from None
    except AttributeError:
        raise ModelError(f"model.factory: {module_name!r} has no attribute {attr!r}") from None
    module = factory()
    if not isinstance(module, nn.Module):
        raise ModelError(f"model.factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def load_checkpoint(module: nn.Module, path: Path) -> None:
    """Load a state_dict saved with torch.save or as .safetensors, as data only: pickled code is refused."""
    if path.suffix == ".safetensors":
        _load_state(module, _read_safetensors(path), str(path))
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"checkpoint {path} does not exist") from None
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
            raise ModelError(
                f"checkpoint {path} is not plain tensor data (it holds pickled objects or code); "
                "refusing to load it: save model.state_dict() instead"
            ) from None
        raise ModelError(f"checkpoint {path} cannot be read: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise ModelError(f"checkpoint {path} cannot be read: {e.strerror or e}") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path} is not a state_dict (a mapping of names to tensors)")
    _load_state(module, state, str(path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (a format that holds only data)."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise ModelError(
            f"checkpoint {path} is .safetensors, which needs safetensors: pip install 'hirescam-cli[timm]'"
        ) from None
    try:
        return load_file(path, device="cpu")
    except FileNotFoundError:
        raise ModelError(f"checkpoint {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"checkpoint {path} cannot be read: {str(e).splitlines()[0][:160]}") from None


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = _mismatch(module, state)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise ModelError(f"weights {origin} do not fit the model: {'; '.join(parts)}")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise ModelError(
            f"weights {origin} do not fit the model: {detail[:200]} (check num_classes)"
        ) from None


def _mismatch(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(module.state_dict())
    return sorted(expected - set(state)), sorted(set(state) - expected)


def read_labels(path: Path) -> list[str]:
    """One label per line; blank lines at the end are ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read labels {path}: {e}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]
