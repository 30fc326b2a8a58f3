"""Encoding and writing images' outputs off the main loop.

On a CPU run a pool of threads does it (fpng and file writes release the GIL). On a GPU run the
loop that feeds the GPU must keep the GIL to itself: every kernel launch gives it up and waits to
get it back, so threads encoding PNGs beside it slow the model tenfold. There, processes write, and
a batch's pictures reach them through one shared-memory segment instead of a pipe (a pipe moves
about 200 MB/s; a batch of 32 pictures pairs at 640 x 480 is 60 MB).
"""

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from .outputs import OutputDir, write_image


@dataclass(frozen=True)
class ImageJob:
    """One image of a batch: where its outputs go and which of the batch's pictures are its own."""

    key: str
    summary: dict
    row: int  # its row in the batch's pictures
    columns: list[int]  # the target axis of the pictures that holds summary["targets"][i]
    raw_maps: dict[str, np.ndarray] | None  # float32 (T, h, w) per method, with --save-raw


class Writers:
    """A pool that writes each image's PNGs, raw maps and summary; `processes` 0 means threads."""

    def __init__(self, processes: int, threads: int = 4):
        self.processes = processes
        if processes > 0:
            # Forked like the DataLoader's workers (they never touch CUDA), and all at once, now, before
            # the loader's threads start; spawn where fork does not exist.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            resource_tracker.ensure_running()  # one tracker for the run's segments, shared with the writers
            context = multiprocessing.get_context(method)
            with _signals_blocked():  # writers forked now start with them blocked, so none dies of one
                self.pool: Executor = ProcessPoolExecutor(
                    processes, mp_context=context, initializer=_leave_signals_to_the_run
                )
                started = self.pool.submit(int)  # forks every writer
            started.result()
        else:
            self.pool = ThreadPoolExecutor(threads, thread_name_prefix="hirescam-writer")
        self._free: list[shared_memory.SharedMemory] = []
        self._all: list[shared_memory.SharedMemory] = []
        self._lock = threading.Lock()

    def submit(
        self, outdir: OutputDir, pictures: dict[str, np.ndarray], jobs: Sequence[ImageJob]
    ) -> list[Future]:
        """Queue the writes of a batch's images; `pictures[method]` is uint8 (B, T, H, W, 3)."""
        if self.processes == 0:
            return [self.pool.submit(_write_own, outdir, job, pictures) for job in jobs]
        segment, shared = self._share(pictures)
        futures = [self.pool.submit(_write_shared, outdir, job, shared) for job in jobs]
        remaining = [len(futures)]

        def release(_future: Future) -> None:
            with self._lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    self._free.append(segment)

        for future in futures:
            future.add_done_callback(release)
        return futures

    def shutdown(self) -> None:
        """Wait for every queued write, then free the shared memory."""
        self.pool.shutdown(wait=True)
        for segment in self._all:
            segment.close()
            segment.unlink()
        self._all.clear()
        self._free.clear()

    def _share(self, pictures: dict[str, np.ndarray]) -> tuple[shared_memory.SharedMemory, dict]:
        """Copy the pictures into a free segment (reused once all writes of its batch are done)."""
        size = sum(p.nbytes for p in pictures.values())
        with self._lock:
            segment = next((s for s in self._free if s.size >= size), None)
            if segment is not None:
                self._free.remove(segment)
        if segment is None:
            segment = shared_memory.SharedMemory(create=True, size=max(size, 1))
            self._all.append(segment)
        shared, offset = {}, 0
        for method, array in pictures.items():
            np.ndarray(array.shape, array.dtype, segment.buf, offset)[...] = array
            shared[method] = (segment.name, array.shape, offset)
            offset += array.nbytes
        return segment, shared


def _write_own(outdir: OutputDir, job: ImageJob, pictures: dict[str, np.ndarray]) -> None:
    height, width = job.summary["height"], job.summary["width"]
    own = {m: p[job.row, job.columns, :height, :width] for m, p in pictures.items()}
    write_image(outdir, job.key, job.summary, own, job.raw_maps)


_ATTACHED: dict[str, shared_memory.SharedMemory] = {}  # a writer process's view of the segments
_ATTACHED_MAX = 16


def _write_shared(outdir: OutputDir, job: ImageJob, shared: dict) -> None:
    pictures = {}
    for method, (name, shape, offset) in shared.items():
        if name not in _ATTACHED:
            if len(_ATTACHED) >= _ATTACHED_MAX:
                _ATTACHED.pop(next(iter(_ATTACHED))).close()
            _ATTACHED[name] = shared_memory.SharedMemory(name=name)
        pictures[method] = np.ndarray(shape, np.uint8, _ATTACHED[name].buf, offset)
    _write_own(outdir, job, pictures)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM in this thread for the block (processes forked in it inherit the mask)."""
    if not hasattr(signal, "pthread_sigmask"):  # no fork there either: writers are spawned
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _leave_signals_to_the_run() -> None:
    """Writer processes leave Ctrl-C and SIGTERM (a scheduler stopping the whole job) to the run, which
    stops at a batch boundary and waits for them, as the decoding workers do."""
    for number in _SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # held since the fork; pending ones are dropped
