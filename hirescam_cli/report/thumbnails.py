"""Small JPEG copies of the run's pictures, made once and kept while their source is unchanged.

A picture's file name is a hash of its source (path, size, modification time) and its size class, so
an existing file is up to date by construction: a new or changed source gets a new name, and names no
longer used are removed (the report's manifest says which; see chunks.py).
"""

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from PIL import Image, ImageOps

from ..modalities.image_files import rgb_array  # the run's own conversion of every mode to RGB

THUMB_SIDE = 160  # grid thumbnails (shown at 128 CSS pixels): longest side in pixels
VIEW_SIDE = 640  # the original as the viewer shows it (the run's overlays are linked as they are)
QUALITY = 80
POOL_FROM = 64  # fewer jobs than this run in this process


@dataclass(frozen=True)
class Job:
    """Make `outputs` ((relative path, longest side), ...) from one source image."""

    source: str
    outputs: tuple[tuple[str, int], ...]
    original: bool  # an input file in any format (EXIF orientation applied) rather than a run PNG


class Thumbnails:
    """The pictures of one report folder: names them, makes the missing ones, removes unused ones.

    Use it as a context manager: the processes that make pictures live until it closes.
    """

    def __init__(self, folder: Path, workers: int):
        self.folder = folder
        self.workers = workers
        self.jobs: list[Job] = []
        self.planned: set[str] = set()  # names of the jobs not yet made
        self.failed: set[str] = set()  # names that could not be made (unreadable sources)
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "Thumbnails":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    @staticmethod
    def names(identity: str, stamp: tuple[int, int], sides: tuple[int, ...]) -> list[str]:
        """The names of a source's pictures at each longest side, from its identity, size and mtime."""
        names = []
        for side in sides:
            digest = hashlib.sha1(f"{identity}\0{stamp[0]}\0{stamp[1]}\0{side}".encode()).hexdigest()
            names.append(f"{digest[:2]}/{digest[2:22]}.jpg")
        return names

    def add(self, source: str, names: list[str], sides: tuple[int, ...], original: bool) -> None:
        """Plan the pictures of `source` (named by `names`) that are neither on disk nor planned."""
        folder = str(self.folder)
        todo = tuple(
            (n, s)
            for n, s in zip(names, sides, strict=True)
            if n not in self.planned and not os.path.exists(os.path.join(folder, n))
        )
        if todo:
            self.jobs.append(Job(source, todo, original))
            self.planned.update(n for n, _ in todo)

    def make(self) -> int:
        """Make every planned picture (in `workers` processes when there are many); returns how many."""
        for name in {n for job in self.jobs for n, _ in job.outputs}:
            (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
        jobs = [(str(self.folder), job) for job in self.jobs]
        if self.workers > 1 and len(jobs) >= POOL_FROM:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("fork"))
            chunksize = max(1, min(64, len(jobs) // (8 * self.workers)))
            made = list(self._pool.map(_make, jobs, chunksize=chunksize))
        else:
            made = [_make(job) for job in jobs]
        done = {n for names in made for n in names}
        self.failed |= self.planned - done
        self.jobs, self.planned = [], set()
        return len(done)

    def remove(self, names: set[str]) -> None:
        """Remove pictures no card uses any more."""
        for name in names:
            (self.folder / name).unlink(missing_ok=True)

    def listing(self) -> set[str]:
        """Every picture in the folder."""
        names = set()
        try:
            subfolders = list(os.scandir(self.folder))
        except OSError:
            return names
        for sub in subfolders:
            if sub.is_dir(follow_symlinks=False):
                names.update(f"{sub.name}/{e.name}" for e in os.scandir(sub.path) if e.name.endswith(".jpg"))
        return names


def _make(task: tuple[str, Job]) -> list[str]:
    """Write one job's pictures atomically; returns the names written (none when the source is unreadable)."""
    folder, job = task
    try:
        with Image.open(job.source) as image:
            if job.original:
                image.draft("RGB", (max(s for _, s in job.outputs),) * 2)  # JPEG: decode at a reduced scale
                image = ImageOps.exif_transpose(image)
            picture = Image.fromarray(rgb_array(image)) if job.original else image.convert("RGB")
    except Exception:  # an unreadable or changed source: the card says so instead
        return []
    made = []
    for name, side in sorted(job.outputs, key=lambda o: -o[1]):
        picture.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
        path = Path(folder) / name
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            picture.save(temp, "JPEG", quality=QUALITY)
            os.replace(temp, path)
        except OSError:
            temp.unlink(missing_ok=True)
            raise
        made.append(name)
    return made
