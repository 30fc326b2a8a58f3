"""Defaults that fit the machine: decoding workers, output writers, torch threads and batch size, and
the heap's reuse of freed memory.

Workers and threads come from the CPU cores this process may use (``os.sched_getaffinity``, shared
among the processes torchrun starts on the node), the batch size from the device.
"""

import ctypes
import functools
import os
from dataclasses import asdict, dataclass

import torch

MAX_WORKERS = 8
HEAP_BLOCKS = 32 * 2**20  # blocks up to this size come from glibc's heap (its own largest limit)
HEAP_KEPT = 512 * 2**20  # free memory the heap keeps at its top for the next batch (glibc's: 64 MiB)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)


@dataclass(frozen=True)
class Resources:
    """What a run uses; run.json records it as "resources"."""

    cores: int  # CPU cores this process may use
    workers: int  # decoding processes (0: decoding in the main process)
    writers: int  # processes that encode and write outputs (0: a pool of threads in the main process)
    threads: int  # torch intra-op threads of the main process
    batch_size: int
    writer_threads: int = 4  # when writers is 0: the threads that encode and write outputs

    def to_dict(self) -> dict:
        return asdict(self)


def usable_cores(processes_on_node: int = 1) -> int:
    """The cores this process may run on, divided among the processes started on the node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // processes_on_node)


def default_batch_size(device: torch.device) -> int:
    """Images per batch when the config leaves it open: on CPUs small batches keep the activations in
    the caches (resnet50 on 2 cores: 34-38 ms an image at 8, 40 at 16, 50 at 32); GPUs want more work
    per launch."""
    return {"cuda": 32, "mps": 16}.get(device.type, 8)


def default_workers(device: torch.device, cores: int) -> int:
    """Decoding processes: on a CPU device, 2 (a quarter of the cores on larger machines), beside torch
    using every core: on 2 idle cores this ran resnet50 explanations as fast as decoding in the main
    process and kept decoding off the model's critical path; on an accelerator, the cores that neither
    the main process nor the output writers take."""
    if device.type == "cpu":
        return min(MAX_WORKERS, max(2, cores // 4)) if cores > 1 else 0
    return max(1, min(MAX_WORKERS, cores - 1 - default_writers(device, cores)))


def default_writers(device: torch.device, cores: int) -> int:
    """Output writer processes: on a GPU the loop that feeds it must keep Python's GIL to itself
    (writer threads beside it slowed every kernel launch tenfold on an H100), so a third of the
    cores encode PNGs in processes; on a CPU device threads: fpng holds the GIL while it encodes (about
    1 ms for 640 x 480), yet one writer process measured no faster on 2 cores (benchmarks/pipeline.py)."""
    return 0 if device.type == "cpu" else max(1, cores // 3)


def uses_glibc() -> bool:
    """Whether this process runs on glibc (whose malloc keep_freed_heap tunes)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # not a glibc system
        return False


@functools.cache
def keep_freed_heap() -> int | None:
    """Let glibc's heap keep up to HEAP_KEPT bytes of freed memory for reuse, for this process and the ones
    it forks (decoding workers, writers); returns that size, or None where nothing was changed.

    By default glibc hands the free top of its heap back to the kernel beyond 64 MiB (and at first maps
    every block above 128 KiB on its own), so each batch's activations fault their pages in again: on 2
    cores a resnet50 forward of 8 images spent a quarter of its time there (0.35 s against 0.27 s with
    this). Blocks above HEAP_BLOCKS are still mapped on their own and returned when freed, so huge
    pictures leave nothing behind. Nothing changes where the allocator is not glibc's, or where the user
    set glibc's own limits (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, or glibc.malloc tunables in
    GLIBC_TUNABLES).
    """
    if not uses_glibc():
        return None
    own = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    if any(name in os.environ for name in own) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    if not (mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCKS) and mallopt(_M_TRIM_THRESHOLD, HEAP_KEPT)):
        return None
    return HEAP_KEPT


def choose(
    device: torch.device, workers: int | None, batch_size: int | None, processes_on_node: int = 1
) -> Resources:
    """Configured values where set, else defaults for this machine and device."""
    cores = usable_cores(processes_on_node)
    workers = default_workers(device, cores) if workers is None else workers
    writers = default_writers(device, cores)
    threads = cores if device.type == "cpu" else max(1, cores - workers)
    return Resources(cores, workers, writers, threads, batch_size or default_batch_size(device))
