"""MONAI networks (`monai:NAME`, e.g. monai:DenseNet121), built from `[model.kwargs]`: MONAI ships no
pretrained weights with them, so a checkpoint, or random weights asked for by name, is required."""

from torch import nn

from . import ModelError
from .common import NO_WEIGHTS, LoadedModel, seeded


def load(config, _load_weights: bool) -> LoadedModel:
    """The MONAI network `config.arch` built with the config's keyword arguments, under the fixed seed."""
    try:
        from monai.networks import nets
    except ImportError:
        raise ModelError("monai:NAME models need MONAI: pip install 'hirescam-cli[monai]'") from None
    name = config.arch.removeprefix("monai:")
    network = getattr(nets, name, None)
    if not (isinstance(network, type) and issubclass(network, nn.Module)):
        raise ModelError(
            f"model.arch = {config.arch!r} is not a network of monai.networks.nets (e.g. DenseNet121)"
        )
    if config.weights not in (None, NO_WEIGHTS):
        raise ModelError(
            f"model.weights = {config.weights!r}: MONAI networks take \"none\" (random weights) or "
            "model.checkpoint"
        )
    if config.weights is None and not config.checkpoint:
        raise ModelError(
            f"{config.arch} comes without pretrained weights: set model.checkpoint (--checkpoint) to a "
            'state_dict, or model.weights = "none" (--weights none) for random weights'
        )
    if config.num_classes is not None:
        raise ModelError(
            "model.num_classes: give a MONAI network its arguments in [model.kwargs] (out_channels)"
        )
    kwargs = dict(config.kwargs or {})
    try:
        module = seeded(lambda: network(**kwargs))
    except (TypeError, ValueError) as e:
        raise ModelError(
            f"cannot build {config.arch} from [model.kwargs] {kwargs}: {str(e).splitlines()[0]}"
        ) from None
    return LoadedModel(module, config.arch, None, None)
