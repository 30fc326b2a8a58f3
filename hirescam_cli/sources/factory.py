"""`model.factory = "package.module:callable"`: import it and call it (this runs code the config names)."""

import importlib

from torch import nn

from . import ModelError
from .common import LoadedModel, seeded


def load(config, _load_weights: bool) -> LoadedModel:
    """The module the factory returns, built under the fixed seed; its weights are its own business."""
    return LoadedModel(seeded(lambda: _call(config.factory, config.kwargs or {})), config.factory, None, None)


def _call(spec: str, kwargs: dict) -> nn.Module:
    """Import `package.module:callable` and call it with `kwargs` ([model.kwargs]); this runs code the config
    names."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise ModelError(f"model.factory: cannot import {module_name!r} ({e})") from None
    except AttributeError:
        raise ModelError(f"model.factory: {module_name!r} has no attribute {attr!r}") from None
    module = factory(**kwargs)
    if not isinstance(module, nn.Module):
        raise ModelError(f"model.factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module
