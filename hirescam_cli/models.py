"""Model sources: a torchvision name (+ weights), a checkpoint, or a "module:callable" factory."""

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from .config import ModelConfig


class ModelError(ValueError):
    """The model cannot be built or loaded; the message says what to change."""


@dataclass
class LoadedModel:
    """A ready model with what the run needs to know about it."""

    module: nn.Module
    name: str  # for summaries: "resnet50 (IMAGENET1K_V2)", "pkg.mod:fn + ckpt.pt"
    labels: list[str] | None
    transforms: Any | None  # torchvision's preprocessing preset of the weights, if any


def load_model(config: ModelConfig, load_weights: bool = True) -> LoadedModel:
    """Build the model the config describes, load its weights, and put it in eval mode.

    With load_weights False only the architecture is built (for listing layers offline); the
    weights' preprocessing preset and labels are still used, as they need no download.
    """
    weights = _weights(config) if config.weights else None
    if config.factory:
        module = _from_factory(config.factory)
        name = config.factory
    else:
        module = _from_torchvision(config, weights if load_weights else None)
        name = config.arch if weights is None else f"{config.arch} ({config.weights})"
    if config.checkpoint and load_weights:
        load_checkpoint(module, config.checkpoint)
        name = f"{name} + {config.checkpoint.name}"
    labels = read_labels(config.labels) if config.labels else None
    if labels is None and weights is not None:
        labels = list(weights.meta.get("categories") or []) or None
    return LoadedModel(
        module=module.eval(),
        name=name,
        labels=labels,
        transforms=weights.transforms() if weights is not None else None,
    )


def _weights(config: ModelConfig) -> Any:
    """The torchvision weights enum member named by the config."""
    if not config.arch:
        raise ModelError("model.weights needs model.arch")
    try:
        return torchvision.models.get_model_weights(config.arch)[config.weights]
    except KeyError:
        names = ", ".join(w.name for w in torchvision.models.get_model_weights(config.arch))
        raise ModelError(
            f"model.weights = {config.weights!r} is not a weights name of {config.arch}; choose {names}"
        ) from None


def _from_torchvision(config: ModelConfig, weights: Any) -> nn.Module:
    arch = config.arch
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(
            f"model.arch = {arch!r} is not a torchvision classification model (e.g. resnet50, vgg16)"
        )
    kwargs = {} if config.num_classes is None else {"num_classes": config.num_classes}
    module = torchvision.models.get_model(arch, weights=None, **kwargs)
    if weights is not None and not config.checkpoint:
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            raise ModelError(
                f"cannot get torchvision weights {weights} ({reason}); "
                "when offline, download them elsewhere and set model.checkpoint (--checkpoint) to the file"
            ) from None
        _load_state(module, state, str(weights))
    return module


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
    """Load a state_dict saved with torch.save, as data only: pickled code is refused."""
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
