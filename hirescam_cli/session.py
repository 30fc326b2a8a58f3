"""What explain, eval and layers share, built once: the device, the resources, the model, the modality,
the classes to explain, and an Explainer already checked on a probe input, so that a bad layer, class or
model fails with one line before anything is written."""

import difflib
import hashlib
import json
import platform
from dataclasses import dataclass
from typing import Any

import torch
import torchvision

from . import __version__
from .config import Config, ConfigError
from .distributed import Job
from .engine import Explainer, Explanation
from .engine.layouts import layout_spec
from .modalities import open_modality
from .resources import Resources, keep_freed_heap
from .resources import choose as choose_resources
from .sources import load_model
from .sources.common import LoadedModel
from .summary import SCHEMA


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """'auto' -> cuda, then mps, then cpu; an explicit device that is absent is a config error.

    Under torchrun (`local_rank` set), "auto" and "cuda" mean this process's GPU, cuda:LOCAL_RANK.
    """
    if local_rank is not None and name in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices: "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        return torch.device("cuda", local_rank)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"explain.device = {name!r} but CUDA is not available here; use cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"explain.device = {name!r} but only {torch.cuda.device_count()} CUDA devices exist"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("explain.device = 'mps' but MPS is not available here; use cpu or auto")
    return device


def class_ids(classes: tuple[int | str, ...] | None, labels: list[str] | None) -> list[int] | None:
    """Class ids from ids or label names."""
    if classes is None:
        return None
    ids = []
    for value in classes:
        if isinstance(value, int):
            ids.append(value)
        elif value.isdigit():
            ids.append(int(value))
        elif labels and value in labels:
            ids.append(labels.index(value))
        else:
            close = difflib.get_close_matches(value, labels or [], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (no labels are known; use class ids)"
            raise ConfigError(f"explain.classes: unknown label {value!r}{hint}")
    return list(dict.fromkeys(ids))


def check_rank(model: torch.nn.Module, modality: Any, kind: str) -> None:
    """A ConfigError when the model's first convolution takes inputs of another rank than the modality's
    (a volume network given pictures, or the reverse)."""
    first = next(
        ((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None
    )
    if first is None:
        return
    name, conv = first
    rank, given = len(conv.kernel_size), len(modality.input_shape()) - 1
    if rank != given:
        raise ConfigError(
            f"the model is a {rank}-D network (its first convolution {name!r} is {type(conv).__name__}) but "
            f"input.kind = {kind!r} gives it {given}-D inputs: set [input] kind to the kind of its inputs"
        )


@dataclass
class Session:
    """A configured model ready to explain inputs of its modality on its device."""

    config: Config
    job: Job
    device: torch.device
    resources: Resources
    loaded: LoadedModel
    modality: Any  # a modality (hirescam_cli.modalities)
    classes: list[int] | None  # explain.classes as ids (None: top-k or threshold)
    multilabel: bool  # sigmoid outputs: model.multilabel, else what the model says (hf's problem_type)
    explainer: Explainer | None = None

    @classmethod
    def open(
        cls,
        config: Config,
        job: Job | None = None,
        device: torch.device | None = None,
        load_weights: bool = True,
        explainer: bool = True,
        pictures: bool = True,
    ) -> "Session":
        """Build everything the config describes; ConfigError (one line) for what cannot work.

        `load_weights` False builds the architecture only (listing layers offline); `explainer` False opens
        no Explainer; `pictures` False draws no pictures (an eval).
        """
        job = job or Job()
        device = device or pick_device(config.explain.device, job.local_rank)
        explain = config.explain
        resources = choose_resources(device, explain.workers, explain.batch_size, job.local_world)
        torch.set_num_threads(resources.threads)
        keep_freed_heap()
        loaded = load_model(config.model, load_weights)
        modality = open_modality(config, loaded.transforms, pictures).for_device(device)
        classes = class_ids(explain.classes, loaded.labels)
        multilabel = loaded.multilabel if config.model.multilabel is None else config.model.multilabel
        if explain.threshold is not None and not multilabel:
            raise ConfigError("explain.threshold needs model.multilabel = true (sigmoid outputs)")
        check_rank(loaded.module, modality, config.input.kind)
        session = cls(config, job, device, resources, loaded, modality, classes, multilabel)
        loaded.module.to(device)
        if explainer:
            session.explainer = session._checked_explainer()
        return session

    def probe(self) -> torch.Tensor:
        """A blank model input (batch of 1) on the device."""
        return torch.zeros((1, *self.modality.input_shape()), device=self.device)

    def selection(self) -> dict[str, Any]:
        """How the config picks the classes to explain: {"threshold": t}, {"classes": ids} or {"top_k": k}."""
        explain = self.config.explain
        if explain.threshold is not None:
            return {"threshold": explain.threshold}
        if self.classes is not None:
            return {"classes": self.classes}
        return {"top_k": explain.top_k}

    def explain(self, x: torch.Tensor) -> Explanation:
        """The configured methods' maps of the configured classes of a batch."""
        with torch.enable_grad():
            return self.explainer(x, methods=self.config.explain.methods, **self.selection())

    def fingerprint(self) -> str:
        """What the outputs depend on: the config (less speed knobs), the weights, the package version."""
        settings = self.config.to_dict()
        for key in ("batch_size", "workers", "device"):
            settings["explain"].pop(key)
        settings["model"].pop("checkpoint")  # the weights' content counts, not the file's name
        settings["output"].pop("sink")  # where the outputs go, not what they are
        settings["preprocess_effective"] = [str(self.modality)]
        digest = hashlib.sha256(json.dumps([SCHEMA, __version__, settings], sort_keys=True).encode())
        for name, tensor in sorted(self.loaded.module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        """The run's facts for run.json: config, model, layer and layout, device, versions, resources."""
        layout = self.explainer.layout(self.probe()) if self.explainer is not None else None
        return {
            "version": __version__,
            "config": self.config.to_dict(),
            "config_file": str(self.config.source) if self.config.source else None,
            "preprocess": str(self.modality),
            "model": self.loaded.name,
            "target_layer": self.explainer.target_layer if self.explainer is not None else None,
            "layout": layout.to_dict() if layout is not None else None,
            "random_weights": self.loaded.random_weights,
            "device": str(self.device),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
            },
            "resources": {
                **self.resources.to_dict(),
                "processes": self.job.world,
                "heap_kept": keep_freed_heap(),  # bytes, or None: glibc's defaults
            },
        }

    def close(self) -> None:
        """Give the model back as it was (parameter flags, training mode)."""
        if self.explainer is not None:
            self.explainer.close()

    def _checked_explainer(self) -> Explainer:
        """An Explainer already run on a probe input, so a bad layer or class fails before OUT is touched."""
        config = self.config
        explainer = None
        try:
            spec = layout_spec(config.model)
            explainer = Explainer(
                self.loaded.module, config.model.target_layer, amp=config.explain.amp, layout=spec
            )
            self.explainer = explainer
            self.explain(self.probe())
        except (ValueError, RuntimeError) as e:
            if explainer is not None:
                explainer.close()
            self.explainer = None
            if isinstance(e, RuntimeError):
                shape = "x".join(map(str, self.modality.input_shape()))
                reason = str(e).splitlines()[0]
                raise ConfigError(f"the model cannot take inputs of {shape}: {reason}") from None
            raise ConfigError(str(e)) from None
        return explainer
