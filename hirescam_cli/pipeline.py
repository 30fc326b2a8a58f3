"""The explain run: inputs -> batches -> engine -> render -> outputs, with progress and resume."""

import collections
import difflib
import hashlib
import json
import platform
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from tqdm import tqdm

from . import __version__, render
from .config import Config, ConfigError, PreprocessConfig
from .data import Batch, ImageDataset, InputItem, Preprocess, discover, make_loader
from .engine import Explainer, Explanation
from .models import LoadedModel, load_model
from .outputs import RESERVED, SCHEMA, OutputDir, OutputError, ResultsLog, describe
from .summary import batch_numbers, image_summary

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OUTPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RENDER_PIXELS = 2**24  # pixels rendered at once on the device; bounds memory for huge images
PROGRESS_EVERY_S = 5.0


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda, then mps, then cpu; an explicit device that is absent is a config error."""
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


def default_batch_size(device: torch.device) -> int:
    """Images per batch when the config leaves it open: on CPUs, batches whose activations fit
    the allocator's reuse threshold beat larger ones; GPUs want more work per launch."""
    return 32 if device.type == "cuda" else 8


def make_preprocess(config: PreprocessConfig, transforms: Any) -> Preprocess:
    """Config values, else the torchvision weights' preset, else ImageNet defaults (256 / 224)."""
    resize = config.resize or (transforms.resize_size[0] if transforms else 256)
    crop = config.crop
    if crop is None and not isinstance(resize, tuple):
        crop = transforms.crop_size[0] if transforms else 224
    mean = config.mean or (tuple(transforms.mean) if transforms else IMAGENET_MEAN)
    std = config.std or (tuple(transforms.std) if transforms else IMAGENET_STD)
    return Preprocess(resize=resize, crop=crop, mean=mean, std=std)


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
    """Picklable test, run in the loader's workers: is this input already done with this config?"""

    root: Path
    fingerprint: str

    def __call__(self, item: InputItem, sha256: str) -> bool:
        try:
            summary = json.loads((self.root / item.key / "summary.json").read_bytes())
        except (OSError, ValueError):
            return False
        return summary.get("sha256") == sha256 and summary.get("fingerprint") == self.fingerprint


class Progress:
    """A tqdm bar on a terminal, a plain line every few seconds otherwise, nothing when quiet."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.errors = total, 0, 0
        self.quiet = quiet
        self.bar = (
            tqdm(total=total, unit="img", file=sys.stderr) if not quiet and sys.stderr.isatty() else None
        )
        self.start = self.last = time.monotonic()

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
    """First Ctrl-C asks the run to stop at the next batch boundary; a second one interrupts at once."""

    def __init__(self):
        self.stopped = False
        self._previous = signal.getsignal(signal.SIGINT)

    def __enter__(self) -> "StopFlag":
        signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, _signum: int, _frame: object) -> None:
        if self.stopped:
            raise KeyboardInterrupt
        self.stopped = True
        print(
            "hirescam: stopping after the current batch (Ctrl-C again to abort)", file=sys.stderr, flush=True
        )


class Renderer:
    """Raw maps of a batch -> overlay images at each original size, batched on the device."""

    def __init__(self, config: Config, device: torch.device):
        self.device = device
        self.alpha = config.render.alpha
        self.signed = config.render.signed
        self.table = render.colormap_table(config.render.colormap, device)
        self.signed_table = render.colormap_table(config.render.signed_colormap, device)

    def __call__(self, result: Explanation, batch: Batch) -> dict[str, np.ndarray]:
        """method -> uint8 (B, T, H_max, W_max, 3) on the host."""
        images = render.pad_images(batch.images, self.device)
        boxes = batch.boxes.to(self.device)
        count, height, width = len(batch.images), images.shape[2], images.shape[3]
        out = {}
        for name, maps in result.maps.items():
            signed = self.signed and name == "hirescam"
            values = render.normalize_signed(maps) if signed else render.normalize(maps)
            targets = values.shape[1]
            pictures = []
            step = max(1, RENDER_PIXELS // max(1, targets * height * width))
            for start in range(0, count, step):
                part = slice(start, start + step)
                flat = values[part].flatten(0, 1)
                box = boxes[part].repeat_interleave(targets, 0)
                image = images[part].repeat_interleave(targets, 0)
                resampled, inside = render.register(flat, box, height, width)
                table = self.signed_table if signed else self.table
                pictures.append(render.overlay(resampled, image, inside, table, self.alpha, signed).cpu())
            out[name] = torch.cat(pictures).unflatten(0, (count, targets)).numpy()
        return out


def run_explain(config: Config, inputs: list[str], out: Path, overwrite: bool, quiet: bool) -> int:
    """Explain every input into `out`; returns the exit code."""
    return ExplainRun(config, inputs, out, overwrite, quiet).run()


class ExplainRun:
    """One `hirescam explain`: set up (failing fast on usage errors), stream batches, finish the ledgers."""

    def __init__(self, config: Config, inputs: list[str], out: Path, overwrite: bool, quiet: bool):
        self.started = time.time()
        self.config, self.quiet = config, quiet
        self.items = discover(inputs, RESERVED, exclude=out)
        self.device = pick_device(config.explain.device)
        self.loaded = load_model(config.model)
        self.preprocess = make_preprocess(config.preprocess, self.loaded.transforms)
        self.classes = class_ids(config.explain.classes, self.loaded.labels)
        if config.explain.threshold is not None and not config.model.multilabel:
            raise ConfigError("explain.threshold needs model.multilabel = true (sigmoid outputs)")
        model = self.loaded.module.to(self.device)
        self.explainer = _open_explainer(model, config, self.preprocess, self.device, self.classes)
        self.out = OutputDir(out, png=config.output.png)
        self.fingerprint = fingerprint(config, self.loaded, self.preprocess)
        skip = None if overwrite else ResumeCheck(self.out.root, self.fingerprint)
        dataset = ImageDataset(self.items, self.preprocess, config.preprocess.max_pixels, skip=skip)
        pin = self.device.type == "cuda"
        self.batch_size = config.explain.batch_size or default_batch_size(self.device)
        self.loader = make_loader(dataset, self.batch_size, config.explain.workers, pin_memory=pin)
        self.log = ResultsLog(self.out)
        self.pending: collections.deque[tuple[int, dict | Future]] = collections.deque()
        self.output_error: str | None = None
        self.interrupted = False
        self.layer, self.guarantee = self.explainer.target_layer, None
        self.identical: bool | None = None  # every explained target so far identical by construction

    def say(self, message: str) -> None:
        if not self.quiet:
            print(f"hirescam: {message}", file=sys.stderr, flush=True)

    def run(self) -> int:
        """Stream every batch, then write the ledgers; returns the exit code."""
        self.say(f"{len(self.items)} images, model {self.loaded.name}, layer {self.layer}, on {self.device}")
        progress = Progress(len(self.items), self.quiet)
        writers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hirescam-writer")
        renderer = Renderer(self.config, self.device)
        try:
            with StopFlag() as stop, torch.no_grad():
                for batch in self.loader:
                    records = self._batch(batch, renderer, writers)
                    self.pending.extend(sorted(records.items()))
                    progress.update(len(records), len(batch.failed))
                    self._drain(limit=4 * self.batch_size)
                    if self.output_error:
                        break
                    if stop.stopped:
                        self.interrupted = True
                        break
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            writers.shutdown(wait=True)
            self._drain(limit=0)
            progress.close()
            self.explainer.close()
        return self._finish()

    def _batch(
        self, batch: Batch, renderer: "Renderer", writers: ThreadPoolExecutor
    ) -> dict[int, dict | Future]:
        """Records of the batch's skipped and failed inputs, and write jobs for its good ones."""
        items = self.items
        records: dict[int, dict | Future] = {i: _skipped(items[i]) for i, _ in batch.skipped}
        records |= {i: _failed(items[i], error) for i, error in batch.failed}
        if batch.indices:
            # Every image keeps its slot in a full-size batch (skipped and failed ones leave theirs
            # empty), so a resumed run computes each image with exactly the arithmetic of a whole run.
            slots = torch.tensor([i % self.batch_size for i in batch.indices], device=self.device)
            x = torch.zeros((self.batch_size, *batch.inputs.shape[1:]), device=self.device)
            x[slots] = batch.inputs.to(self.device, non_blocking=True)
            result = _explain(self.explainer, x, self.config, self.classes).select(slots)
            self.guarantee = result.guarantee
            self._note_identical(x[slots[:1]], result)
            pictures = renderer(result, batch)
            records |= _submit(
                writers, self.out, batch, result, pictures, items, self.loaded, self.config, self.fingerprint
            )
        return records

    def _note_identical(self, x: torch.Tensor, result: Explanation) -> None:
        """Track whether HiResCAM == Grad-CAM by construction; say so once, with a layer where they differ."""
        flags = result.identical_by_construction[result.valid]
        if not len(flags):
            return
        identical = bool(flags.all()) and self.identical is not False
        if identical and self.identical is None:
            earlier = self.explainer.differing_layer(x)
            hint = "no earlier layer differs"
            if earlier:
                hint = f"they differ at {earlier!r} (--target-layer {earlier})"
            self.say(
                f"note: HiResCAM and Grad-CAM are identical by construction at {self.layer!r} (its gradient "
                f"is constant over the grid, as behind a global-average-pool head); {hint}"
            )
        self.identical = identical

    def _drain(self, limit: int) -> None:
        """Log finished records in input order until at most `limit` are pending."""
        pending = self.pending
        while pending and (
            len(pending) > limit or not isinstance(pending[0][1], Future) or pending[0][1].done()
        ):
            index, record = pending.popleft()
            if isinstance(record, Future):
                try:
                    record = record.result()
                except (OSError, OutputError) as e:
                    self.output_error = self.output_error or describe(e)
                    record = _failed(self.items[index], f"cannot write outputs: {describe(e)}")
            self.log.add(record)

    def _finish(self) -> int:
        """Move results.jsonl into place, write run.json, report, and choose the exit code."""
        try:
            self.log.finish()
            self._write_run()
        except OSError as e:
            self.output_error = self.output_error or describe(e)
        finally:
            self.out.close()
        if self.output_error:
            raise OutputError(f"cannot write outputs under {self.out.root}: {self.output_error}")
        counts = self.log.counts
        done = f"{counts['ok']} explained, {counts['skipped']} skipped, {counts['error']} failed"
        self.say(f"{done} -> {self.out.root}")
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILED if counts["error"] else EXIT_OK

    def _write_run(self) -> None:
        elapsed = time.time() - self.started
        counts, total = self.log.counts, len(self.items)
        run = {
            "schema": "hirescam-cli/run/1",
            "version": __version__,
            "config": self.config.to_dict(),
            "config_file": str(self.config.source) if self.config.source else None,
            "preprocess": str(self.preprocess),
            "model": self.loaded.name,
            "target_layer": self.layer,
            "guarantee": self.guarantee,
            "identical_by_construction": self.identical,
            "device": str(self.device),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
            },
            "counts": {"inputs": total, **counts, "not_reached": total - sum(counts.values())},
            "interrupted": self.interrupted,
            "timings": {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
                "seconds": round(elapsed, 3),
                "images_per_second": round(counts["ok"] / elapsed, 3) if elapsed > 0 else None,
            },
        }
        self.out.write_json(self.out.root / "run.json", run)


def _skipped(item: InputItem) -> dict:
    return {"input": item.shown, "status": "skipped", "summary": f"{item.key}/summary.json"}


def _failed(item: InputItem, error: str) -> dict:
    return {"input": item.shown, "status": "error", "error": error}


def _open_explainer(model, config: Config, preprocess: Preprocess, device, classes) -> Explainer:
    """An Explainer already checked on a blank input, so a bad layer or class fails before OUT is touched."""
    explainer = None
    try:
        explainer = Explainer(model, config.model.target_layer, amp=config.explain.amp)
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


def _submit(writers, outdir, batch, result, pictures, items, loaded, config, finger) -> dict[int, Future]:
    """Queue one write job per good image of the batch; returns index -> future of its record."""
    methods = config.explain.methods
    numbers = batch_numbers(result, batch.boxes, config.model.multilabel)
    raw_maps = {m: result.maps[m].cpu().numpy() for m in methods} if config.output.save_raw else None
    jobs = {}
    for row, index in enumerate(batch.indices):
        item, image = items[index], batch.images[row]
        base = {
            "schema": SCHEMA,
            "input": item.shown,
            "key": item.key,
            "width": int(image.shape[2]),
            "height": int(image.shape[1]),
            "sha256": batch.sha256[row],
            "model": loaded.name,
            "target_layer": result.target_layer,
            "fingerprint": finger,
        }

        def files(method: str, cls: int, key: str = item.key) -> tuple[str, str | None]:
            return f"{key}/{method}-{cls}.png", (
                f"{key}/{method}-{cls}.npy" if raw_maps is not None else None
            )

        summary = image_summary(numbers, row, base, methods, loaded.labels, result.guarantee, files)
        columns = [t for t, valid in enumerate(numbers["valid"][row]) if valid]  # of summary["targets"]
        jobs[index] = writers.submit(_write_image, outdir, item, summary, pictures, raw_maps, row, columns)
    return jobs


def _write_image(outdir: OutputDir, item: InputItem, summary: dict, pictures, raw_maps, row, columns) -> dict:
    """Write one image's PNGs (and raw maps), then its summary last; returns its results record.

    `columns[i]` is the target axis of `pictures` that holds summary["targets"][i].
    """
    height, width = summary["height"], summary["width"]
    for t, target in zip(columns, summary["targets"], strict=True):
        for method, files in target["maps"].items():
            outdir.write_png(outdir.root / files["png"], pictures[method][row, t, :height, :width])
            if raw_maps is not None:
                outdir.write_npy(outdir.root / files["raw"], raw_maps[method][row, t])
    outdir.write_json(outdir.summary_path(item.key), summary)
    return {"input": item.shown, "status": "ok", "summary": f"{item.key}/summary.json"}
