"""The explain run: inputs -> batches -> engine -> render -> outputs, with progress and resume."""

import collections
import difflib
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from tqdm import tqdm

from . import __version__, render
from .config import Config, ConfigError, PreprocessConfig
from .data import Batch, ImageDataset, Preprocess, make_loader
from .discovery import Catalogue, InputItem
from .distributed import Job
from .engine import Explainer, Explanation
from .engine.layouts import layout_spec
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_RANK_LOST
from .lock import OutLock
from .outputs import (
    SCHEMA,
    SUMMARY_NAME,
    OutputDir,
    OutputError,
    ResultsLog,
    describe,
    folder_files,
    listed_files,
    merge_results,
    png_encoder,
    remove_stale_temp,
    temp_root,
)
from .report import write_report
from .resources import choose as choose_resources
from .sources import load_model
from .sources.common import LoadedModel
from .summary import batch_numbers, image_summary
from .writers import ImageJob, Writers

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PART_PIXELS = 2**24  # overlay pixels handed to the writers at once (48 MiB; one 4096 x 4096 picture)
RENDER_PIXELS = 2**21  # overlay pixels drawn at once on the device (about 30 bytes each while drawn)
PROGRESS_EVERY_S = 5.0


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """'auto' -> cuda, then mps, then cpu; an explicit device that is absent is a config error.

    Under torchrun (`local_rank` set), "auto" and "cuda" mean this process's GPU, cuda:LOCAL_RANK.
    """
    if local_rank is not None and name in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices: "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        return torch.device("cuda", local_rank)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"explain.device = {name!r} but CUDA is not available here; use cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"explain.device = {name!r} but only {torch.cuda.device_count()} CUDA devices exist"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("explain.device = 'mps' but MPS is not available here; use cpu or auto")
    return device


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor copied to host memory: page-locked from CUDA (several times faster); call
    `torch.cuda.current_stream().synchronize()` before reading it."""
    if tensor.device.type != "cuda":
        return tensor.cpu()
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)


def make_preprocess(config: PreprocessConfig, transforms: Any) -> Preprocess:
    """Config values, else the model's preset (torchvision weights, timm), else ImageNet's 256 / 224."""
    resize = config.resize or (_preset_size(transforms.resize_size) if transforms else 256)
    crop = config.crop
    if crop is None and not isinstance(config.resize, tuple):  # an exact resize in the config: no crop
        crop = _preset_size(transforms.crop_size) if transforms else 224
    mean = config.mean or (tuple(transforms.mean) if transforms else IMAGENET_MEAN)
    std = config.std or (tuple(transforms.std) if transforms else IMAGENET_STD)
    preset = getattr(transforms, "interpolation", "bilinear")
    interpolation = config.interpolation or getattr(preset, "value", preset)  # torchvision's is an enum
    _check_crop(config, resize, crop, "the model's preset" if transforms else "the default")
    return Preprocess(resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation)


def _check_crop(config: PreprocessConfig, resize, crop, origin: str) -> None:
    """Refuse a crop larger than the resized picture: the model would see zero padding round every picture."""
    if crop is None or resize is None:
        return
    crop_h, crop_w = (crop, crop) if isinstance(crop, int) else crop
    if isinstance(resize, int):
        larger = max(crop_h, crop_w) > resize  # the shorter side is `resize`, whichever way up the picture is
    else:
        larger = crop_h > resize[0] or crop_w > resize[1]
    if not larger:
        return
    crop_text = (
        f"preprocess.crop = {_size_text(crop)}"
        if config.crop
        else f"the crop of {_size_text(crop)} ({origin})"
    )
    resize_text = (
        f"preprocess.resize = {_size_text(resize)}"
        if config.resize
        else f"the resize of {_size_text(resize)} ({origin})"
    )
    raise ConfigError(
        f"{crop_text} is larger than {resize_text}: the model would see zero padding round every picture; "
        "make the crop at most the resize"
    )


def _size_text(size) -> str:
    return str(size) if isinstance(size, int) else str(list(size))


def _preset_size(size: list[int]) -> int | tuple[int, int]:
    """A preset's [side] or [h, w] as the Preprocess size."""
    return size[0] if len(size) == 1 else (size[0], size[1])


def class_ids(classes: tuple[int | str, ...] | None, labels: list[str] | None) -> list[int] | None:
    """Class ids from ids or label names."""
    if classes is None:
        return None
    ids = []
    for value in classes:
        if isinstance(value, int):
            ids.append(value)
        elif value.isdigit():
            ids.append(int(value))
        elif labels and value in labels:
            ids.append(labels.index(value))
        else:
            close = difflib.get_close_matches(value, labels or [], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (no labels are known; use class ids)"
            raise ConfigError(f"explain.classes: unknown label {value!r}{hint}")
    return list(dict.fromkeys(ids))


def fingerprint(config: Config, model: LoadedModel, preprocess: Preprocess) -> str:
    """What the outputs depend on: the config (less speed knobs), the weights, the package version."""
    settings = config.to_dict()
    for key in ("batch_size", "workers", "device"):
        settings["explain"].pop(key)
    settings["model"].pop("checkpoint")  # the weights' content counts, not the file's name
    settings["preprocess_effective"] = [str(preprocess)]
    digest = hashlib.sha256(json.dumps([SCHEMA, __version__, settings], sort_keys=True).encode())
    for name, tensor in sorted(model.module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ResumeCheck:
    """Picklable test, run in the loader's workers: is this input already done with this config, its folder
    holding exactly the files its summary lists (a folder that holds more or less is redone)?"""

    root: Path
    fingerprint: str

    def __call__(self, item: InputItem, sha256: str) -> bool:
        folder = self.root / item.key
        try:
            summary = json.loads((folder / SUMMARY_NAME).read_bytes())
            if summary.get("sha256") != sha256 or summary.get("fingerprint") != self.fingerprint:
                return False
            return listed_files(summary) == folder_files(folder)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False


class Progress:
    """A tqdm bar on a terminal, a plain line every few seconds otherwise, nothing when quiet."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.errors = total, 0, 0
        self.quiet = quiet
        self.bar = (
            tqdm(total=total, unit="img", file=sys.stderr) if not quiet and sys.stderr.isatty() else None
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
                f"hirescam: {self.done}/{self.total} images ({rate:.1f}/s, {self.errors} errors)",
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


@dataclass(frozen=True)
class Part:
    """Some of a batch's overlays (``render.plan_parts``): channel c of an image is target c % T of method
    c // T (T targets per image, methods in config order)."""

    rows: range  # the images, rows of the batch
    channels: range
    pictures: np.ndarray  # uint8 (len(rows), len(channels), H, W, 3) on the host, padded to the largest


class Renderer:
    """Raw maps of a batch -> overlays on the images' overlay pictures, batched on the device, in parts."""

    def __init__(self, config: Config, device: torch.device):
        self.device = device
        self.methods = config.explain.methods
        self.alpha = config.render.alpha
        self.signed = config.render.signed
        self.table = render.colormap_table(config.render.colormap, device)
        self.signed_table = render.colormap_table(config.render.signed_colormap, device)

    def parts(self, result: Explanation, batch: Batch) -> Iterator[Part]:
        """The batch's overlays in order, in parts of at most PART_PIXELS pixels (one picture at least),
        each drawn in bands of rows of at most RENDER_PIXELS pixels. An image's picture is dropped from
        `batch.images` once its overlays are drawn, so that a batch of huge photos is not held whole."""
        targets = result.classes.shape[1]
        values = {}
        for name in self.methods:
            signed = self.signed and name == "hirescam"
            values[name] = (render.normalize_signed if signed else render.normalize)(result.maps[name])
        sizes = [tuple(image.shape[1:]) for image in batch.images]
        scale = [(w / W, h / H) for (h, w), (H, W) in zip(sizes, batch.sizes, strict=True)]
        boxes = (batch.boxes * torch.tensor(scale, dtype=torch.float64).repeat(1, 2)).to(self.device)
        everything, drawn_on = len(self.methods) * targets, None
        for rows, channels in render.plan_parts(sizes, everything, PART_PIXELS):
            own = batch.images[rows.start : rows.stop]
            if channels.stop == everything:  # the images' last part
                batch.images[rows.start : rows.stop] = [None] * len(rows)
            if not channels:  # no image of the batch has a target
                yield Part(rows, channels, np.zeros((len(rows), 0, 0, 0, 3), np.uint8))
                continue
            if rows != drawn_on:  # an image cut into parts goes to the device once
                images, drawn_on = render.pad_images(own, self.device), rows
            size = (len(rows), len(channels), *images.shape[2:], 3)
            canvas = torch.empty(size, dtype=torch.uint8, device=self.device)
            for method in range(channels.start // targets, (channels.stop - 1) // targets + 1):
                low = max(channels.start, method * targets)  # this method's channels in the part
                high = min(channels.stop, (method + 1) * targets)
                span = range(low - method * targets, high - method * targets)
                into = canvas[:, low - channels.start : high - channels.start]
                name = self.methods[method]
                self._draw(name, values[name], rows, span, boxes, images, into)
            pictures = to_host(canvas)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            yield Part(rows, channels, pictures.numpy())

    def _draw(self, method, values, rows, span, boxes, images, canvas) -> None:
        """Draw targets `span` of `method` (its normalised maps `values`, (B, T, h, w)) for images `rows`
        into canvas (n, len(span), H, W, 3), in bands of rows."""
        signed = self.signed and method == "hirescam"
        table = self.signed_table if signed else self.table
        maps, boxes = values[rows.start : rows.stop, span.start : span.stop], boxes[rows.start : rows.stop]
        height, width = images.shape[2:]
        band = max(1, RENDER_PIXELS // (len(rows) * len(span) * width))
        for top in range(0, height, band):
            lines = range(top, min(height, top + band))
            resampled, inside = render.register(maps, boxes, lines, width)
            under = images[:, :, lines.start : lines.stop]
            drawn = render.overlay(resampled, under, inside, table, self.alpha, signed)
            canvas[:, :, lines.start : lines.stop] = drawn


class ExplainRun:
    """One `hirescam explain` process: set up (failing fast on usage errors), take OUT's lock (rank 0),
    stream this process's batches, finish the ledgers (rank 0 merges every process's share)."""

    def __init__(
        self,
        config: Config,
        items: Catalogue,
        out: Path,
        lock: OutLock,
        job: Job,
        overwrite: bool,
        quiet: bool,
        wait: bool,
        started: float,
        report: bool = False,
    ):
        self.started = started  # before discovery
        self.report = report
        self.config, self.items = config, items
        self.job, self.lock = job, lock
        self.quiet = quiet or not self.job.lead  # progress and messages are shown once, by rank 0
        self.device = pick_device(config.explain.device, self.job.local_rank)
        self.job.connect(self.device)
        self.job.check_same("inputs", f"{len(items)} inputs (digest {items.digest[:16]})")
        job_name = self.job.start(lambda: self._begin(wait))  # rank 0 holds OUT's lock from here
        explain, here = config.explain, self.job.local_world
        self.resources = choose_resources(self.device, explain.workers, explain.batch_size, here)
        torch.set_num_threads(self.resources.threads)
        self.batch_size = self.resources.batch_size
        self.loaded = load_model(config.model)
        self.preprocess = make_preprocess(config.preprocess, self.loaded.transforms)
        self.classes = class_ids(config.explain.classes, self.loaded.labels)
        if config.explain.threshold is not None and not config.model.multilabel:
            raise ConfigError("explain.threshold needs model.multilabel = true (sigmoid outputs)")
        model = self.loaded.module.to(self.device)
        self.explainer = _open_explainer(model, config, self.preprocess, self.device, self.classes)
        self.fingerprint = fingerprint(config, self.loaded, self.preprocess)
        try:
            self.job_dir = temp_root(out) / job_name
            self.out = OutputDir(out, png=config.output.png, tmp=self.job_dir / f"rank{self.job.rank}")
        except BaseException:
            self.explainer.close()
            raise
        skip = None if overwrite else ResumeCheck(self.out.root, self.fingerprint)
        max_pixels, max_side = config.preprocess.max_pixels, config.output.max_side
        dataset = ImageDataset(self.items, self.preprocess, max_pixels, skip=skip, overlay_side=max_side)
        self.loader = make_loader(
            dataset,
            self.batch_size,
            self.resources.workers,
            pin_memory=self.device.type == "cuda",
            batches=self.job.share(len(items), self.batch_size),
        )
        self.log = ResultsLog(self.out)
        self.pending: collections.deque[tuple[int, dict, Future | None]] = collections.deque()
        self.output_error: str | None = None
        self.interrupted = False
        self.layer, self.guarantee = self.explainer.target_layer, None
        blank = torch.zeros((1, 3, *self.preprocess.input_size), device=self.device)
        self.layout = self.explainer.layout(blank).to_dict()  # decided when the explainer was opened
        self.identical: bool | None = None  # every explained target so far identical by construction
        self.zero_gradient = False  # some target's score did not depend on the layer's grid

    def _begin(self, wait: bool) -> str:
        """Rank 0, before anyone writes: take OUT's lock (a job of one holds it already), clear what dead
        runs left; returns a job name."""
        self.lock.acquire(wait, waiting=self.say)
        remove_stale_temp(self.lock.root)
        return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"hirescam: {message}", file=sys.stderr, flush=True)

    def run(self) -> int:
        """Stream this process's batches, then write the ledgers; returns the exit code."""
        processes = f", {self.job.world} processes" if self.job.world > 1 else ""
        where = f"on {self.device}{processes}"
        self.say(f"{len(self.items)} images, model {self.loaded.name}, layer {self.layer}, {where}")
        if self.loaded.random_weights:
            self.say(
                f'note: {self.loaded.name}: model.weights = "none", so it explains a network with random '
                f"weights (seeded: every run gets the same ones); its maps say nothing of a trained model"
            )
        if self.config.output.png == "fast" and png_encoder("fast") != "fpng":
            self.say("fpng cannot be imported here: PNGs are encoded with zlib (slower, smaller)")
        progress = Progress(len(self.items), self.quiet)
        writers = Writers(self.resources.writers)
        renderer = Renderer(self.config, self.device)
        try:
            with StopFlag() as stop:
                try:
                    with torch.no_grad():
                        for batch in self.loader:
                            records = self._batch(batch, renderer, writers)
                            failed = len(batch.failed)
                            del batch  # its pictures are drawn: free them before the next batch comes
                            self.pending.extend((i, *records[i]) for i in sorted(records))
                            progress.advance_to(*self.job.progress(len(records), failed))
                            self._drain(limit=4 * self.batch_size)
                            if self.output_error:
                                break
                            if stop.stopped:
                                self.interrupted = True
                                break
                except KeyboardInterrupt:
                    self.interrupted = True
                finally:
                    writers.shutdown()
                    self._drain(limit=0)
                    self.explainer.close()
                stop.stopped = stop.stopped or self.interrupted
                return self._finish(stop, progress)
        finally:
            progress.close()
            self.lock.release()
            self.job.close()

    def _batch(
        self, batch: Batch, renderer: "Renderer", writers: Writers
    ) -> dict[int, tuple[dict, Future | None]]:
        """index -> (record, its write job or None) of every input of the batch."""
        items = self.items
        records: dict[int, tuple[dict, Future | None]] = {
            i: (_skipped(items[i]), None) for i, _ in batch.skipped
        }
        records |= {i: (_failed(items[i], error), None) for i, error in batch.failed}
        if batch.indices:
            # Every image keeps its slot in a full-size batch (skipped and failed ones leave theirs
            # empty), so a resumed run computes each image with exactly the arithmetic of a whole run.
            slots = torch.tensor([i % self.batch_size for i in batch.indices], device=self.device)
            x = torch.zeros((self.batch_size, *batch.inputs.shape[1:]), device=self.device)
            x[slots] = batch.inputs.to(self.device, non_blocking=True)
            result = _explain(self.explainer, x, self.config, self.classes).select(slots)
            self.guarantee = result.guarantee
            self._note_identical(x[slots[:1]], result)
            self._note_zero_gradient(result)
            records |= _submit(
                writers, self.out, batch, result, renderer, items, self.loaded, self.config, self.fingerprint
            )
        return records

    def _note_identical(self, x: torch.Tensor, result: Explanation) -> None:
        """Track whether HiResCAM == Grad-CAM by construction; say so once, with a layer where they differ."""
        flags = result.identical_by_construction[result.valid]
        if not len(flags):
            return
        identical = bool(flags.all()) and self.identical is not False
        if identical and self.identical is None and not self.quiet:  # searching costs a forward + a gradient
            earlier = self.explainer.differing_layer(x)
            hint = "no earlier layer differs"
            if earlier:
                hint = f"they differ at {earlier!r} (--target-layer {earlier})"
            self.say(
                f"note: HiResCAM and Grad-CAM are identical by construction at {self.layer!r} (its gradient "
                f"is constant over the grid, as behind a global-average-pool head); {hint}"
            )
        self.identical = identical

    def _note_zero_gradient(self, result: Explanation) -> None:
        """Say once when a target's score does not depend on the layer's grid: its maps are all zero."""
        zero = result.zero_gradient[result.valid]
        if self.zero_gradient or not bool(zero.any()):
            return
        self.zero_gradient = True
        constant = bool((result.logits == result.logits[:, :1]).all())
        why = (
            "the model's logits are the same for every class (an untrained head?)"
            if constant
            else "the head does not read this layer's grid for them"
        )
        self.say(
            f"note: some explained classes do not depend on layer {self.layer!r} at all (zero gradient over "
            f"its grid), so their maps are all zero: {why}; summaries mark them zero_gradient"
        )

    def _drain(self, limit: int) -> None:
        """Log finished records in input order until at most `limit` are pending."""
        pending = self.pending
        while pending and (len(pending) > limit or pending[0][2] is None or pending[0][2].done()):
            index, record, future = pending.popleft()
            if future is not None:
                try:
                    future.result()
                except (OSError, OutputError) as e:
                    self.output_error = self.output_error or describe(e)
                    record = _failed(self.items[index], f"cannot write outputs: {describe(e)}")
            self.log.add(index, record)

    def _finish(self, stop: StopFlag, progress: Progress) -> int:
        """Hand in this process's share of the ledger; rank 0 merges the shares into results.jsonl, writes
        run.json, reports, and chooses the exit code."""
        shared = False
        try:
            self.log.finish(self.job_dir / f"rank{self.job.rank}.jsonl")
            shared = True
        except OSError as e:
            self.output_error = self.output_error or describe(e)
        self.job.report(self._rank_report(shared))
        lost, counts = [], self.log.counts
        try:
            if self.job.lead:
                lost, counts = self._merge(stop, progress)
        except OSError as e:
            self.output_error = self.output_error or describe(e)
        finally:
            if self.job.lead:
                shutil.rmtree(self.job_dir, ignore_errors=True)
            self.out.close()
        if self.output_error:
            raise OutputError(f"cannot write outputs under {self.out.root}: {self.output_error}")
        self.say(f"{'interrupted: ' if self.interrupted else ''}{self._tally(counts)} -> {self.out.root}")
        if self.report and self.job.lead:
            self.say(f"report -> {write_report(self.out.root)}")
        if lost:
            self.say(
                f"error: process(es) of rank {', '.join(map(str, lost))} stopped before finishing; "
                "rerun (with any number of processes) to complete the outputs"
            )
            return EXIT_RANK_LOST
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if counts["error"] else EXIT_OK

    def _tally(self, counts: dict[str, int]) -> str:
        """The final line: explained, with no class above the threshold, skipped, failed, not reached."""
        explained = counts["ok"] - counts["no_target"]
        parts = [f"{explained} explained"]
        if counts["no_target"]:
            parts.append(
                f"{counts['no_target']} with no class above {self.config.explain.threshold} (no heatmap)"
            )
        parts += [f"{counts['skipped']} skipped", f"{counts['error']} failed"]
        unreached = len(self.items) - counts["ok"] - counts["skipped"] - counts["error"]
        if unreached:
            parts.append(f"{unreached} not reached")
        return ", ".join(parts)

    def _merge(self, stop: StopFlag, progress: Progress) -> tuple[list[int], dict[str, int]]:
        """Rank 0: wait for the processes' reports, merge their shares, write run.json; returns the ranks
        lost and the job's counts."""
        tick = lambda: progress.advance_to(*self.job.progress(0, 0))  # noqa: E731 - the others' progress
        reports = self.job.reports(lambda: stop.stopped, tick)
        tick()
        done = sorted(rank for rank, report in reports.items() if report["shared"])
        lost = sorted(set(range(self.job.world)) - set(done))
        counts = merge_results(self.out, [self.job_dir / f"rank{rank}.jsonl" for rank in done])
        self.interrupted = self.interrupted or bool(lost) or any(r["interrupted"] for r in reports.values())
        ranks = [reports.get(rank, {"rank": rank, "lost": True}) for rank in range(self.job.world)]
        self._write_run(counts, ranks)
        return lost, counts

    def _rank_report(self, shared: bool) -> dict:
        """This process's part of run.json's "ranks"."""
        elapsed = time.time() - self.started
        counts = self.log.counts
        return {
            "rank": self.job.rank,
            "host": socket.gethostname(),
            "device": str(self.device),
            "counts": counts,
            "seconds": round(elapsed, 3),
            "images_per_second": round(counts["ok"] / elapsed, 3) if elapsed > 0 else None,
            "interrupted": self.interrupted,
            "shared": shared,
        }

    def _write_run(self, counts: dict[str, int], ranks: list[dict]) -> None:
        elapsed = time.time() - self.started
        total = len(self.items)
        run = {
            "schema": "hirescam-cli/run/1",
            "version": __version__,
            "config": self.config.to_dict(),
            "config_file": str(self.config.source) if self.config.source else None,
            "preprocess": str(self.preprocess),
            "model": self.loaded.name,
            "target_layer": self.layer,
            "layout": self.layout,
            "guarantee": self.guarantee,
            "identical_by_construction": self.identical,
            "zero_gradient": self.zero_gradient,
            "random_weights": self.loaded.random_weights,
            "device": str(self.device),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
            },
            "resources": {**self.resources.to_dict(), "processes": self.job.world},
            "png_encoder": png_encoder(self.config.output.png),
            "counts": {
                "inputs": total,
                **counts,
                "not_reached": total - counts["ok"] - counts["skipped"] - counts["error"],
            },
            "interrupted": self.interrupted,
            "timings": {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
                "seconds": round(elapsed, 3),
                "images_per_second": round(counts["ok"] / elapsed, 3) if elapsed > 0 else None,
            },
        }
        if self.job.world > 1:
            run["ranks"] = ranks
        self.out.write_json(self.out.root / "run.json", run)


def _done(item: InputItem, no_target: bool = False) -> dict:
    record = {"input": item.shown, "status": "ok", "summary": f"{item.key}/summary.json"}
    return {**record, "no_target": True} if no_target else record


def _skipped(item: InputItem) -> dict:
    return {"input": item.shown, "status": "skipped", "summary": f"{item.key}/summary.json"}


def _failed(item: InputItem, error: str) -> dict:
    return {"input": item.shown, "status": "error", "error": error}


def _open_explainer(model, config: Config, preprocess: Preprocess, device, classes) -> Explainer:
    """An Explainer already checked on a blank input, so a bad layer or class fails before OUT is touched."""
    explainer = None
    try:
        spec = layout_spec(config.model)
        explainer = Explainer(model, config.model.target_layer, amp=config.explain.amp, layout=spec)
        _explain(explainer, torch.zeros((1, 3, *preprocess.input_size), device=device), config, classes)
    except ValueError as e:
        if explainer is not None:
            explainer.close()
        raise ConfigError(str(e)) from None
    return explainer


def _explain(explainer: Explainer, x: torch.Tensor, config: Config, classes: list[int] | None) -> Explanation:
    explain = config.explain
    with torch.enable_grad():
        if explain.threshold is not None:
            return explainer(x, methods=explain.methods, threshold=explain.threshold)
        if classes is not None:
            return explainer(x, methods=explain.methods, classes=classes)
        return explainer(x, methods=explain.methods, top_k=explain.top_k)


def _submit(
    writers, outdir, batch, result, renderer, items, loaded, config, finger
) -> dict[int, tuple[dict, Future]]:
    """Queue the writes of the batch's good images, part by part of its overlays (Renderer.parts); returns
    index -> (its record, the future of its writes)."""
    methods = config.explain.methods
    targets = result.classes.shape[1]
    numbers = batch_numbers(result, batch.boxes, config.model.multilabel)
    raw_maps = {m: result.maps[m].cpu().numpy() for m in methods} if config.output.save_raw else None
    summaries, columns = [], []  # per row: its summary, and the target axis of summary["targets"][i]
    for row, index in enumerate(batch.indices):
        item = items[index]
        (height, width), (shown_height, shown_width) = batch.sizes[row], batch.images[row].shape[1:]
        base = {
            "schema": SCHEMA,
            "input": item.shown,
            "key": item.key,
            "width": int(width),
            "height": int(height),
            "overlay": {
                "width": int(shown_width),
                "height": int(shown_height),
                "scale": max(shown_width, shown_height) / max(width, height),
            },
            "sha256": batch.sha256[row],
            "model": loaded.name,
            "target_layer": result.target_layer,
            "layout": result.layout.to_dict(),
            "fingerprint": finger,
            "random_weights": loaded.random_weights,
        }

        def files(method: str, cls: int, key: str = item.key) -> tuple[str, str | None]:
            return f"{key}/{method}-{cls}.png", (
                f"{key}/{method}-{cls}.npy" if raw_maps is not None else None
            )

        threshold = config.explain.threshold
        summaries.append(
            image_summary(numbers, row, base, methods, loaded.labels, result.guarantee, files, threshold)
        )
        columns.append([t for t, valid in enumerate(numbers["valid"][row]) if valid])
    everything = range(len(methods) * targets)
    records: dict[int, tuple[dict, Future]] = {}
    cut: dict[int, list[Future]] = {}  # row -> the writes so far of an image whose overlays span parts
    for part in renderer.parts(result, batch):
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
            whole = part.channels == everything
            key = items[batch.indices[row]].key
            jobs.append(ImageJob(key, summaries[row], row - part.rows.start, own, raw, complete=whole))
        futures = writers.submit(outdir, part.pictures, jobs)
        for row, job, future in zip(part.rows, jobs, futures, strict=True):
            index = batch.indices[row]
            record = _done(items[index], "no_target" in job.summary)
            if job.complete:
                records[index] = (record, future)
                continue
            cut.setdefault(row, []).append(future)
            if part.channels.stop == everything.stop:  # its last part
                records[index] = (record, writers.finish(outdir, job.key, job.summary, cut.pop(row)))
    return records
