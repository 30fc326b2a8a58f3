"""Seconds per image of the Explainer against a plain inference forward, measured interleaved.

    python benchmarks/engine.py [--models resnet50 vgg16 vit_b_16 swin_t hf:vit hf:convnext] [--batch 8]
        [--rounds 5]

Random weights, 224x224, the layer `auto` picks (a token layer for vit_b_16, channels-last
stages then the final map for swin_t). A model is a torchvision name, a timm name (one torchvision
does not know: deit_base_distilled_patch16_224, vit_base_patch16_224, ...), or hf:TYPE, a Hugging Face
transformers classifier built from its config's defaults with 1000 classes (hf:vit is ViT-B/16, hf:convnext
ConvNeXt-T), or hf:FOLDER (a save_pretrained folder, with random weights). Each round times every variant
once, in turn, so that drift in the machine's load hits all of them alike; the table reports the median
over rounds.
"""

import argparse
from pathlib import Path

import timm
import torch
import torchvision
from timing import interleaved

from hirescam_cli import METHODS, Explainer
from hirescam_cli.config import ModelConfig
from hirescam_cli.sources import load_model

VARIANTS = {
    "hirescam+gradcam top-1": (("hirescam", "gradcam"), 1),
    "all six methods top-1": (tuple(METHODS), 1),
    "hirescam+gradcam top-5": (("hirescam", "gradcam"), 5),
}


def bench(arch: str, batch: int, rounds: int, device: torch.device) -> None:
    """Print one model's table."""
    model = build(arch).to(device).eval()
    x = torch.randn(batch, 3, 224, 224, device=device)

    def plain():
        with torch.inference_mode():
            model(x)

    with Explainer(model) as explainer:
        calls = {"plain inference forward": plain}
        for name, (methods, k) in VARIANTS.items():
            calls[name] = lambda m=methods, k=k: explainer(x, methods=m, top_k=k)
        times = interleaved(calls, rounds, device, batch)
        layer, layout = explainer.target_layer, explainer.layout(x)
        cut = explainer.rows.of(x)
    base = times["plain inference forward"]
    print(f"\n{arch} (target layer {layer}, {layout}, batch {batch}, {device}, median of {rounds})")
    if cut.modules:
        print(f"backward over the first {cut.keep} rows only after the layer: {', '.join(cut.modules)}")
    print(f"{'variant':28s} {'s/image':>9s} {'ratio':>7s}")
    for name, median in times.items():
        print(f"{name:28s} {median:9.4f} {median / base:6.3f}x")


def build(arch: str) -> torch.nn.Module:
    """A model with random weights: a torchvision name, a timm name, hf:TYPE or hf:FOLDER."""
    name = arch.removeprefix("hf:")
    if name == arch:
        if arch in torchvision.models.list_models():
            return torchvision.models.get_model(arch)
        return timm.create_model(arch, pretrained=False)
    if Path(name).is_dir():
        return load_model(ModelConfig(arch=arch, weights="none")).module
    from transformers import AutoConfig, AutoModelForImageClassification

    from hirescam_cli.sources.hf_models import logits_only

    config = AutoConfig.for_model(name, num_labels=1000)
    return logits_only(AutoModelForImageClassification.from_config(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16", "vit_b_16", "swin_t"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    for arch in args.models:
        bench(arch, args.batch, args.rounds, torch.device(args.device))


if __name__ == "__main__":
    main()
