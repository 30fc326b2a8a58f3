"""Timing shared by the benchmark scripts."""

import time

import torch


def timed(fn, device: torch.device) -> float:
    """Wall seconds of one call, synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
