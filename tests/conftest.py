"""Each test starts torch from a seed of its own and leaves torch's global state as it found it."""

import zlib
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded_torch(request: pytest.FixtureRequest) -> Iterator[None]:
    """Seed torch from pytest-randomly's seed and the test's id; restore the RNG and thread count after."""
    seed = request.config.getoption("randomly_seed", 0)  # the option is absent under -p no:randomly
    threads = torch.get_num_threads()  # in-process CLI runs set it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed + zlib.crc32(request.node.nodeid.encode())) % 2**32)
        yield
    torch.set_num_threads(threads)
