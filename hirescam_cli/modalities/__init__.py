"""Modalities: what one kind of input needs, in one place, so the run never branches on the kind.

A modality is a class with
    kind                            its name, as `[input] kind` in the config
    from_config(config, transforms, pictures)   the one the config asks for (transforms: the model's
                                    preprocessing preset, or None)
    input_shape() -> (C, *spatial)  every model input's shape (for probes)
    max_bytes() -> int              the largest file worth reading
    for_device(device) -> modality  the one the loader's workers run for batches bound to `device`
    load(data) -> (input, view)     decode and preprocess one file's bytes, keeping the geometry in the
                                    view; an InputFailure for a bad file (runs in the loader's workers,
                                    so the object must pickle). The input may be None: the view then
                                    holds what `finish` decodes on the device
    collate(views) -> views         a batch's views together
    finish(batch, device) -> batch  in the main process: what the workers left decoded on the device
                                    (stacked into batch.inputs there), a file that fails there failed
    describe(views, row) -> dict    the summary fields of one input (its size, its pictures')
    locate(maps, views) -> Tensor   the peak of each (B, T, *grid) map in the input's own coordinates
    to_original(maps, views, rows) -> (maps, pixels)   maps (N, *grid) registered onto the inputs of
                                    batch rows `rows`, on their own pixels (voxels), as the pictures are:
                                    (N, *largest) with NaN where the model input does not cover the input,
                                    and bool (N, *largest) marking each input's own extent (eval's
                                    localisation is scored there, against masks of the input's size)
    renderer(config, device)        what turns a batch's maps into pictures on the input, in parts
a torch-free module of its files with `accepts(name) -> bool` for folder walks, and a torch-free module of
its geometry for `hirescam compare`, reading where maps lie from the summary fields `describe` wrote:
    footing(base, new) -> Footing | None    the common footing of two summaries of one input (None: their
                                    maps share no part of it; ValueError: a summary lacks the geometry),
                                    whose `sample(side, grid)` reads a side's map (its grid shape) there
    peak_distance(base, peak, new, peak) -> float   how far apart two peaks lie, in the input's units
    FOOTING                         one line saying what the footing is (compare.json records it)
A new kind is those files plus one line in KINDS (see docs/extending.md). This package imports no torch.
"""

import importlib
from collections.abc import Callable

from ..errors import UsageError

# kind -> (the modality class, in this package; the module of its files; the module of its geometry)
KINDS = {"images": ("images.Images", "image_files", "image_geometry")}


def accepts(kind: str) -> Callable[[str], bool]:
    """The file-name test of a kind's folder walks (torch-free)."""
    return importlib.import_module(f"{__name__}.{_entry(kind)[1]}").accepts


def geometry(kind: str):
    """The module that reads a kind's map geometry from its summaries (torch-free; `hirescam compare`)."""
    return importlib.import_module(f"{__name__}.{_entry(kind)[2]}")


def open_modality(config, transforms, pictures: bool = True):
    """The modality the config's `[input] kind` names, with the model's preprocessing preset; `pictures`
    False: no pictures are drawn (an eval)."""
    module, _, name = _entry(config.input.kind)[0].rpartition(".")
    modality = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return modality.from_config(config, transforms, pictures)


def _entry(kind: str) -> tuple[str, str, str]:
    if kind not in KINDS:
        raise UsageError(f"input.kind = {kind!r} is not allowed: expected one of {', '.join(KINDS)}")
    return KINDS[kind]
