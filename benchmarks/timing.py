"""Timing shared by the benchmark scripts."""

import statistics
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


def interleaved(calls: dict, rounds: int, device: torch.device, per: int) -> dict[str, float]:
    """Median seconds per item of each call, after one warm-up call each (which also lets an
    Explainer run its one-time probes), the calls interleaved round by round so noise hits all."""
    times = each_round(calls, rounds, device, per)
    return {name: statistics.median(values) for name, values in times.items()}


def each_round(calls: dict, rounds: int, device: torch.device, per: int) -> dict[str, list[float]]:
    """Seconds per item of each call in every round, as `interleaved` measures them."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(timed(fn, device) / per)
    return times
