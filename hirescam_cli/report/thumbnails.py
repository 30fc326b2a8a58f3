"""Small JPEG copies of the run's pictures, made once and kept while their source is unchanged.

A picture's file name is a hash of its source (path, size, modification time) and its size class, so
an existing file is up to date by construction: a new or changed source gets a new name, and names no
longer used are removed. The folder of names is the manifest.
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
    """The pictures of one report folder: plans what is missing, makes it, prunes what is unused."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.existing = _listing(folder)
        self.used: set[str] = set()
        self.jobs: list[Job] = []

    def add(
        self, source: Path, sides: tuple[int, ...], identity: str, original: bool = False
    ) -> list[str] | None:
        """Names (relative to the folder) of `source` at each longest side; None if it cannot be read."""
        try:
            stat = source.stat()
        except OSError:
            return None
        names = []
        for side in sides:
            source_id = f"{identity}\0{stat.st_size}\0{stat.st_mtime_ns}\0{side}"
            digest = hashlib.sha1(source_id.encode()).hexdigest()
            names.append(f"{digest[:2]}/{digest[2:22]}.jpg")
        todo = tuple((n, s) for n, s in zip(names, sides, strict=True) if n not in self.existing)
        if todo:
            self.jobs.append(Job(str(source), todo, original))
        self.used.update(names)
        return names

    def make(self, workers: int) -> int:
        """Make every planned picture (in `workers` processes when there are many); returns how many."""
        for name in {n for job in self.jobs for n, _ in job.outputs}:
            (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
        jobs = [(str(self.folder), job) for job in self.jobs]
        if workers > 1 and len(jobs) >= POOL_FROM:
            with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
                made = list(pool.map(_make, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers)))))
        else:
            made = [_make(job) for job in jobs]
        self.existing.update(n for names in made for n in names)
        self.jobs = []
        return sum(map(len, made))

    def has(self, name: str | None) -> bool:
        return name is not None and name in self.existing

    def prune(self) -> int:
        """Remove pictures no longer used; returns how many."""
        stale = self.existing - self.used
        for name in stale:
            (self.folder / name).unlink(missing_ok=True)
        self.existing -= stale
        return len(stale)


def _listing(folder: Path) -> set[str]:
    names = set()
    try:
        subfolders = list(os.scandir(folder))
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
