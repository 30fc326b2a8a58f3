"""What every model source shares: the loaded model's description, seeded building, the offline check,
and the finishing steps (a checkpoint, labels, eval mode).

Weights are a choice, never an accident: a torchvision, timm or Hugging Face model without a checkpoint
gets its pretrained weights (from the local cache, else downloaded when online), random weights only when the
config says `weights = "none"`, and every model is built under a fixed seed, so whatever it
initialises at random is the same in every run.
"""

import dataclasses
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from . import ModelError
from .checkpoint import load_checkpoint

NO_WEIGHTS = "none"  # model.weights for random (seeded) weights
BUILD_SEED = 0  # every model is built under this seed
CONNECT_TIMEOUT_S = 3.0  # how long a download waits to learn the machine is offline


@dataclass
class LoadedModel:
    """A ready model with what the run needs to know about it."""

    module: nn.Module
    name: str  # for summaries: "resnet50 (IMAGENET1K_V2)", "pkg.mod:fn + ckpt.pt"
    labels: list[str] | None
    transforms: Any | None  # the preprocessing preset (torchvision weights', a TimmPreset, an HfPreset)
    random_weights: bool = False  # weights = "none": the model was asked for with random weights
    multilabel: bool = False  # the model says its outputs are sigmoids (a Hugging Face problem_type)


def finish(loaded: LoadedModel, config, load_weights: bool) -> LoadedModel:
    """A source's model with the config's checkpoint and labels, named for the summaries, in eval mode."""
    name, random = loaded.name, config.weights == NO_WEIGHTS
    if config.checkpoint and load_weights:
        load_checkpoint(loaded.module, config.checkpoint)
        name = f"{name} + {config.checkpoint.name}"
    elif random:
        name = f"{name} (random weights)"
    labels = read_labels(config.labels) if config.labels else loaded.labels
    random = random and not config.checkpoint
    return dataclasses.replace(
        loaded, module=loaded.module.eval(), name=name, labels=labels, random_weights=random
    )


def seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """What `build()` returns, built under BUILD_SEED without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILD_SEED)
        return build()


def offline_check(url: str, what: str) -> None:
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


def read_labels(path: Path) -> list[str]:
    """One label per line; blank lines at the end are ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read labels {path}: {e}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]
