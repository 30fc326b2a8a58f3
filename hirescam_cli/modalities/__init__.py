"""Modalities: what one kind of input needs, in one place, so the run never branches on the kind.

A modality is a class with
    kind                            its name, as `[input] kind` in the config
    from_config(config, transforms, pictures)   the one the config asks for (transforms: the model's
                                    preprocessing preset, or None)
    input_shape() -> (C, *spatial)  every model input's shape (for probes)
    max_bytes() -> int              the largest input worth reading (all its files together)
    for_device(device) -> modality  the one the loader's workers run for batches bound to `device`
    load(data) -> (input, view)     decode and preprocess one input's bytes (a list of its files' bytes for
                                    an input of several files), keeping the geometry in the view; an
                                    InputFailure for a bad input (runs in the loader's workers, so the
                                    object must pickle). The input may be None: the view then holds
                                    what `finish` decodes on the device
    collate(views) -> views         a batch's views together
    finish(batch, device) -> batch  in the main process: what the workers left decoded on the device
                                    (stacked into batch.inputs there), a file that fails there failed
    describe(views, row) -> dict    the summary fields of one input (its size, its pictures')
    locate(maps, views) -> Tensor   the peak of each (B, T, *grid) map in the input's own coordinates
    numbers(result, views) -> dict  more summary numbers, (B, T, ...) tensors: "field" goes in each
                                    target, "method.field" in each map (pictures: none)
    map_files(save_raw) -> dict     the files each map has besides its picture and raw array:
                                    summary field -> name suffix (pictures: none)
    renderer(config, device, labels)  what turns a batch's maps into pictures on the input, in parts
                                    (`render.Part`, with the payloads of the map_files)
    mask_folder(key) -> str         eval: where under MASKS an input's masks are (`a/x.png` -> `a/x`)
    load_masks(folder, labels, views, row, problems, empty) -> {class id: bool array}  eval: the usable
                                    non-empty masks of one input, on its own grid (the empty ones go to
                                    empty, what is not usable to problems)
    to_original(maps, views, rows) -> (maps, pixels)   maps (N, *grid) registered onto the inputs of
                                    batch rows `rows`, on their own pixels (voxels), as the pictures are:
                                    (N, *largest) with NaN where the model input does not cover the input,
                                    and bool (N, *largest) marking each input's own extent (eval's
                                    localisation is scored there, against the masks load_masks read)
and a torch-free module of its files with `accepts(name) -> bool` for folder walks and, for a kind whose
inputs can be several files, `group(folder, paths)` (see discovery.catalogue). A kind may declare its own
`[preprocess]` table (a frozen dataclass with a KEYS dict of validators) in a torch-free module, and a
torch-free module of its geometry for `hirescam compare`, reading where maps lie from the summary fields
`describe` wrote:
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

# kind -> (the modality class, in this package; the module of its files; the module of its geometry for
# `hirescam compare`, None: compare refuses the kind; its [preprocess] table, None: the pictures'
# (config.PreprocessConfig))
KINDS = {
    "images": ("images.Images", "image_files", "image_geometry", None),
    "volumes": ("volumes.Volumes", "volume_files", None, "volume_settings.VolumePreprocess"),
}


def accepts(kind: str) -> Callable[[str], bool]:
    """The file-name test of a kind's folder walks (torch-free)."""
    return _files(kind).accepts


def group(kind: str) -> Callable | None:
    """How a kind makes inputs of several files out of a folder's files (None: every file is an input)."""
    return getattr(_files(kind), "group", None)


def preprocess_table(kind: str) -> tuple[type, dict] | None:
    """A kind's own `[preprocess]` table: its dataclass and a validator per key (None: the pictures')."""
    table = _entry(kind)[3]
    if table is None:
        return None
    module, _, name = table.rpartition(".")
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return cls, cls.KEYS


def _files(kind: str):
    return importlib.import_module(f"{__name__}.{_entry(kind)[1]}")


def geometry(kind: str):
    """The module that reads a kind's map geometry from its summaries (torch-free; `hirescam compare`)."""
    module = _entry(kind)[2]
    if module is None:
        raise UsageError(f"hirescam compare does not compare runs of input.kind = {kind!r} yet")
    return importlib.import_module(f"{__name__}.{module}")


def open_modality(config, transforms, pictures: bool = True):
    """The modality the config's `[input] kind` names, with the model's preprocessing preset; `pictures`
    False: no pictures are drawn (an eval)."""
    module, _, name = _entry(config.input.kind)[0].rpartition(".")
    modality = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return modality.from_config(config, transforms, pictures)


def _entry(kind: str) -> tuple[str, str, str | None, str | None]:
    if kind not in KINDS:
        raise UsageError(f"input.kind = {kind!r} is not allowed: expected one of {', '.join(KINDS)}")
    return KINDS[kind]
