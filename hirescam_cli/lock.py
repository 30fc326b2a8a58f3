"""The OUT lock: one run at a time writes into an output folder.

An OS record lock (``fcntl.lockf``) on OUT/.lock, held for the run's whole life: the kernel (or the NFS
lock manager, for OUT on a shared file system) drops it when the holder exits or is killed, so a dead
run never leaves a stale lock. The file says who holds it (pid, host, start, command) for the message a
second run prints; the holder empties it when it is done. The file itself stays, except when a run
that made OUT fails before writing anything (a usage error): it removes the file and the folder again.
A lock is only kept once it is checked to be on the file the path names now, so a run that waited on a
removed file locks the new one instead, and two runs never hold two different files.
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError, OutputLocked
from .outputs import LOCK_NAME, describe


class OutLock:
    """An exclusive lock on an output folder, taken by ``acquire`` and given back by ``release`` (or exit)."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.path = self.root / LOCK_NAME
        self._fd: int | None = None
        self.created = False  # acquire made the OUT folder

    @property
    def held(self) -> bool:
        """Whether this process holds the lock through this object."""
        return self._fd is not None

    def acquire(self, wait: bool = False, waiting: Callable[[str], None] | None = None) -> None:
        """Take the lock; if another run holds it, raise OutputLocked, or (`wait`) block until it is free."""
        if self.held:
            return
        self.created = not self.root.exists()
        while self._fd is None:
            fd = self._open()
            try:
                self._lock(fd, wait, waiting)
                if os.fstat(fd).st_ino != _inode(self.path):  # a failed start removed the file: again
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd

    def _open(self) -> int:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"cannot use output folder {self.root}: {describe(e)}") from None

    def _lock(self, fd: int, wait: bool, waiting: Callable[[str], None] | None) -> None:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN or EACCES: held by another process
            holder = self.holder()
            if not wait:
                raise OutputLocked(
                    f"{self.root} is locked by another run ({holder}); pass --wait to wait for it"
                ) from None
            if waiting is not None:
                waiting(f"waiting for the run that holds {self.root} ({holder})")
            fcntl.lockf(fd, fcntl.LOCK_EX)

    def holder(self) -> str:
        """Who holds the lock, as the holder wrote it: "pid N on HOST since TIME: COMMAND"."""
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']} since {info['started']}: {info['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "no details written"

    def release(self) -> None:
        """Give the lock back (closing the file does it), leaving the file empty."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """Release after a start that failed before writing anything: a folder the lock made goes again."""
        if self.held and self.created:
            with contextlib.suppress(OSError):
                self.path.unlink()  # a run waiting on this file finds it gone and locks a new one
                self.root.rmdir()
        self.release()


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _me() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["hirescam", *sys.argv[1:]])[:300],
    }
