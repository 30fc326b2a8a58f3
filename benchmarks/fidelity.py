"""Cost per image of the fidelity eval (maps + layer occlusion + metrics), in plain inference forwards.

    python benchmarks/fidelity.py [--models resnet50:layer4 vgg16:features.29] [--batch 4] [--rounds 3]

Random weights, 224x224. Each round times every variant once, in turn, so that drift in the
machine's load hits all of them alike; the table reports the median over rounds. The goal is at
most (grid positions / 16) forwards per image: the occluded copies share one pass below the layer.
"""

import argparse

import torch
import torchvision
from timing import interleaved

from hirescam_cli import METHODS, Explainer
from hirescam_cli.metrics import fidelity


def bench(arch: str, layer: str, batch: int, rounds: int, device: torch.device) -> None:
    """Print one model's table."""
    model = torchvision.models.get_model(arch).to(device).eval()
    x = torch.randn(batch, 3, 224, 224, device=device)

    def plain():
        with torch.inference_mode():
            model(x)

    with Explainer(model, layer) as explainer:
        result = explainer(x, methods=tuple(METHODS))

        def maps():
            return explainer(x, methods=tuple(METHODS))

        def occlusion():
            return explainer.occlusion(x, result.classes)

        def whole():
            explained = explainer(x, methods=tuple(METHODS))
            delta = explainer.occlusion(x, explained.classes)[:, 0]
            for values in explained.maps.values():
                fidelity(values[:, 0], delta)

        calls = {"plain inference forward": plain, "maps (six methods)": maps, "occlusion": occlusion}
        calls["fidelity eval (all of it)"] = whole
        times = interleaved(calls, rounds, device, batch)
        cells = result.maps["hirescam"].shape[-2] * result.maps["hirescam"].shape[-1]
        path = (
            "one larger batch after the layer" if explainer.occlusion_batched else "input repeated (fallback)"
        )
    base = times["plain inference forward"]
    print(f"\n{arch} at {layer}: {cells} positions, occlusion through {path}")
    print(f"batch {batch}, {device}, median of {rounds} rounds")
    print(f"goal: at most {cells / 16:.2f} forwards per image")
    print(f"{'variant':28s} {'s/image':>9s} {'forwards':>9s}")
    for name, median in times.items():
        print(f"{name:28s} {median:9.4f} {median / base:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50:layer4", "vgg16:features.29"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    for spec in args.models:
        arch, layer = spec.split(":")
        bench(arch, layer, args.batch, args.rounds, torch.device(args.device))


if __name__ == "__main__":
    main()
