"""torchrun scale-out: one process per device, each taking a disjoint, deterministic share of the batches.

Started by ``torchrun``, a run reads its rank from the environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); started alone, it is a job of one rank and nothing here
talks to anyone. Batches are numbered as in a one-process run (batch = index // batch_size) and rank r
takes batches r, r + world, r + 2 world...: every image keeps its batch and slot, so outputs are
byte-identical whatever the number of processes. Rank 0 holds the OUT lock and writes the ledgers.

The ranks talk through torch.distributed: the process group (gloo on CPU, nccl on CUDA) checks at
start that they all see the same inputs; the rendezvous' TCP store carries the start message (rank 0
has the lock: go, or stop), the job-wide progress counters, and each rank's report when it is done.
Nothing couples the ranks while they explain, so one that dies cannot hang the others: torchrun stops
them (SIGTERM), they stop at a batch boundary, and rank 0 merges the shares of those that reported.
A job of one imports no torch here, so a run can take OUT's lock before torch loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .config import ConfigError
from .discovery import InputError
from .errors import OutputError, OutputLocked

if TYPE_CHECKING:
    import torch

START_TIMEOUT = timedelta(days=7)  # how long the other ranks wait for rank 0 to get the lock (--wait)
GRACE_S = 5.0  # how long a stopping rank 0 waits for the other ranks' reports


@dataclass
class Share:
    """The batches (lists of input indices) one rank takes: b = rank, rank + world, ... of all of them."""

    count: int
    batch_size: int
    rank: int = 0
    world: int = 1

    def _numbers(self) -> range:
        return range(self.rank, -(-self.count // self.batch_size), self.world)

    def __iter__(self) -> Iterator[list[int]]:
        for b in self._numbers():
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.count)))

    def __len__(self) -> int:
        return len(self._numbers())


@dataclass
class Job:
    """This process's place in the job: rank and world (0 and 1 when started alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int | None = None  # set under torchrun: picks the CUDA device
    local_world: int = 1
    _store: Any = None
    _prefix: str = "hirescam/"
    _totals: list[int] = field(default_factory=lambda: [0, 0])
    _reports: dict[int, dict] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Job:
        """The job torchrun describes in the environment, or a job of one."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            raise ConfigError("RANK, WORLD_SIZE, LOCAL_RANK must be integers (start with torchrun)") from None
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return cls(rank, world, local_rank, local_world, _prefix=f"hirescam/{restart}/")

    @property
    def lead(self) -> bool:
        """Whether this is rank 0, which holds the lock, shows progress and writes the ledgers."""
        return self.rank == 0

    def connect(self, device: torch.device) -> None:
        """Join the process group (nccl on CUDA, gloo otherwise) and the rendezvous store."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self._store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(minutes=10))

    def close(self) -> None:
        """Leave the process group."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def check_same(self, what: str, value: str) -> None:
        """Every rank must see the same `what` (e.g. the inputs); InputError naming one that differs."""
        if self.world == 1:
            return
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        for rank, other in enumerate(values):
            if other != values[0]:
                raise InputError(
                    f"the processes see different {what}: rank 0 {values[0]}, rank {rank} {other} "
                    "(give every process the same arguments, and inputs on a shared file system)"
                )

    def start(self, begin: Callable[[], str]) -> str:
        """Rank 0 runs `begin` (take the OUT lock, ...) and every rank gets its result, or its error."""
        if self.world == 1:
            return begin()
        key = self._prefix + "start"
        if self.lead:
            try:
                value = begin()
            except (OutputLocked, OutputError) as e:
                self._store.set(key, json.dumps({type(e).__name__: str(e)}))
                raise
            self._store.set(key, json.dumps({"go": value}))
            return value
        self._store.wait([key], START_TIMEOUT)
        message = json.loads(self._store.get(key))
        errors = {"OutputLocked": OutputLocked, "OutputError": OutputError}
        for name, error in errors.items():
            if name in message:
                raise error(message[name])
        return message["go"]

    def share(self, count: int, batch_size: int) -> Share:
        """The batches this rank takes."""
        return Share(count, batch_size, self.rank, self.world)

    def progress(self, done: int, errors: int) -> tuple[int, int]:
        """Count this rank's finished inputs (and errors); returns the job's totals so far."""
        self._totals[0] += done
        self._totals[1] += errors
        if self._store is None:
            return self._totals[0], self._totals[1]
        try:
            store, prefix = self._store, self._prefix
            return store.add(prefix + "done", done), store.add(prefix + "errors", errors)
        except RuntimeError:  # the store went away with a dead rank: show what this rank knows
            return self._totals[0], self._totals[1]

    def report(self, info: dict) -> None:
        """Tell rank 0 this rank is done (its share of the ledger is on disk); `info` goes to run.json."""
        if self._store is None:
            self._reports[self.rank] = info
            return
        with contextlib.suppress(RuntimeError):  # rank 0 is gone: the rerun resumes
            self._store.set(f"{self._prefix}report/{self.rank}", json.dumps(info))

    def reports(self, stopping: Callable[[], bool], tick: Callable[[], None]) -> dict[int, dict]:
        """Rank 0: the ranks' reports, waiting for them all, or (once `stopping()`) a few seconds more."""
        if self._store is None:
            return dict(self._reports)
        keys = {rank: f"{self._prefix}report/{rank}" for rank in range(self.world)}
        got: dict[int, dict] = {}
        deadline = None
        try:
            while len(got) < self.world:
                for rank, key in keys.items():
                    if rank not in got and self._store.check([key]):
                        got[rank] = json.loads(self._store.get(key))
                if stopping() and deadline is None:
                    deadline = time.monotonic() + GRACE_S
                if len(got) == self.world or (deadline is not None and time.monotonic() > deadline):
                    break
                tick()
                time.sleep(0.1)
        except RuntimeError:
            pass  # the store went away: merge what arrived
        return got
