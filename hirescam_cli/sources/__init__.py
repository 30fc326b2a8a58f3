"""Model sources: where a model comes from, one file per hub and one dispatch on model.arch's prefix.

    resnet50            torchvision_models.py  (a torchvision classification model and its weights)
    timm:NAME           timm_models.py
    monai:NAME          monai_models.py        (a MONAI network built from [model.kwargs])
    hf:PATH_OR_NAME     hf_models.py           (a Hugging Face transformers image classifier)
    factory = "m:fn"    factory.py             (a callable that returns an nn.Module: runs that code)
    checkpoint = FILE   checkpoint.py          (a state_dict loaded as data, whatever the source)

A new hub is one file here with a `load(config, load_weights) -> LoadedModel` and one line in
SOURCES. Importing this package loads no torch, so the command line can tell a hub prefix from a
factory quickly.
"""

import importlib

from ..errors import UsageError

# model.arch prefix -> the module of this package that builds it
SOURCES = {"timm": "timm_models", "monai": "monai_models", "hf": "hf_models"}
DEFAULT = "torchvision_models"  # model.arch without a prefix


class ModelError(UsageError):
    """The model cannot be built or loaded; the message says what to change."""


def has_source_prefix(name: str) -> bool:
    """Whether `name` (a --model value) starts with a hub prefix such as timm:."""
    prefix, colon, _ = name.partition(":")
    return bool(colon) and prefix in SOURCES


def load_model(config, load_weights: bool = True):
    """Build the model the config describes, load its weights, and put it in eval mode; a LoadedModel.

    With load_weights False only the architecture is built (for listing layers offline); the
    weights' preprocessing preset and labels are still used, as they need no download.
    """
    from .common import finish

    if config.factory:
        name = "factory"
    else:
        prefix, colon, _ = config.arch.partition(":")
        name = SOURCES[prefix] if colon and prefix in SOURCES else DEFAULT
    source = importlib.import_module(f"{__name__}.{name}")
    return finish(source.load(config, load_weights), config, load_weights)
