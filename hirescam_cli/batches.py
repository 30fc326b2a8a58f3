"""Inputs -> batches, whatever their kind: read, hash, ask resume, let the modality decode and preprocess.

Data flows: ``discovery`` (arguments -> sorted ``InputItem``s) -> ``InputDataset`` (never raises for a bad
input: it becomes an error) -> ``collate`` (good / skipped / failed) -> ``Batch``, in DataLoader workers;
then, in the main process, ``modality.finish`` decodes on the device what the workers left to it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import signal
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from .discovery import InputItem
from .errors import InputFailure


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


@dataclass
class Sample:
    """The result for one input: a model input with its view (what the outputs need of the original),
    a skip, or an error."""

    index: int
    sha256: str | None = None
    input: torch.Tensor | None = None  # None in a good sample too: the modality finishes it on the device
    view: Any = None  # the modality's view of the input (for pictures: size, crop box, overlay picture)
    error: str | None = None
    skipped: bool = False

    @property
    def good(self) -> bool:
        """Neither skipped nor failed."""
        return self.error is None and not self.skipped


def _read_error(path: Path, error: OSError) -> str:
    """A one-line reason why a file could not be read."""
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "is a directory"
    if isinstance(error, FileNotFoundError):
        return "broken symbolic link" if path.is_symlink() else "file not found"
    return f"cannot read: {error.strerror or one_line(error)}"


class TooLarge(InputFailure):
    """A file (or an input's files together) larger than the modality's limit allows."""

    def __init__(self, size: int):
        super().__init__(f"{size} bytes")
        self.size = size


def read_file(path: Path, max_bytes: int | None) -> bytes:
    """A regular file's bytes; InputFailure for a device, pipe or socket (never read: it could be endless),
    TooLarge for a file larger than `max_bytes`. OSError when it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the open
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputFailure(f"not a regular file but a {_file_kind(info.st_mode)}")
        if max_bytes is not None and info.st_size > max_bytes:
            raise TooLarge(info.st_size)
        return file.read()


def read_members(members: Sequence[Path], max_bytes: int | None) -> tuple[list[tuple[str, bytes]], str]:
    """The (name, bytes) of an input's files, within `max_bytes` together, and their sha256: of each
    file's name and sha256, in order."""
    files, digest, total = [], hashlib.sha256(), 0
    for member in members:
        try:
            data = read_file(member, None if max_bytes is None else max_bytes - total)
        except TooLarge as error:
            raise TooLarge(total + error.size) from None
        except OSError as error:
            raise InputFailure(f"{member.name}: {_read_error(member, error)}") from None
        total += len(data)
        digest.update(member.name.encode(errors="surrogateescape") + b"\0" + hashlib.sha256(data).digest())
        files.append((member.name, data))
    return files, digest.hexdigest()


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISCHR: "character device", stat.S_ISBLK: "block device", stat.S_ISFIFO: "named pipe"}
    return next(
        (name for test, name in kinds.items() if test(mode)),
        "socket" if stat.S_ISSOCK(mode) else "special file",
    )


class InputDataset(Dataset[Sample]):
    """Reads, hashes, and (through the modality) decodes and preprocesses inputs by index; a bad input is an
    error, never an exception.

    ``skip(item, sha256)`` (e.g. "outputs already complete") is asked after hashing and before decoding.
    It runs in the DataLoader workers, so it, like the modality, must be picklable under spawn and not rely
    on main-process state that changes after the workers start. Many inputs come as a
    ``discovery.Catalogue``, which workers read from its file rather than copying a large list.
    """

    def __init__(
        self, items: Sequence[InputItem], modality: Any, skip: Callable[[InputItem, str], bool] | None = None
    ) -> None:
        self.items = items
        self.modality = modality
        self.skip = skip

    def __len__(self) -> int:
        """Number of inputs."""
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        """Load one input into a Sample (skipped, failed or ready)."""
        item = self.items[index]
        try:
            if item.members is None:
                data = read_file(item.path, self.modality.max_bytes())
                sha256 = hashlib.sha256(data).hexdigest()
            else:
                data, sha256 = read_members(item.members, self.modality.max_bytes())
        except OSError as error:
            return Sample(index, error=_read_error(item.path, error))
        except TooLarge as error:
            return Sample(index, error=f"{error.size} bytes: larger than {self.modality.limit} could be")
        except InputFailure as error:
            return Sample(index, error=str(error))
        if self.skip is not None and self.skip(item, sha256):
            return Sample(index, sha256, skipped=True)
        try:
            tensor, view = self.modality.load(data)
        except InputFailure as error:
            return Sample(index, sha256, error=str(error))
        except Exception as error:  # e.g. out of memory on an extreme aspect ratio
            reason = f"cannot process {self.modality.noun}: {type(error).__name__}: {one_line(error)}"
            return Sample(index, sha256, error=reason)
        return Sample(index, sha256, tensor, view)


@dataclass
class Batch:
    """A collated batch: stacked inputs of the good samples and their views, plus the skipped and failed."""

    indices: list[int]
    # (N, C, *spatial) float, an empty tensor when N = 0; or a list of them with None for the inputs
    # the modality decodes on the device (its `finish` then stacks them there)
    inputs: torch.Tensor | list[torch.Tensor | None]
    views: Any  # the modality's collated views of the N good inputs
    sha256: list[str]
    skipped: list[tuple[int, str]]  # (index, sha256)
    failed: list[tuple[int, str]]  # (index, error)

    def pin_memory(self) -> Batch:
        """Copy the tensors into page-locked memory (DataLoader(pin_memory=True) calls this)."""
        views = self.views.pin_memory() if hasattr(self.views, "pin_memory") else self.views
        if isinstance(self.inputs, torch.Tensor):
            inputs = self.inputs.pin_memory()
        else:
            inputs = [i.pin_memory() if i is not None else None for i in self.inputs]
        return dataclasses.replace(self, inputs=inputs, views=views)


def stack(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Model inputs as one (N, C, *spatial) batch (an empty tensor for none); ValueError if sizes differ."""
    sizes = sorted({tuple(i.shape[1:]) for i in inputs})
    if len(sizes) > 1:
        shown = ", ".join("x".join(map(str, size)) for size in sizes)
        raise ValueError(
            f"cannot batch model inputs of different sizes ({shown}): set a crop or an exact (h, w) resize, "
            "or use batch size 1"
        )
    return torch.stack(list(inputs)) if inputs else torch.empty(0)


def collate(samples: list[Sample], views: Callable[[list[Any]], Any]) -> Batch:
    """Stack the good samples (unless the modality finishes some on the device), collate their views, and
    list the skipped and failed ones; ValueError if input sizes differ."""
    good = [s for s in samples if s.good]
    inputs = [s.input for s in good]
    decoded = [i for i in inputs if i is not None]
    return Batch(
        indices=[s.index for s in good],
        inputs=stack(decoded) if len(decoded) == len(inputs) else inputs,
        views=views([s.view for s in good]),
        sha256=[s.sha256 for s in good],
        skipped=[(s.index, s.sha256) for s in samples if s.skipped],
        failed=[(s.index, s.error) for s in samples if s.error is not None],
    )


def make_loader(
    dataset: InputDataset,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    batches: Iterable[list[int]] | None = None,
) -> DataLoader:
    """A DataLoader yielding Batches in input order, decoding in `workers` processes (0: in this one).

    `batches` (index lists) replaces the default: consecutive batches of `batch_size` over every input.
    """
    if batches is None:
        batches = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=functools.partial(collate, views=dataset.modality.collate),
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=_ignore_interrupts,
    )


def _ignore_interrupts(_worker_id: int) -> None:
    """Workers leave Ctrl-C and SIGTERM to the main process, which stops the run at a batch boundary
    (workers exit when it does)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
