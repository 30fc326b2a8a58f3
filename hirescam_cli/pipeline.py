"""The explain run, an orchestrator: inputs -> batches -> engine -> the modality's pictures -> the sink,
with the ledgers, progress and resume.

What it orchestrates lives elsewhere: the session (session.py: device, model, modality, classes, the
checked Explainer), batches (batches.py), the sink (sinks/), the ledgers (ledger.py), progress and
signals (progress.py) and the job of several processes (distributed.py).
"""

import collections
import os
import shutil
import socket
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import torch

from . import ledger, render
from .batches import Batch, InputDataset, make_loader
from .config import Config
from .discovery import Catalogue
from .distributed import Job
from .engine import Explanation
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_RANK_LOST, OutputError
from .formats import PictureFormat, png_encoder
from .lock import OutLock
from .outputs import OutputDir, describe, remove_stale_temp, temp_root
from .progress import Progress, StopFlag
from .report import write_report
from .session import Session, pick_device
from .sinks import open_sink
from .summary import SCHEMA, batch_numbers, image_summary


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
        device = pick_device(config.explain.device, self.job.local_rank)
        self.job.connect(device)
        self.job.check_same("inputs", f"{len(items)} inputs (digest {items.digest[:16]})")
        job_name = self.job.start(lambda: self._begin(wait))  # rank 0 holds OUT's lock from here
        self.session = session = Session.open(config, self.job, device)
        self.batch_size = session.resources.batch_size
        self.fingerprint = session.fingerprint()
        try:
            self.job_dir = temp_root(out) / job_name
            output = config.output
            self.pictures = PictureFormat(output.format, output.quality, output.png)
            self.out = OutputDir(out, self.pictures, tmp=self.job_dir / f"rank{self.job.rank}")
            resources = session.resources
            self.sink = open_sink(config.output.sink, self.out, resources.writers, resources.writer_threads)
        except BaseException:
            session.close()
            raise
        skip = None if overwrite else self.sink.resume_check(self.fingerprint)
        self.loader = make_loader(
            InputDataset(items, session.modality, skip=skip),
            self.batch_size,
            session.resources.workers,
            pin_memory=device.type == "cuda",
            batches=self.job.share(len(items), self.batch_size),
        )
        self.log = ledger.ResultsLog(self.out)
        self.pending: collections.deque[tuple[int, dict, Future | None]] = collections.deque()
        self.output_error: str | None = None
        self.interrupted = False
        self.guarantee: bool | None = None
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
        session = self.session
        processes = f", {self.job.world} processes" if self.job.world > 1 else ""
        where = f"layer {session.explainer.target_layer}, on {session.device}{processes}"
        self.say(f"{len(self.items)} {session.modality.noun}s, model {session.loaded.name}, {where}")
        if session.loaded.random_weights:
            self.say(
                f'note: {session.loaded.name}: model.weights = "none", so it explains a network with random '
                f"weights (seeded: every run gets the same ones); its maps say nothing of a trained model"
            )
        if self.pictures.name == "png" and self.pictures.png == "fast" and png_encoder("fast") != "fpng":
            self.say("fpng cannot be imported here: PNGs are encoded with zlib (slower, smaller)")
        progress = Progress(len(self.items), self.quiet)
        renderer = session.modality.renderer(self.config, session.device, session.loaded.labels)
        try:
            with StopFlag() as stop:
                try:
                    with torch.no_grad():
                        for batch in self.loader:
                            batch = session.modality.finish(batch, session.device)
                            records = self._batch(batch, renderer)
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
                    self.sink.shutdown()
                    self._drain(limit=0)
                    session.close()
                stop.stopped = stop.stopped or self.interrupted
                return self._finish(stop, progress)
        finally:
            progress.close()
            self.lock.release()
            self.job.close()

    def _batch(self, batch: Batch, renderer) -> dict[int, tuple[dict, Future | None]]:
        """index -> (record, its write job or None) of every input of the batch."""
        items, sink = self.items, self.sink
        records: dict[int, tuple[dict, Future | None]] = {
            i: (ledger.skipped(items[i], sink.summary_path(items[i].key)), None) for i, _ in batch.skipped
        }
        records |= {i: (ledger.failed(items[i], error), None) for i, error in batch.failed}
        if batch.indices:
            # Every input keeps its slot in a full-size batch (skipped and failed ones leave theirs
            # empty), so a resumed run computes each input with exactly the arithmetic of a whole run.
            device = self.session.device
            own = [i % self.batch_size for i in batch.indices]
            slots = torch.tensor(own, device=device)
            x = batch.inputs.to(device, non_blocking=True)
            if own != list(range(self.batch_size)):  # not a whole batch: the others' slots stay zero
                x = torch.zeros((self.batch_size, *x.shape[1:]), device=device).index_copy_(0, slots, x)
            result = self.session.explain(x).select(slots)
            self.guarantee = result.guarantee
            self._note_identical(x[slots[:1]], result)
            self._note_zero_gradient(result)
            records |= self._write(batch, result, renderer)
        return records

    def _write(self, batch: Batch, result: Explanation, renderer) -> dict[int, tuple[dict, Future]]:
        """Hand the batch's good inputs to the sink: their summaries, raw maps and pictures (in parts)."""
        session, sink, config, modality = self.session, self.sink, self.config, self.session.modality
        methods, save_raw = config.explain.methods, config.output.save_raw
        extra = modality.numbers(result, batch.views)
        numbers = batch_numbers(
            result, session.multilabel, lambda maps: modality.locate(maps, batch.views), extra
        )
        map_files = modality.map_files(save_raw)
        raw_maps = {m: result.maps[m].cpu().numpy() for m in methods} if save_raw else None
        keys = [self.items[index].key for index in batch.indices]
        summaries, columns = [], []  # per row: its summary, and the targets of the batch it lists
        for row, (index, key) in enumerate(zip(batch.indices, keys, strict=True)):
            base = {
                "schema": SCHEMA,
                "input": self.items[index].shown,
                "key": key,
                **modality.describe(batch.views, row),
                "sha256": batch.sha256[row],
                "model": session.loaded.name,
                "target_layer": result.target_layer,
                "layout": result.layout.to_dict(),
                "fingerprint": self.fingerprint,
                "random_weights": session.loaded.random_weights,
            }

            def files(method: str, cls: int, key: str = key) -> dict[str, str | None]:
                return sink.map_paths(key, method, cls, save_raw, map_files)

            summary = image_summary(
                numbers,
                row,
                base,
                methods,
                session.loaded.labels,
                result.guarantee,
                files,
                config.explain.threshold,
                tuple(extra),
            )
            summaries.append(summary)
            columns.append([t for t, valid in enumerate(numbers["valid"][row]) if valid])
        futures = sink.write(keys, summaries, columns, raw_maps, renderer.parts(result, batch), methods)
        return {
            index: (ledger.done(self.items[index], sink.summary_path(key), "no_target" in summary), future)
            for index, key, summary, future in zip(batch.indices, keys, summaries, futures, strict=True)
        }

    def _note_identical(self, x: torch.Tensor, result: Explanation) -> None:
        """Track whether HiResCAM == Grad-CAM by construction; say so once, with a layer where they differ."""
        flags = result.identical_by_construction[result.valid]
        if not len(flags):
            return
        identical = bool(flags.all()) and self.identical is not False
        if identical and self.identical is None and not self.quiet:  # searching costs a forward + a gradient
            explainer = self.session.explainer
            earlier = explainer.differing_layer(x)
            hint = "no earlier layer differs"
            if earlier:
                hint = f"they differ at {earlier!r} (--target-layer {earlier})"
            self.say(
                f"note: HiResCAM and Grad-CAM are identical by construction at {explainer.target_layer!r} "
                f"(its gradient is constant over the grid, as behind a global-average-pool head); {hint}"
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
            f"note: some explained classes do not depend on layer {result.target_layer!r} at all (zero "
            f"gradient over its grid), so their maps are all zero: {why}; summaries mark them zero_gradient"
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
                    record = ledger.failed(self.items[index], f"cannot write outputs: {describe(e)}")
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
        counts = ledger.merge_results(self.out, [self.job_dir / f"rank{rank}.jsonl" for rank in done])
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
            "device": str(self.session.device),
            "counts": counts,
            "seconds": round(elapsed, 3),
            "images_per_second": round(counts["ok"] / elapsed, 3) if elapsed > 0 else None,
            "interrupted": self.interrupted,
            "shared": shared,
        }

    def _pictures(self) -> dict:
        """How the overlays were encoded, and where: run.json's "pictures"."""
        on_device = render.device_encoder(self.pictures, self.session.device) is not None
        return {
            "format": self.pictures.name,
            "quality": self.pictures.quality if self.pictures.name != "png" else None,
            "encoder": "nvjpeg" if on_device else self.pictures.encoder(),
            "encoded_on": str(self.session.device) if on_device else "host",
        }

    def _write_run(self, counts: dict[str, int], ranks: list[dict]) -> None:
        elapsed = time.time() - self.started
        total = len(self.items)
        facts = self.session.describe()
        run = {
            "schema": "hirescam-cli/run/1",
            **{key: facts[key] for key in ("version", "config", "config_file", "preprocess", "model")},
            "target_layer": facts["target_layer"],
            "layout": facts["layout"],
            "guarantee": self.guarantee,
            "identical_by_construction": self.identical,
            "zero_gradient": self.zero_gradient,
            "random_weights": facts["random_weights"],
            **{key: facts[key] for key in ("device", "versions", "resources")},
            "png_encoder": png_encoder(self.config.output.png),
            "pictures": self._pictures(),
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
