"""The output folder: its layout, atomic writes, resume checks and the run's ledgers.

Layout under OUT, for an input whose key is `a/cat.jpg`:
    a/cat.jpg/summary.json           the per-image summary (written last)
    a/cat.jpg/<method>-<class>.png   one heatmap overlay per method and target
    a/cat.jpg/<method>-<class>.npy   the raw map, with --save-raw
    results.jsonl                    one line per input, in input order
    run.json                         the effective config, versions, device, counts, timings
    .lock                            the OUT lock (lock.py)
    report/, eval.html               the HTML report and eval page (hirescam_cli.report)
Each process writes its temporary files in a folder of its own under OUT/.tmp and renames them into
place, so a reader never sees half a file and no run touches another's files.
"""

import contextlib
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

try:
    import fpng
except ImportError:  # the fast encoder is optional: PNGs then come from zlib (--png small)
    fpng = None

SCHEMA = "hirescam-cli/summary/1"
LOCK_NAME = ".lock"
# names under OUT that no input key takes
RESERVED = ("results.jsonl", "run.json", "eval.json", "eval.html", "report", ".tmp", LOCK_NAME)


class OutputError(Exception):
    """Outputs cannot be written (no permission, disk full); the run stops."""


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
        except OSError as e:
            raise OutputError(f"cannot use output folder {self.root}: {describe(e)}") from None
        self._real_root = self.root.resolve()

    def folder(self, key: str) -> Path:
        """The folder of one input's outputs."""
        return self.root / key

    def summary_path(self, key: str) -> Path:
        return self.folder(key) / "summary.json"

    def write(self, path: Path, data: bytes) -> None:
        """Write bytes to path atomically: a temp file in OUT/.tmp, then a rename."""
        parent = path.parent
        if not parent.resolve().is_relative_to(self._real_root):
            raise OutputError(f"refusing to write {path}: it resolves outside {self.root}")
        parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            temp = self.tmp / f"{os.getpid()}-{next(self._names)}"
        try:
            with open(temp, "wb") as f:
                f.write(data)
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def write_png(self, path: Path, pixels: np.ndarray) -> None:
        """An (H, W, 3) uint8 array as a PNG, encoded the same way every time."""
        self.write(path, encode_png(pixels, self.png))

    def write_npy(self, path: Path, array: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        self.write(path, buffer.getvalue())

    def write_json(self, path: Path, value: Any) -> None:
        self.write(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())

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


def write_maps(outdir: OutputDir, summary: dict, pictures, raw_maps) -> None:
    """Write some of one image's PNGs (and raw maps): a huge image's come in several parts.

    `pictures[method][t]` is the uint8 (H, W, 3) overlay of summary["targets"][t], `raw_maps[method][t]`
    (or raw_maps None) its float32 (h, w) raw map.
    """
    for method, overlays in pictures.items():
        for t, pixels in overlays.items():
            files = summary["targets"][t]["maps"][method]
            outdir.write_png(outdir.root / files["png"], pixels)
            if raw_maps is not None:
                outdir.write_npy(outdir.root / files["raw"], raw_maps[method][t])


def write_image(outdir: OutputDir, key: str, summary: dict, pictures, raw_maps) -> None:
    """Write one image's remaining PNGs and raw maps (as write_maps; {} when earlier parts wrote them all),
    then its summary last, so a summary means complete."""
    write_maps(outdir, summary, pictures, raw_maps)
    outdir.write_json(outdir.summary_path(key), summary)


class ResultsLog:
    """One process's share of results.jsonl: records in input order, each line led by its input index.

    ``finish`` renames the share to `part`; ``merge_results`` makes results.jsonl of the shares.
    """

    def __init__(self, out: OutputDir):
        self._partial = out.tmp / "results.part"
        self._file = open(self._partial, "w", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self.counts = {"ok": 0, "skipped": 0, "error": 0}

    def add(self, index: int, record: dict[str, Any]) -> None:
        self.counts[record["status"]] += 1
        self._file.write(f"{index}\t{json.dumps(record, ensure_ascii=False)}\n")

    def finish(self, part: Path) -> None:
        """Flush and move the share to `part`."""
        self._file.close()
        os.replace(self._partial, part)


def merge_results(out: OutputDir, parts: list[Path]) -> dict[str, int]:
    """Merge the processes' shares into OUT/results.jsonl in input order (atomically); returns the counts."""
    counts = {"ok": 0, "skipped": 0, "error": 0}
    partial = out.tmp / "results.jsonl.partial"
    with contextlib.ExitStack() as stack:
        shares = [_indexed(stack.enter_context(open(part, encoding="utf-8"))) for part in parts]
        merged = stack.enter_context(open(partial, "w", encoding="utf-8"))
        for _index, record in heapq.merge(*shares):
            counts[json.loads(record)["status"]] += 1
            merged.write(record)
    os.replace(partial, out.root / "results.jsonl")
    return counts


def _indexed(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """A share's lines as (input index, record line)."""
    for line in lines:
        index, _, record = line.partition("\t")
        yield int(index), record
