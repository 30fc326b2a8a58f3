"""OUT itself: the names it keeps for itself, atomic writes, and folders replaced whole.

Under OUT, beside what the sink writes for the inputs (sinks/):
    results.jsonl, run.json          the ledgers (ledger.py)
    .lock                            the OUT lock (lock.py)
    report/, eval.html, eval.json    the HTML report and the eval's pages (hirescam_cli.report)
    .tmp/                            every process's temporary folder
Each process writes its temporary files in a folder of its own under OUT/.tmp and renames them into
place, so a reader never sees half a file and no run touches another's files. A folder can be written
whole: a complete new set of files goes to a staging folder in the temp folder, which then takes the
folder's place in one atomic step (``OutputDir.replacing``); the folders inside the one replaced stay.
"""

import contextlib
import ctypes
import errno
import hashlib
import io
import itertools
import json
import os
import shutil
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputError
from .formats import PictureFormat

LOCK_NAME = ".lock"
COMMIT_TRIES = 100  # renames of a folder into place before giving up on a parent that keeps changing
# names under OUT that no input key takes
RESERVED = ("results.jsonl", "run.json", "eval.json", "eval.html", "report", ".tmp", LOCK_NAME)


def describe(error: Exception) -> str:
    """A one-line reason for an OS error."""
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _libc_renameat2() -> Any:
    """libc's renameat2 (Linux, glibc 2.28 and later), or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _libc_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> None:
    """Swap two paths in one atomic step (renameat2 with RENAME_EXCHANGE); OSError where that cannot be."""
    if _RENAMEAT2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available here")
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def can_exchange(folder: Path) -> bool:
    """Whether the file system of `folder` swaps two folders atomically: tried once, on two empty ones."""
    a, b = folder / "exchange-a", folder / "exchange-b"
    a.mkdir()
    b.mkdir()
    try:
        exchange(a, b)
    except OSError:  # EINVAL, ENOSYS, EOPNOTSUPP: not here (other systems, some network file systems)
        return False
    finally:
        a.rmdir()
        b.rmdir()
    return True


def temp_root(root: Path) -> Path:
    """The folder under OUT that holds every process's temporary folder."""
    return Path(root).absolute() / ".tmp"


def remove_stale_temp(root: Path) -> None:
    """Remove what killed runs left in OUT/.tmp; only the holder of the OUT lock calls this.

    Temp folders are named HOST-PID-...: those of a live process on this host (an eval writing its
    report, which takes no lock) are kept.
    """
    host = socket.gethostname()
    with contextlib.suppress(OSError), os.scandir(temp_root(root)) as entries:
        for entry in entries:
            owner, _, rest = entry.name.rpartition("-")[0].rpartition("-")
            if not (owner == host and rest.isdigit() and _alive(int(rest))):
                shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


class OutputDir:
    """Everything written under OUT goes through here; temporary files go to this process's own folder."""

    def __init__(self, root: Path, pictures: PictureFormat | None = None, tmp: Path | None = None):
        self.root = Path(root).absolute()
        self.pictures = pictures or PictureFormat()  # how the writers encode the overlays
        self.tmp = tmp or temp_root(self.root) / f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"
        self._names = itertools.count()
        self._lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True)
            self.atomic_exchange = can_exchange(self.tmp)  # decided once; writer processes get it pickled
        except OSError as e:
            raise OutputError(f"cannot use output folder {self.root}: {describe(e)}") from None
        self._real_root = self.root.resolve()

    def create(self, path: Path, data: bytes) -> None:
        """Write a new file where nothing reads it yet (a temp file, a staging folder)."""
        with open(path, "xb") as f:
            f.write(data)

    def write(self, path: Path, data: bytes) -> None:
        """Write bytes to path atomically: a temp file in OUT/.tmp, then a rename."""
        parent = path.parent
        if not parent.resolve().is_relative_to(self._real_root):
            raise OutputError(f"refusing to write {path}: it resolves outside {self.root}")
        parent.mkdir(parents=True, exist_ok=True)
        temp = self._temp_path()
        try:
            self.create(temp, data)
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def write_json(self, path: Path, value: Any) -> None:
        self.write(path, json_bytes(value))

    @contextlib.contextmanager
    def replacing(self, key: str) -> Iterator[Path]:
        """A staging folder for the complete new set of files of OUT/<key>; when the block ends without an
        error it takes the folder's place in one atomic step, and the set it replaced is removed (its
        subfolders move into the new one)."""
        target = self._folder_target(key)
        staging = self.staging(key)
        staging.mkdir(exist_ok=True)  # earlier parts of a huge image may have written there
        try:
            yield staging
            for old in self._commit(staging, target):
                _carry_folders(old, target)
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # a failed new set (or, exchanged, the old one)

    def staging(self, key: str) -> Path:
        """The staging folder of OUT/<key>'s new set of files, the same from any writer of this process."""
        return self.tmp / f"stage-{hashlib.sha1(key.encode()).hexdigest()}"

    def _folder_target(self, key: str) -> Path:
        """Where OUT/<key> really is: links inside OUT are followed, as every write here does; one that leads
        outside OUT, onto OUT itself or onto a name OUT uses is refused, and so is a file in the way."""
        folder = self.root / key
        try:
            real = folder.resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a link loop
            raise OutputError(f"cannot write {folder}: {describe(e)}") from None
        if not real.is_relative_to(self._real_root):
            raise OutputError(f"refusing to write {folder}: it resolves outside {self.root}")
        inside = real.relative_to(self._real_root).parts
        if not inside or inside[0] in RESERVED:
            raise OutputError(f"refusing to write {folder}: it resolves to {real}, which OUT uses itself")
        if _is_other_than_folder(real):
            raise OutputError(f"refusing to replace {folder}: it exists and is not a folder")
        return real

    def _commit(self, staging: Path, target: Path) -> list[Path]:
        """Put the folder `staging` at `target` in one atomic step; returns where the sets it replaced are,
        the newest first (so the folders they carry are the newest: see `replacing`).

        Without an atomic exchange the old folder is moved aside first: a kill between that rename and the
        next leaves no folder at all (the input is then not done, and the next run redoes it), never a mix.
        The parent may be replaced meanwhile (an input whose key this one extends, swapping its own set):
        making it or the rename then finds a removed folder, and both are tried again in the new one.
        """
        replaced = []
        for _ in range(COMMIT_TRIES):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except FileExistsError:  # it was there, and a swap moved it aside before mkdir could see a folder
                if _is_other_than_folder(target.parent):
                    raise
                continue
            try:
                os.rename(staging, target)  # no folder there (or an empty one)
                return replaced
            except FileNotFoundError:
                if not staging.exists():
                    raise
                continue
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            try:
                if self.atomic_exchange:
                    exchange(staging, target)
                    return [staging, *replaced]
                aside = self._temp_path()
                os.rename(target, aside)
                replaced.insert(0, aside)
            except FileNotFoundError:  # the folder went meanwhile: rename into its place
                continue
        raise OutputError(f"cannot put {target} in place: its folder kept changing")

    def _temp_path(self) -> Path:
        """A fresh name in this process's temp folder."""
        with self._lock:
            return self.tmp / f"{os.getpid()}-{next(self._names)}"

    def close(self) -> None:
        """Remove this process's temp folder, and OUT/.tmp itself when no other process has one there."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        for folder in (self.tmp.parent, temp_root(self.root)):
            if folder != self.root and folder.is_relative_to(self.root):
                try:
                    folder.rmdir()
                except FileNotFoundError:
                    continue
                except OSError:  # not empty: another process's
                    break

    def __getstate__(self) -> dict[str, Any]:
        """Writer processes get the paths; each makes its own lock and temp-name counter."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_names")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _names=itertools.count())


def _is_other_than_folder(path: Path) -> bool:
    """Whether something that is not a folder is at `path`, asked once (another input's swap may be moving
    a folder there or away meanwhile: missing is fine)."""
    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _carry_folders(old: Path, new: Path) -> None:
    """Move the folders inside a replaced set (the outputs of inputs whose keys extend this one's) into the
    new set; one that was redone meanwhile already has its new folder there, which stays."""
    with os.scandir(old) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.rename(entry.path, new / entry.name)


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
