"""The output folder: its layout, atomic writes, resume checks and the run's ledgers.

Layout under OUT, for an input whose key is `a/cat.jpg`:
    a/cat.jpg/summary.json           the per-image summary: it lists every other file of the folder
    a/cat.jpg/<method>-<class>.png   one heatmap overlay per method and target
    a/cat.jpg/<method>-<class>.npy   the raw map, with --save-raw
    results.jsonl                    one line per input, in input order
    run.json                         the effective config, versions, device, counts, timings
    .lock                            the OUT lock (lock.py)
    report/, eval.html               the HTML report and eval page (hirescam_cli.report)
Each process writes its temporary files in a folder of its own under OUT/.tmp and renames them into
place, so a reader never sees half a file and no run touches another's files. An input's folder is
written whole: its complete set of outputs goes to a staging folder in the temp folder, which then takes
the folder's place in one atomic step (``OutputDir.replacing``), so OUT/<key> always holds exactly the
files its summary lists (subfolders aside: the folders of inputs whose keys extend this one's).
"""

import contextlib
import ctypes
import errno
import hashlib
import heapq
import io
import itertools
import json
import os
import shutil
import socket
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import OutputError

try:
    import fpng
except ImportError:  # the fast encoder is optional: PNGs then come from zlib (--png small)
    fpng = None

SCHEMA = "hirescam-cli/summary/1"
SUMMARY_NAME = "summary.json"
LOCK_NAME = ".lock"
COMMIT_TRIES = 100  # renames of a folder into place before giving up on a parent that keeps changing
# names under OUT that no input key takes
RESERVED = ("results.jsonl", "run.json", "eval.json", "eval.html", "report", ".tmp", LOCK_NAME)


def describe(error: Exception) -> str:
    """A one-line reason for an OS error."""
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def encode_png(pixels: np.ndarray, kind: str = "fast") -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array: "fast" with fpng (~20x quicker, ~35% larger files),
    "small" with zlib through Pillow (run-length strategy: quicker than the default, and smaller)."""
    if kind == "fast" and fpng is not None:
        return fpng.from_ndarray(np.ascontiguousarray(pixels))
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buffer.getvalue()


def png_encoder(kind: str) -> str:
    """The encoder `kind` gets here: "fpng", or "zlib" (asked for, or fpng cannot be imported)."""
    return "fpng" if kind == "fast" and fpng is not None else "zlib"


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

    def __init__(self, root: Path, png: str = "fast", tmp: Path | None = None):
        self.root = Path(root).absolute()
        self.png = png
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

    def folder(self, key: str) -> Path:
        """The folder of one input's outputs."""
        return self.root / key

    def summary_path(self, key: str) -> Path:
        return self.folder(key) / SUMMARY_NAME

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
        """A staging folder for the complete new set of one input's outputs; when the block ends without an
        error it takes the place of OUT/<key> in one atomic step, and the set it replaced is removed."""
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
        """The staging folder of one input's new set of outputs, the same from any writer of this process."""
        return self.tmp / f"stage-{hashlib.sha1(key.encode()).hexdigest()}"

    def _folder_target(self, key: str) -> Path:
        """Where OUT/<key> really is: links inside OUT are followed, as every write here does; one that leads
        outside OUT, onto OUT itself or onto a name OUT uses is refused, and so is a file in the way."""
        folder = self.folder(key)
        try:
            real = folder.resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a link loop
            raise OutputError(f"cannot write {folder}: {describe(e)}") from None
        if not real.is_relative_to(self._real_root):
            raise OutputError(f"refusing to write {folder}: it resolves outside {self.root}")
        inside = real.relative_to(self._real_root).parts
        if not inside or inside[0] in RESERVED:
            raise OutputError(f"refusing to write {folder}: it resolves to {real}, which OUT uses itself")
        if real.exists() and not real.is_dir():
            raise OutputError(f"refusing to replace {folder}: it exists and is not a folder")
        return real

    def _commit(self, staging: Path, target: Path) -> list[Path]:
        """Put the folder `staging` at `target` in one atomic step; returns where the sets it replaced are.

        Without an atomic exchange the old folder is moved aside first: a kill between that rename and the
        next leaves no folder at all (the input is then not done, and the next run redoes it), never a mix.
        The parent may be replaced meanwhile (an input whose key this one extends, swapping its own set):
        the rename then finds a removed folder, and is tried again in the new one.
        """
        replaced = []
        for _ in range(COMMIT_TRIES):
            target.parent.mkdir(parents=True, exist_ok=True)
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
                    return [*replaced, staging]
                aside = self._temp_path()
                os.rename(target, aside)
                replaced.append(aside)
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


def write_maps(outdir: OutputDir, key: str, summary: dict, pictures, raw_maps) -> None:
    """Write some of one image's PNGs (and raw maps) into its staging folder: a huge image's come in several
    parts, from any writer, and `write_image` then puts the whole set in place.

    `pictures[method][t]` is the uint8 (H, W, 3) overlay of summary["targets"][t], `raw_maps[method][t]`
    (or raw_maps None) its float32 (h, w) raw map.
    """
    staging = outdir.staging(key)
    staging.mkdir(exist_ok=True)
    for method, overlays in pictures.items():
        for t, pixels in overlays.items():
            files = summary["targets"][t]["maps"][method]
            outdir.create(staging / _own_name(key, files["png"]), encode_png(pixels, outdir.png))
            if raw_maps is not None:
                outdir.create(staging / _own_name(key, files["raw"]), npy_bytes(raw_maps[method][t]))


def write_image(outdir: OutputDir, key: str, summary: dict, pictures, raw_maps) -> None:
    """Write one image's remaining PNGs and raw maps (as write_maps; {} when earlier parts wrote them all)
    and its summary, then replace OUT/<key> with the complete set at once."""
    with outdir.replacing(key) as staging:
        write_maps(outdir, key, summary, pictures, raw_maps)
        outdir.create(staging / SUMMARY_NAME, json_bytes(summary))


def _own_name(key: str, path: str) -> str:
    """The file name of a path (relative to OUT) that a summary lists in its own folder."""
    folder, _, name = path.rpartition("/")
    if folder != key or name in ("", ".", "..", SUMMARY_NAME):
        raise OutputError(f"refusing to write {path}: it lies outside the folder of {key}")
    return name


def listed_files(summary: dict) -> set[str]:
    """The names of the files a summary says its folder holds, summary.json included."""
    names = {SUMMARY_NAME}
    for target in summary["targets"]:
        for files in target["maps"].values():
            names.update(path.rpartition("/")[2] for path in (files["png"], files["raw"]) if path)
    return names


def folder_files(folder: Path) -> set[str]:
    """The names of the files in a folder (its subfolders hold other inputs' outputs)."""
    with os.scandir(folder) as entries:
        return {entry.name for entry in entries if not entry.is_dir(follow_symlinks=False)}


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


def new_counts() -> dict[str, int]:
    """Inputs by status, and how many of the explained ones had no class above the threshold."""
    return {"ok": 0, "skipped": 0, "error": 0, "no_target": 0}


def count(counts: dict[str, int], record: dict[str, Any]) -> None:
    counts[record["status"]] += 1
    counts["no_target"] += bool(record.get("no_target"))


class ResultsLog:
    """One process's share of results.jsonl: records in input order, each line led by its input index.

    ``finish`` renames the share to `part`; ``merge_results`` makes results.jsonl of the shares.
    """

    def __init__(self, out: OutputDir):
        self._partial = out.tmp / "results.part"
        self._file = open(self._partial, "w", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self.counts = new_counts()

    def add(self, index: int, record: dict[str, Any]) -> None:
        count(self.counts, record)
        self._file.write(f"{index}\t{json.dumps(record, ensure_ascii=False)}\n")

    def finish(self, part: Path) -> None:
        """Flush and move the share to `part`."""
        self._file.close()
        os.replace(self._partial, part)


def merge_results(out: OutputDir, parts: list[Path]) -> dict[str, int]:
    """Merge the processes' shares into OUT/results.jsonl in input order (atomically); returns the counts."""
    counts = new_counts()
    partial = out.tmp / "results.jsonl.partial"
    with contextlib.ExitStack() as stack:
        shares = [_indexed(stack.enter_context(open(part, encoding="utf-8"))) for part in parts]
        merged = stack.enter_context(open(partial, "w", encoding="utf-8"))
        for _index, record in heapq.merge(*shares):
            count(counts, json.loads(record))
            merged.write(record)
    os.replace(partial, out.root / "results.jsonl")
    return counts


def _indexed(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """A share's lines as (input index, record line)."""
    for line in lines:
        index, _, record = line.partition("\t")
        yield int(index), record
