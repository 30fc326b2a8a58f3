"""The writer pool: a sink's encoding and writing, off the main loop.

On a CPU run a pool of threads does it (fpng, Pillow's encoders and file writes release the GIL). On a
GPU run the loop that feeds the GPU must keep the GIL to itself: every kernel launch gives it up and
waits to get it back, so threads encoding PNGs beside it slow the model tenfold. There, processes write, and
a part's pictures reach them through one shared-memory segment instead of a pipe (a pipe moves
about 200 MB/s; a batch of 32 pictures pairs at 640 x 480 is 60 MB).

Pictures come in parts (``render.plan_parts``): a part holds several small inputs' pictures, or a few of
one huge input's. What waits to be written is bounded in bytes: ``submit`` waits while earlier parts
still being written hold more than the budget. The pool runs the sink's functions (module-level, so that
writer processes can be handed them) on each job of a part.
"""

import multiprocessing
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from ..outputs import OutputDir

QUEUED_BYTES = 192 * 2**20  # pictures submitted and not yet written, beyond the part being submitted
Write = Callable[[OutputDir, object, np.ndarray], None]  # (OUT, one job, the part's pictures)


class Writers:
    """A pool of writer threads or (`processes` > 0) processes."""

    def __init__(self, processes: int, threads: int = 4, budget: int = QUEUED_BYTES):
        self.processes = processes
        self.budget = budget
        if processes > 0:
            # Forked like the DataLoader's workers (they never touch CUDA), and all at once, now, before
            # the loader's threads start; spawn where fork does not exist.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            resource_tracker.ensure_running()  # one tracker for the run's segments, shared with the writers
            context = multiprocessing.get_context(method)
            self.pool: Executor = ProcessPoolExecutor(
                processes, mp_context=context, initializer=_leave_signals_to_the_run
            )
            # The writers start with the run's signals blocked, so none can arrive before they ignore them.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _RUN_SIGNALS)
            try:
                self.pool.submit(int).result()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        else:
            self.pool = ThreadPoolExecutor(threads, thread_name_prefix="hirescam-writer")
        self._free: list[shared_memory.SharedMemory] = []
        self._all: list[shared_memory.SharedMemory] = []
        self._queued = 0  # bytes of the parts submitted and not yet written
        self._room = threading.Condition()
        self._finishing: list[Future] = []

    def submit(
        self, write: Write, outdir: OutputDir, pictures: np.ndarray | list, jobs: Sequence, extra: int = 0
    ) -> list[Future]:
        """Queue `write(outdir, job, pictures)` for each job of one part of a batch's pictures, uint8
        (n, k, H, W, 3), or their files encoded already (pictures[i][c], bytes: small enough to be handed
        over as they are), whose jobs hold `extra` bytes more (other files' payloads); first waits while
        earlier parts not yet written hold more than the budget."""
        pixels = isinstance(pictures, np.ndarray)
        size = (pictures.nbytes if pixels else sum(len(data) for row in pictures for data in row)) + extra
        with self._room:
            self._room.wait_for(lambda: not self._queued or self._queued + size <= self.budget)
            self._queued += size
        if self.processes == 0 or not pixels:
            segment, futures = None, [self.pool.submit(write, outdir, job, pictures) for job in jobs]
        else:
            segment, shared = self._share(pictures)
            futures = [self.pool.submit(_write_shared, write, outdir, job, shared) for job in jobs]
        remaining = [len(futures) + 1]  # + 1: released below, so that a part without jobs frees its room

        def release(_future: Future | None) -> None:
            with self._room:
                remaining[0] -= 1
                if remaining[0] == 0:
                    self._queued -= size
                    if segment is not None:
                        self._free.append(segment)
                    self._room.notify_all()

        for future in futures:
            future.add_done_callback(release)
        release(None)
        return futures

    def after(self, done_first: Sequence[Future], call: Callable, *args: object) -> Future:
        """Run `call(*args)` in the pool once `done_first` are done (an input's summary after the writes of
        its parts); the future fails with the first of their errors instead, and then `call` never runs."""
        done: Future = Future()
        remaining = [len(done_first) + 1]
        lock = threading.Lock()

        def part_written(_future: Future | None) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            try:
                error = next((f.exception() for f in done_first if f.exception() is not None), None)
                if error is not None:
                    done.set_exception(error)
                    return
                written = self.pool.submit(call, *args)
                written.add_done_callback(lambda f: _settle(done, f))
            except BaseException as error:  # a broken pool: the run must not wait for `done` forever
                done.set_exception(error)

        self._finishing = [f for f in self._finishing if not f.done()] + [done]
        for future in done_first:
            future.add_done_callback(part_written)
        part_written(None)
        return done

    def shutdown(self) -> None:
        """Wait for every queued write and summary, then free the shared memory."""
        wait(self._finishing)
        self.pool.shutdown(wait=True)
        for segment in self._all:
            segment.close()
            segment.unlink()
        self._all.clear()
        self._free.clear()

    def _share(self, pictures: np.ndarray) -> tuple[shared_memory.SharedMemory, tuple]:
        """Copy a part's pictures into a free segment (reused once all writes of its part are done); sizes
        are powers of two, so parts of other sizes reuse them too (pages never written cost nothing)."""
        with self._room:
            segment = next((s for s in self._free if s.size >= pictures.nbytes), None)
            if segment is not None:
                self._free.remove(segment)
        if segment is None:
            size = 1 << max(20, (pictures.nbytes - 1).bit_length())
            segment = shared_memory.SharedMemory(create=True, size=size)
            self._all.append(segment)
        np.ndarray(pictures.shape, pictures.dtype, segment.buf)[...] = pictures
        return segment, (segment.name, pictures.shape)


def _settle(done: Future, future: Future) -> None:
    """Give `done` the outcome of `future`."""
    error = future.exception()
    if error is None:
        done.set_result(future.result())
    else:
        done.set_exception(error)


_ATTACHED: dict[str, shared_memory.SharedMemory] = {}  # a writer process's view of the segments
_ATTACHED_MAX = 16


def _write_shared(write: Write, outdir: OutputDir, job: object, shared: tuple) -> None:
    name, shape = shared
    if name not in _ATTACHED:
        if len(_ATTACHED) >= _ATTACHED_MAX:
            _ATTACHED.pop(next(iter(_ATTACHED))).close()
        _ATTACHED[name] = shared_memory.SharedMemory(name=name)
    write(outdir, job, np.ndarray(shape, np.uint8, _ATTACHED[name].buf))


_RUN_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _leave_signals_to_the_run() -> None:
    """Writer processes leave Ctrl-C and SIGTERM (a scheduler stopping the whole job) to the run, which
    stops at a batch boundary and waits for them, as the decoding workers do."""
    for number in _RUN_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _RUN_SIGNALS)
