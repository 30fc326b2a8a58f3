"""Defaults that fit the machine: decoding workers, torch threads and batch size.

Workers and threads come from the CPU cores this process may use (``os.sched_getaffinity``, shared
among the processes torchrun starts on the node), the batch size from the device.
"""

import os
from dataclasses import asdict, dataclass

import torch

MAX_WORKERS = 8


@dataclass(frozen=True)
class Resources:
    """What a run uses; run.json records it as "resources"."""

    cores: int  # CPU cores this process may use
    workers: int  # decoding processes (0: decoding in the main process)
    threads: int  # torch intra-op threads of the main process
    batch_size: int

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
    """Images per batch when the config leaves it open: on CPUs, batches whose activations fit
    the allocator's reuse threshold beat larger ones; GPUs want more work per launch."""
    return {"cuda": 32, "mps": 16}.get(device.type, 8)


def default_workers(device: torch.device, cores: int) -> int:
    """Decoding processes: on a CPU device, decoding competes with the model for the same cores (on 2
    cores, workers slow the run down), so one worker per 4 cores; on an accelerator, all cores but one."""
    if device.type == "cpu":
        return min(MAX_WORKERS, cores // 4)
    return min(MAX_WORKERS, cores - 1)


def choose(
    device: torch.device, workers: int | None, batch_size: int | None, processes_on_node: int = 1
) -> Resources:
    """Configured values where set, else defaults for this machine and device."""
    cores = usable_cores(processes_on_node)
    workers = default_workers(device, cores) if workers is None else workers
    threads = max(1, cores - workers)
    return Resources(cores, workers, threads, batch_size or default_batch_size(device))
