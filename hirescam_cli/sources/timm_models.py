"""timm models (`timm:NAME`): pretrained unless the config says "none", from the local cache when they
are there, with timm's own preprocessing and ImageNet labels."""

import difflib
import math
from dataclasses import dataclass

from . import ModelError
from .common import NO_WEIGHTS, LoadedModel, offline_check, reachable, seeded

RESIZES = ("bilinear", "bicubic", "nearest")  # timm interpolations the preprocessing has


@dataclass(frozen=True)
class TimmPreset:
    """A timm model's pretrained preprocessing, in the terms of torchvision's presets."""

    resize_size: list[int]  # shorter side (or [h, w] when crop_mode is "squash")
    crop_size: list[int]  # [h, w]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


def load(config, load_weights: bool) -> LoadedModel:
    """The timm model `config.arch` with its preprocessing preset, pretrained when weights are wanted."""
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
    pretrained = load_weights and not config.checkpoint and config.weights != NO_WEIGHTS
    if pretrained:
        kwargs |= _timm_source(arch)
    try:
        module = seeded(lambda: timm.create_model(arch, pretrained=pretrained, **kwargs))
    except (OSError, RuntimeError, ValueError) as e:  # no cached file, a bad download
        if not pretrained:
            raise ModelError(f"cannot build timm model {arch}: {str(e).splitlines()[0][:160]}") from None
        raise ModelError(
            f"cannot get timm weights for {arch} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "download them elsewhere and set model.checkpoint (--checkpoint) to the file"
        ) from None
    labels = None
    subset = infer_imagenet_subset(module) if config.labels is None else None
    if subset and ImageNetInfo(subset).num_classes() == module.num_classes:
        info = ImageNetInfo(subset)
        labels = [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]
    data = resolve_data_config({}, model=module)
    crop = list(data["input_size"][1:])
    scale = [math.floor(side / data["crop_pct"]) for side in crop]
    return LoadedModel(
        module=module,
        name=config.arch,
        labels=labels,
        transforms=TimmPreset(
            resize_size=scale if data.get("crop_mode") == "squash" else [min(scale)],
            crop_size=crop,
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=data["interpolation"] if data["interpolation"] in RESIZES else "bilinear",
        ),
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
        offline_check(cfg.url, f"timm weights for {arch}")
    return {}
