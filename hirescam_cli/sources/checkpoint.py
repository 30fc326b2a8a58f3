"""Checkpoints are data, not code: a state_dict from torch.save (read with weights_only=True) or a
.safetensors file, loaded into any source's model."""

import pickle
from pathlib import Path

import torch
from torch import nn

from . import ModelError


def load_checkpoint(module: nn.Module, path: Path) -> None:
    """Load a state_dict saved with torch.save or as .safetensors, as data only: pickled code is refused."""
    if path.suffix == ".safetensors":
        load_state(module, _read_safetensors(path), str(path))
        return
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
    load_state(module, state, str(path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (a format that holds only data)."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise ModelError(
            f"checkpoint {path} is .safetensors, which needs safetensors: pip install 'hirescam-cli[timm]'"
        ) from None
    try:
        return load_file(path, device="cpu")
    except FileNotFoundError:
        raise ModelError(f"checkpoint {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"checkpoint {path} cannot be read: {str(e).splitlines()[0][:160]}") from None


def load_state(module: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
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
