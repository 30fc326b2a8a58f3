"""What a long run shows and hears: progress on stderr (a bar on a terminal, a line every few seconds in
logs), and Ctrl-C or SIGTERM, which stop it at the next batch boundary."""

import signal
import sys
import time

from tqdm import tqdm

PROGRESS_EVERY_S = 5.0


class Progress:
    """A tqdm bar on a terminal, a plain line every few seconds otherwise, nothing when quiet."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.errors = total, 0, 0
        self.quiet = quiet
        self.bar = (
            tqdm(total=total, unit="input", file=sys.stderr) if not quiet and sys.stderr.isatty() else None
        )
        self.start = self.last = time.monotonic()

    def advance_to(self, done: int, errors: int) -> None:
        """Show job-wide totals (from every process of a torchrun job)."""
        if (done, errors) != (self.done, self.errors):
            self.update(done - self.done, errors - self.errors)

    def update(self, count: int, errors: int) -> None:
        self.done += count
        self.errors += errors
        if self.bar is not None:
            self.bar.update(count)
        elif not self.quiet and (time.monotonic() - self.last >= PROGRESS_EVERY_S or self.done == self.total):
            self.last = time.monotonic()
            rate = self.done / max(self.last - self.start, 1e-9)
            print(
                f"hirescam: {self.done}/{self.total} inputs ({rate:.1f}/s, {self.errors} errors)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopFlag:
    """First Ctrl-C (or SIGTERM: torchrun stopping a job, a batch system's time limit) asks the run to stop
    at the next batch boundary; a second one interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.stopped = False
        self._previous = {number: signal.getsignal(number) for number in self.SIGNALS}

    def __enter__(self) -> "StopFlag":
        for number in self.SIGNALS:
            signal.signal(number, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, _signum: int, _frame: object) -> None:
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True
        print(
            "hirescam: stopping after the current batch (Ctrl-C again to abort)", file=sys.stderr, flush=True
        )
