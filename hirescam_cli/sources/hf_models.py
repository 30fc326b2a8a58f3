"""Hugging Face transformers image classifiers (`hf:PATH_OR_NAME`): a folder written by `save_pretrained`,
or a hub name found in the local cache (downloaded only when the hub can be reached and offline mode is
off), with the model's own image processor, labels and problem type.

Weights are data: safetensors only, unless `model.allow_pickle` lets pickled ones (pytorch_model.bin) in,
and those too are read as tensors only; a model that needs its own code (`trust_remote_code`) is refused.
The model is made to return its logits tensor, and told how many prefix tokens its token layers hold.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from . import ModelError
from .common import NO_WEIGHTS, LoadedModel, reachable, seeded

SAFE = ("model.safetensors", "model.safetensors.index.json")  # one file, or an index of shards
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PREFIX_TOKENS = ("cls_token", "distillation_token", "register_tokens")  # embeddings' (1, n, K) parameters
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's codes
SQUASH_FROM = 384  # ConvNeXt's processor: at this shortest edge and above, resize to a square, no crop


@dataclass(frozen=True)
class HfPreset:
    """An image processor's preprocessing, in the terms of torchvision's presets."""

    resize_size: list[int]  # [shorter side] or [h, w]
    crop_size: list[int] | None  # [h, w]; None: no crop
    mean: tuple[float, float, float]  # with the processor's rescale factor folded in
    std: tuple[float, float, float]
    interpolation: str
    crop_rounding: str = "floor"  # the processors' centre crop starts at floor(margin / 2)


def load(config, load_weights: bool) -> LoadedModel:
    """The classifier `config.arch` names, with its processor's preset, labels and problem type."""
    name = config.arch.removeprefix("hf:")
    pretrained = load_weights and not config.checkpoint and config.weights != NO_WEIGHTS
    folder = _folder(name, pretrained, config.allow_pickle)
    try:
        import transformers
    except ImportError:
        raise ModelError("Hugging Face models need transformers: pip install 'hirescam-cli[hf]'") from None
    transformers.logging.set_verbosity_error()  # one line per problem, from us
    transformers.utils.logging.disable_progress_bar()
    hf_config = _config(transformers, folder, name)
    if config.num_classes is not None and config.num_classes != hf_config.num_labels:
        if pretrained:
            raise ModelError(
                f"model.num_classes = {config.num_classes} does not fit hf:{name} ({hf_config.num_labels} "
                'labels): set model.checkpoint (--checkpoint), or model.weights = "none"'
            )
        hf_config.num_labels = config.num_classes
    auto = transformers.AutoModelForImageClassification
    safe = _weights(folder, name, config.allow_pickle) if pretrained else True
    try:
        if pretrained:
            module, info = seeded(
                lambda: auto.from_pretrained(
                    folder,
                    config=hf_config,
                    trust_remote_code=False,
                    local_files_only=True,
                    use_safetensors=safe,
                    dtype="float32",
                    output_loading_info=True,
                )
            )
        else:
            module, info = seeded(lambda: auto.from_config(hf_config, trust_remote_code=False)), {}
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelError(f"cannot build hf:{name}: {_first_line(e)}") from None
    _check_loaded(info, name)
    return LoadedModel(
        module=logits_only(module),
        name=f"hf:{name}",
        labels=labels_of(hf_config.id2label, hf_config.num_labels),
        transforms=_processor_preset(transformers, folder, name),
        multilabel=hf_config.problem_type == "multi_label_classification",
    )


def logits_only(model: nn.Module) -> nn.Module:
    """The model, made to return its (B, C) logits tensor instead of an output object, and given its
    prefix-token count (`num_prefix_tokens`, as timm's models have it) for reading its token layers.

    Its module names and state_dict stay the Hugging Face ones: `vit.layers.11.layernorm_before`.
    """
    model.register_forward_hook(_logits)
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    if isinstance(embeddings, nn.Module):
        tokens = dict(embeddings.named_parameters(recurse=False))
        model.num_prefix_tokens = sum(tokens[n].shape[-2] for n in PREFIX_TOKENS if n in tokens)
    return model


def _logits(_module: nn.Module, _inputs: object, output: object) -> Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def labels_of(id2label: dict, count: int) -> list[str] | None:
    """Class names from a config's id2label; a placeholder LABEL_n is shown as its id n (None: all are)."""
    names = [str(id2label.get(i, i)) for i in range(count)]
    labels = [str(i) if label == f"LABEL_{i}" else label for i, label in enumerate(names)]
    return None if labels == [str(i) for i in range(count)] else labels


def _folder(name: str, weights: bool, pickled: bool) -> Path:
    """The local folder of `name`: itself, or its snapshot in the hub cache (downloaded when online)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.startswith((".", "/", "~")) or path.exists():
        raise ModelError(f"model.arch = 'hf:{name}': no such folder (a folder written by save_pretrained)")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:
        raise ModelError("Hugging Face models need transformers: pip install 'hirescam-cli[hf]'") from None
    patterns = ["*.json"]
    if weights:
        patterns += ["model*.safetensors"] + (["pytorch_model*.bin"] if pickled else [])
    try:
        cached = Path(snapshot_download(name, local_files_only=True, allow_patterns=patterns))
    except HFValidationError:
        raise ModelError(f"model.arch = 'hf:{name}' is neither a folder nor a hub name (org/name)") from None
    except OSError:  # not in the cache (LocalEntryNotFoundError)
        cached = None
    if cached is not None and (cached / "config.json").is_file() and (not weights or _has_weights(cached)):
        return cached
    host = constants.ENDPOINT.split("://")[-1].split("/")[0]
    if constants.HF_HUB_OFFLINE or not reachable(host):
        why = (
            "offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else f"{host} cannot be reached"
        )
        raise ModelError(
            f"cannot get Hugging Face model {name}: it is not in the local cache ({constants.HF_HUB_CACHE}) "
            f"and {why}; download it elsewhere (hf download {name}) into that cache, or give a folder "
            "written by save_pretrained (--model hf:PATH)"
        )
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # gated, missing, a network error (the hub's kinds vary): one line, whatever it is
        raise ModelError(f"cannot download Hugging Face model {name}: {_first_line(e)}") from None


def _check_loaded(info: dict, name: str) -> None:
    """A ModelError when the weights left parameters at their random start (a checkpoint without a
    classifier head, say) or did not fit them: random weights are never an accident."""
    missing = sorted(info.get("missing_keys", ())) + sorted(info.get("mismatched_keys", ()))
    if missing:
        listed = ", ".join(map(str, missing[:3])) + (" ..." if len(missing) > 3 else "")
        raise ModelError(
            f"the weights of hf:{name} do not cover the classifier it builds (missing or mismatched: "
            f"{listed}): use a fine-tuned image classification checkpoint, set model.checkpoint "
            '(--checkpoint), or model.weights = "none" (--weights none) for random weights'
        )


def _has_weights(folder: Path) -> bool:
    return any((folder / file).is_file() for file in SAFE + PICKLED)


def _weights(folder: Path, name: str, pickled: bool) -> bool:
    """True: load the safetensors weights; False: the pickled ones, as the config allows; else ModelError."""
    if any((folder / file).is_file() for file in SAFE):
        return True
    if not any((folder / file).is_file() for file in PICKLED):
        raise ModelError(
            f"hf:{name} has no weights (model.safetensors): set model.checkpoint (--checkpoint), or "
            'model.weights = "none" (--weights none) for random weights'
        )
    if not pickled:
        raise ModelError(
            f"hf:{name} has pickled weights only (pytorch_model.bin): refused; convert them to safetensors, "
            "or set model.allow_pickle = true (--allow-pickle) to read them (as tensors only)"
        )
    return False


def _config(transformers, folder: Path, name: str):
    """The model's config; a ModelError for one that needs remote code or no image classifier fits."""
    try:
        remote = "auto_map" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ModelError(f"cannot read the config of hf:{name}: {_first_line(e)}") from None
    if remote:
        raise ModelError(f"hf:{name} needs its own code (trust_remote_code), which hirescam never runs")
    try:
        return transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot read the config of hf:{name}: {_first_line(e)}") from None


def _processor_preset(transformers, folder: Path, name: str) -> HfPreset | None:
    """The image processor's preprocessing; None when the model has none (the defaults apply)."""
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(
            folder, trust_remote_code=False, local_files_only=True
        )
    except (OSError, ValueError, KeyError):
        return None
    return preset_of(processor, name)


def preset_of(processor, name: str) -> HfPreset:
    """An image processor's resize, crop, rescale, mean/std and resampling as a preset.

    Sizes are the shortest edge or height/width; ConvNeXt's processor (also ResNet's) resizes the
    shortest edge to size / crop_pct and crops size x size, or squashes to size x size from 384 up. A
    processor that resizes otherwise is refused with the keys to set.
    """
    size, crop = processor.size, getattr(processor, "crop_size", None)
    centre = bool(getattr(processor, "do_center_crop", False)) and crop is not None
    convnext = type(processor).__name__ == "ConvNextImageProcessor"
    fix = "set preprocess.resize and preprocess.crop"
    if not getattr(processor, "do_resize", True) or size is None:
        raise ModelError(f"the image processor of hf:{name} does not resize to a fixed size: {fix}")
    if convnext and size.shortest_edge and not centre:
        edge = size.shortest_edge
        squash = edge >= SQUASH_FROM
        resize = [edge, edge] if squash else [int(edge / processor.crop_pct)]
        crop = None if squash else [edge, edge]
    elif getattr(processor, "crop_pct", None) is not None or convnext:
        raise ModelError(
            f"the image processor of hf:{name} ({type(processor).__name__}) crops its own way: {fix}"
        )
    elif size.height and size.width:
        resize, crop = [size.height, size.width], [crop.height, crop.width] if centre else None
    elif size.shortest_edge and not size.longest_edge:
        resize, crop = [size.shortest_edge], [crop.height, crop.width] if centre else None
    else:
        raise ModelError(f"the image processor of hf:{name} resizes to {_given(size)}: {fix}")
    scale = 255 * (processor.rescale_factor if processor.do_rescale else 1.0)
    mean, std = (processor.image_mean, processor.image_std) if processor.do_normalize else (0.0, 1.0)
    mean, std = (_triple(v) for v in (mean, std))
    return HfPreset(
        resize_size=resize,
        crop_size=crop,
        mean=tuple(m / scale for m in mean),
        std=tuple(s / scale for s in std),
        interpolation=RESAMPLE.get(int(processor.resample), str(processor.resample)),
    )


def _given(size) -> dict:
    """The keys a processor's size sets (its SizeDict lists every key, most of them None)."""
    return {key: value for key, value in vars(size).items() if value is not None}


def _triple(value) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    return (values[0], values[1], values[2])


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]
