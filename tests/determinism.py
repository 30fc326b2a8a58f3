"""What keeps tests independent of chance: seeded data, models built under a fixed seed, scaled tolerances."""

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Run a block (or, as a decorator, a function) under a fixed torch seed; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def noise(*shape: int, seed: int = 0) -> torch.Tensor:
    """Standard normal values of this shape from a generator of their own."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal to within `rel` of each value and `rel` of the largest magnitude: float noise scales with it."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)
