"""Failures a user can cause, each with its documented exit code; the CLI prints one line and exits with it.

Imports nothing heavy: the command line catches these before torch is ever loaded.
"""

EXIT_OK = 0  # every input explained or skipped
EXIT_FAILED = 1  # at least one input failed; the others were done
EXIT_USAGE = 2  # usage or config error: nothing written
EXIT_OUTPUT = 3  # outputs cannot be written
EXIT_LOCKED = 4  # OUT is locked by another run
EXIT_RANK_LOST = 5  # a process of a torchrun job stopped before reporting: the ledgers cover the others
EXIT_GATE = 6  # hirescam compare: a gate failed (one line per failed gate)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: stopped after the current batch


class Failure(Exception):
    """A failure that stops the command: str(error) is one line, `exit_code` its documented code."""

    exit_code = EXIT_USAGE


class UsageError(Failure, ValueError):
    """Bad flags, config, inputs or model (exit 2); the message names the thing and the fix."""


class OutputError(Failure):
    """Outputs cannot be written (no permission, disk full); the run stops (exit 3)."""

    exit_code = EXIT_OUTPUT


class OutputLocked(Failure):
    """Another run holds the OUT lock (exit 4); the message names it."""

    exit_code = EXIT_LOCKED


class InputFailure(Exception):
    """One input cannot be used (unreadable, corrupt, too large): it gets an error line, the run goes on."""
