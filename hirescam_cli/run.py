"""`hirescam explain` from the outside: find the inputs and take OUT's lock before torch loads, then
hand over to the pipeline (pipeline.py), so a second run into a locked OUT is refused at once."""

import sys
import time
from pathlib import Path

from .discovery import catalogue, read_list
from .distributed import Job
from .errors import EXIT_OK, UsageError
from .lock import OutLock
from .modalities import accepts, group
from .outputs import RESERVED


def check_out(out: Path) -> None:
    """OUT must be a folder, or not exist yet (it is then made)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file, not a folder: give the folder the outputs go to")


def run_explain(
    config,
    inputs: list[str],
    out: Path,
    overwrite: bool,
    quiet: bool,
    wait: bool = False,
    inputs_from: str | None = None,
    allow_empty: bool = False,
    report: bool = False,
) -> int:
    """Explain every input into `out`; returns the exit code.

    `inputs_from`: a file listing one path per line ("-": standard input); `allow_empty`: no image at
    all is a normal outcome (exit 0); `wait`: wait for another run that holds OUT's lock; `report`:
    write OUT/report/index.html at the end, while the lock is still held.
    """
    started = time.time()
    check_out(out)
    listed = read_list(inputs_from) if inputs_from is not None else None
    found = catalogue(
        inputs,
        RESERVED,
        exclude=out,
        listed=listed,
        allow_empty=allow_empty,
        accepts=accepts(config.input.kind),
        group=group(config.input.kind),
    )
    with found as items:
        if not items:
            if not quiet:
                print("hirescam: no images found, nothing to do (--allow-empty)", file=sys.stderr, flush=True)
            return EXIT_OK
        job, lock = Job.from_env(), OutLock(out)
        if job.world == 1:  # a torchrun job's rank 0 takes it once the processes are connected
            lock.acquire(wait, waiting=None if quiet else _say)
        try:
            from .pipeline import ExplainRun  # torch, and the model

            explain_run = ExplainRun(config, items, out, lock, job, overwrite, quiet, wait, started, report)
        except BaseException:
            lock.abandon()  # a usage error leaves OUT as it was
            raise
        return explain_run.run()


def _say(message: str) -> None:
    print(f"hirescam: {message}", file=sys.stderr, flush=True)
