"""torchvision classification models by name: DEFAULT weights unless the config names others, or
"none" for random ones; the weights' preprocessing preset and labels come along."""

from typing import Any

import torchvision
from torch import nn

from . import ModelError
from .checkpoint import load_state
from .common import NO_WEIGHTS, LoadedModel, offline_check, seeded


def load(config, load_weights: bool) -> LoadedModel:
    """The torchvision model `config.arch`, with its pretrained weights when they are wanted."""
    weights = _weights(config) if config.weights != NO_WEIGHTS else None
    module = _build(config, weights if load_weights else None)
    name = f"{config.arch} ({weights.name})" if weights is not None else config.arch
    labels = list(weights.meta.get("categories") or []) or None if weights is not None else None
    return LoadedModel(module, name, labels, weights.transforms() if weights is not None else None)


def _weights(config) -> Any:
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


def _build(config, weights: Any) -> nn.Module:
    arch = config.arch
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(
            f"model.arch = {arch!r} is not a torchvision classification model (e.g. resnet50, vgg16)"
        )
    kwargs = {} if config.num_classes is None else {"num_classes": config.num_classes}
    download = weights is not None and not config.checkpoint
    if download:
        offline_check(weights.url, f"torchvision weights {weights}")
    module = seeded(lambda: torchvision.models.get_model(arch, weights=None, **kwargs))
    if download:
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            raise ModelError(
                f"cannot get torchvision weights {weights} ({reason}); "
                f"download {weights.url} elsewhere and set model.checkpoint (--checkpoint) to the file"
            ) from None
        load_state(module, state, str(weights))
    return module
