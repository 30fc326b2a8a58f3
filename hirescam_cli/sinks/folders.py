"""The first sink: a folder per input, OUT/<key>/, holding exactly what its summary lists.

    OUT/a/cat.jpg/summary.json           the input's summary, listing every other file of its folder
    OUT/a/cat.jpg/<method>-<class>.png   a picture per method and target (the modality's; .jpg, .webp
                                         with output.format = "jpeg", "webp")
    OUT/a/cat.jpg/<method>-<class>.npy   the raw map, with --save-raw
    OUT/a/cat.jpg/<method>-<class><suffix>  the modality's other files per map (volumes: .nii.gz)

An input's set is staged and swapped in whole (``OutputDir.replacing``): OUT/<key> holds the old complete
set or the new one, never a mix. Resume knows an input is done when its summary has the input's sha256
and the run's fingerprint and its folder holds exactly the files the summary lists. Writing happens in
the writer pool (writers.py). Imports no torch: the report reads runs through `find_summaries`.
"""

import json
import os
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import OutputError
from ..formats import EXTENSIONS, file_bytes, picture_of
from ..outputs import RESERVED, OutputDir, json_bytes, npy_bytes

SUMMARY_NAME = "summary.json"


def summary_path(key: str) -> str:
    """Where an input's summary is, relative to OUT (results.jsonl records it)."""
    return f"{key}/{SUMMARY_NAME}"


def map_paths(
    key: str,
    method: str,
    cls: int,
    raw: bool,
    picture_format: str = "png",
    extra: dict[str, str] | None = None,
) -> dict[str, str | None]:
    """Where a map's files go, relative to OUT, by summary field: its picture (under its format's name),
    with --save-raw its raw array ("raw"), and the modality's other files (`extra`: field -> name suffix)."""
    stem = f"{key}/{method}-{cls}"
    paths = {picture_format: f"{stem}.{EXTENSIONS[picture_format]}", "raw": f"{stem}.npy" if raw else None}
    return paths | {field: f"{stem}{suffix}" for field, suffix in (extra or {}).items()}


def write_maps(outdir: OutputDir, key: str, summary: dict, pictures, raw_maps, files=None) -> None:
    """Write some of one input's pictures (raw maps, other files) into its staging folder: a huge input's
    come in several parts, from any writer, and `write_image` then puts the whole set in place.

    `pictures[method][t]` is the uint8 (H, W, 3) picture of summary["targets"][t] (or its file bytes,
    encoded on the device), `raw_maps[method][t]` (or raw_maps None) its float32 raw map, and
    `files[(method, t)]` (or files None) its other files by summary field: payloads whose `encode()` gives
    the file's bytes (render.Part).
    """
    staging = outdir.staging(key)
    staging.mkdir(exist_ok=True)
    for method, overlays in pictures.items():
        for t, picture in overlays.items():
            paths = summary["targets"][t]["maps"][method]
            data = file_bytes(picture, outdir.pictures)
            outdir.create(staging / _own_name(key, picture_of(paths) or ""), data)
            if raw_maps is not None:
                outdir.create(staging / _own_name(key, paths["raw"]), npy_bytes(raw_maps[method][t]))
            for field, payload in (files or {}).get((method, t), {}).items():
                outdir.create(staging / _own_name(key, paths[field]), payload.encode())


def write_image(outdir: OutputDir, key: str, summary: dict, pictures, raw_maps, files=None) -> None:
    """Write one input's remaining files (as write_maps; {} when earlier parts wrote them all) and its
    summary, then replace OUT/<key> with the complete set at once."""
    with outdir.replacing(key) as staging:
        write_maps(outdir, key, summary, pictures, raw_maps, files)
        outdir.create(staging / SUMMARY_NAME, json_bytes(summary))


def _own_name(key: str, path: str) -> str:
    """The file name of a path (relative to OUT) that a summary lists in its own folder."""
    folder, _, name = path.rpartition("/")
    if folder != key or name in ("", ".", "..", SUMMARY_NAME):
        raise OutputError(f"refusing to write {path}: it lies outside the folder of {key}")
    return name


def listed_files(summary: dict) -> set[str]:
    """The names of the files a summary says its folder holds, summary.json included: every string field of
    a map is the path of one of its files."""
    names = {SUMMARY_NAME}
    for target in summary["targets"]:
        for fields in target["maps"].values():
            names.update(value.rpartition("/")[2] for value in fields.values() if isinstance(value, str))
    return names


def folder_files(folder: Path) -> set[str]:
    """The names of the files in a folder (its subfolders hold other inputs' outputs)."""
    with os.scandir(folder) as entries:
        return {entry.name for entry in entries if not entry.is_dir(follow_symlinks=False)}


@dataclass(frozen=True)
class ResumeCheck:
    """Picklable test, run in the loader's workers: is this input already done with this config, its folder
    holding exactly the files its summary lists (a folder that holds more or less is redone)?"""

    root: Path
    fingerprint: str

    def __call__(self, item, sha256: str) -> bool:
        folder = self.root / item.key
        try:
            summary = json.loads((folder / SUMMARY_NAME).read_bytes())
            if summary.get("sha256") != sha256 or summary.get("fingerprint") != self.fingerprint:
                return False
            return listed_files(summary) == folder_files(folder)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False


def find_summaries(root: Path) -> list[str]:
    """Every summary under OUT, relative to it, sorted (for a run killed before its ledger)."""
    found = []
    for folder, names, files in os.walk(root):
        if folder == str(root):
            names[:] = [n for n in names if n not in RESERVED]
        names.sort()
        if SUMMARY_NAME in files:
            found.append(summary_path(Path(folder).relative_to(root).as_posix()))
    return sorted(found)


@dataclass(frozen=True)
class ImageJob:
    """One input's pictures in a part of a batch's pictures; `complete`: they are its last, so its summary
    is written with them (else `FolderSink.write` has it written once every part is written)."""

    key: str
    summary: dict
    row: int  # its row in the part's pictures
    maps: list[tuple[int, str, int]]  # (channel of the part's pictures, method, index in summary["targets"])
    raw_maps: (
        dict[str, dict[int, np.ndarray]] | None
    )  # float32 raw maps by method and target, with --save-raw
    complete: bool = True
    files: dict[tuple[str, int], dict] | None = None  # (method, target) -> the modality's other files


def write_job(outdir: OutputDir, job: ImageJob, pictures: np.ndarray | list) -> None:
    """Write one job: its pictures (cut from the part, padded to the largest, to the input's own size; or
    their file bytes) and, when it is the input's last, its summary and the swap (run in a writer thread
    or process)."""
    height, width = job.summary["overlay"]["height"], job.summary["overlay"]["width"]
    own: dict[str, dict[int, np.ndarray | bytes]] = {}
    for channel, method, target in job.maps:
        picture = pictures[job.row][channel]
        own.setdefault(method, {})[target] = (
            picture if isinstance(picture, bytes) else picture[:height, :width]
        )
    if job.complete:
        write_image(outdir, job.key, job.summary, own, job.raw_maps, job.files)
    else:
        write_maps(outdir, job.key, job.summary, own, job.raw_maps, job.files)


def payload_bytes(job: ImageJob) -> int:
    """What a job's other files hold until a writer encodes them."""
    return sum(payload.nbytes for payloads in (job.files or {}).values() for payload in payloads.values())


class FolderSink:
    """A folder per input under OUT, written by a pool of writer threads or processes (writers.py)."""

    summary_path = staticmethod(summary_path)

    def __init__(self, out: OutputDir, writers: int, threads: int = 4):
        from .writers import Writers

        self.out = out
        self.writers = Writers(writers, threads)

    def map_paths(
        self, key: str, method: str, cls: int, raw: bool, extra: dict[str, str] | None = None
    ) -> dict[str, str | None]:
        """Where a map's picture (in the run's format), raw array and the modality's other files go: the
        summary's entry of the map."""
        return map_paths(key, method, cls, raw, self.out.pictures.name, extra)

    def resume_check(self, fingerprint: str) -> ResumeCheck:
        return ResumeCheck(self.out.root, fingerprint)

    def write(
        self,
        keys: Sequence[str],
        summaries: Sequence[dict],
        columns: Sequence[list[int]],
        raw_maps: dict[str, np.ndarray] | None,
        parts,
        methods: Sequence[str],
    ) -> list[Future]:
        """Queue the writes of a batch's inputs (`keys`, their `summaries`), part by part of its pictures
        (the modality renderer's parts: channel m * T + t is target t of method m); a future per input.

        `columns[row]` are the target indices of the batch that summaries[row]["targets"] lists, and
        raw_maps[method] (or None) holds the batch's raw maps, (B, T, *grid).
        """
        futures: dict[int, Future] = {}
        cut: dict[int, list[Future]] = {}  # row -> the writes so far of an input whose pictures span parts
        for part in parts:
            targets = part.targets
            everything = range(len(methods) * targets)
            jobs = []
            for row in part.rows:
                own = [
                    (m * targets + t - part.channels.start, method, i)
                    for m, method in enumerate(methods)
                    for i, t in enumerate(columns[row])
                    if m * targets + t in part.channels
                ]
                raw = None
                if raw_maps is not None:
                    raw = {method: {} for method in methods}
                    for _, method, i in own:
                        raw[method][i] = raw_maps[method][row, columns[row][i]]
                files = {
                    (method, i): part.files[row, part.channels.start + channel]
                    for channel, method, i in own
                    if (row, part.channels.start + channel) in part.files
                }
                whole = part.channels == everything
                at = row - part.rows.start
                jobs.append(ImageJob(keys[row], summaries[row], at, own, raw, whole, files or None))
            if isinstance(part.pictures, np.ndarray):
                extra = sum(map(payload_bytes, jobs))
                written = self.writers.submit(write_job, self.out, part.pictures, jobs, extra)
            else:  # encoded on the device: each input's few file bytes go to its writer alone
                alone = [replace(job, row=0) for job in jobs]
                written = [
                    self.writers.submit(write_job, self.out, [files], [job], payload_bytes(job))[0]
                    for files, job in zip(part.pictures, alone, strict=True)
                ]
            for row, job, future in zip(part.rows, jobs, written, strict=True):
                if job.complete:
                    futures[row] = future
                    continue
                cut.setdefault(row, []).append(future)
                if part.channels.stop == everything.stop:  # its last part
                    finish = (write_image, self.out, job.key, job.summary, {}, None)
                    futures[row] = self.writers.after(cut.pop(row), *finish)
        return [futures[row] for row in range(len(keys))]

    def shutdown(self) -> None:
        """Wait for every queued write."""
        self.writers.shutdown()
