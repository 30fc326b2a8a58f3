"""Output writers: the process pool used on GPUs writes exactly what the thread pool writes."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import config, rgb, run

from hirescam_cli import resources
from hirescam_cli.outputs import OutputDir, OutputError
from hirescam_cli.sinks.folders import ImageJob, write_image, write_job
from hirescam_cli.sinks.writers import Writers

TESTS = Path(__file__).parent


def tree(root: Path) -> dict[Path, bytes]:
    files = (p for p in root.rglob("*") if p.is_file() and p.name not in ("run.json", ".lock"))
    return {p.relative_to(root): p.read_bytes() for p in files}


def test_writer_processes_write_byte_identical_outputs(tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        rgb(21 + i, 17, i).save(images / f"{i}.png")
    (images / "bad.png").write_bytes(b"not an image")
    args = ["-c", config(tmp_path, extra="[output]\nsave_raw = true\n"), "-q", "--top-k", "2"]
    assert run(["explain", images, "-o", tmp_path / "threads", *args], capsys)[0] == 1
    monkeypatch.setattr(resources, "default_writers", lambda device, cores: 2)
    monkeypatch.setenv("PYTHONPATH", str(TESTS.parent))  # spawned writers import the package from here
    assert run(["explain", images, "-o", tmp_path / "processes", *args], capsys)[0] == 1
    threads, processes = tree(tmp_path / "threads"), tree(tmp_path / "processes")
    # results.jsonl, and per good image a summary plus 2 targets x 2 methods x (png, npy)
    assert len(threads) == 1 + 6 * (1 + 2 * 2 * 2)
    assert threads == processes
    assert not (tmp_path / "processes/.tmp").exists()


def summary_of(key: str, width: int, height: int, methods=("hirescam",), targets: int = 1) -> dict:
    """The parts of a summary the writers read: the overlay size and the maps' file names."""
    maps = [{m: {"png": f"{key}/{m}-{t}.png", "raw": None} for m in methods} for t in range(targets)]
    return {"overlay": {"width": width, "height": height}, "targets": [{"maps": m} for m in maps]}


def test_a_write_error_in_a_writer_process_comes_back_as_an_error(tmp_path):
    outdir = OutputDir(tmp_path / "out")
    summary = summary_of("k", 4, 4)
    summary["targets"][0]["maps"]["hirescam"]["png"] = "../../escape.png"
    writers = Writers(processes=1)
    try:
        (future,) = writers.submit(write_job, outdir, np.zeros((1, 1, 4, 4, 3), np.uint8), [
            ImageJob("k", summary, row=0, maps=[(0, "hirescam", 0)], raw_maps=None)
        ])
        with pytest.raises(OutputError, match="outside"):
            future.result()
    finally:
        writers.shutdown()
    assert not (tmp_path / "escape.png").exists()


def test_writer_processes_leave_sigterm_to_the_run(tmp_path):
    """A scheduler's SIGTERM to the whole job must not kill the writers under the run's feet."""
    outdir = OutputDir(tmp_path / "out")
    writers = Writers(processes=2)
    try:
        for pid in writers.pool._processes:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.2)
        pictures = np.zeros((1, 1, 3, 4, 3), np.uint8)
        job = ImageJob("k", summary_of("k", 4, 3), 0, [(0, "hirescam", 0)], None)
        (future,) = writers.submit(write_job, outdir, pictures, [job])
        future.result(timeout=60)
    finally:
        writers.shutdown()
    assert (tmp_path / "out/k/hirescam-0.png").exists()


SHARED_MEMORY_RUN = """
import sys
from pathlib import Path
import numpy as np
from hirescam_cli.outputs import OutputDir
from hirescam_cli.sinks.folders import ImageJob, write_job
from hirescam_cli.sinks.writers import Writers
from test_writers import summary_of

out = OutputDir(Path(sys.argv[1]))
writers = Writers(processes=2)
for batch in range(5):
    pictures = np.full((2, 1, 3, 5, 3), batch, np.uint8)
    keys = [f"b{batch}-{row}" for row in range(2)]
    jobs = [ImageJob(k, summary_of(k, 5, 3), row, [(0, "hirescam", 0)], None) for row, k in enumerate(keys)]
    for future in writers.submit(write_job, out, pictures, jobs):
        future.result()
print(len(writers._all), *(segment.name for segment in writers._all))
writers.shutdown()
"""


def test_shared_memory_is_reused_across_batches_and_freed_once(tmp_path):
    """Writers attach to the run's segments without owning them: no second unlink, no leak warning."""
    done = subprocess.run(
        [sys.executable, "-c", SHARED_MEMORY_RUN, tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])},
    )
    assert done.returncode == 0, done.stderr
    count, *names = done.stdout.split()
    assert count == "1"  # every batch found the first segment free again
    assert not any((Path("/dev/shm") / name.lstrip("/")).exists() for name in names)
    assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr, done.stderr
    assert (tmp_path / "out/b4-1/hirescam-0.png").exists() and (tmp_path / "out/b4-1/summary.json").exists()


class GatedOutput(OutputDir):
    """An OutputDir whose PNG writes wait while its gate is closed (threads only: it is not shared)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.gate = threading.Event()

    def create(self, path: Path, data: bytes) -> None:
        if path.suffix == ".png":
            assert self.gate.wait(timeout=60)
        super().create(path, data)


def test_submit_waits_while_earlier_parts_hold_more_than_the_budget(tmp_path):
    outdir = GatedOutput(tmp_path / "out")
    part = np.zeros((1, 1, 10, 10, 3), np.uint8)  # 300 bytes
    writers = Writers(processes=0, budget=500)
    try:
        jobs = [ImageJob(key, summary_of(key, 10, 10), 0, [(0, "hirescam", 0)], None) for key in "ab"]
        first = writers.submit(write_job, outdir, part, jobs[:1])
        assert writers._queued == part.nbytes  # a part larger than the budget always goes: no deadlock
        later: list = []
        second = lambda: later.extend(writers.submit(write_job, outdir, part, jobs[1:]))  # noqa: E731
        waiting = threading.Thread(target=second)
        waiting.start()
        waiting.join(timeout=0.5)
        assert waiting.is_alive() and not later  # 300 + 300 > 500: waits for the first part
        outdir.gate.set()
        waiting.join(timeout=60)
        for future in first + later:
            future.result(timeout=60)
    finally:
        outdir.gate.set()
        writers.shutdown()
    assert writers._queued == 0
    assert (tmp_path / "out/b/summary.json").exists()


def parts_of(writers, outdir, key: str, summary: dict, pictures: np.ndarray) -> list:
    """Submit each of an image's pictures (methods x targets) as a part of its own."""
    pairs = [(m, t) for t, target in enumerate(summary["targets"]) for m in target["maps"]]
    jobs = [[ImageJob(key, summary, 0, [(0, m, t)], None, False)] for m, t in pairs]
    return [writers.submit(write_job, outdir, pictures[c : c + 1], jobs[c])[0] for c in range(len(pairs))]


def test_the_summary_of_an_image_in_parts_waits_for_every_part(tmp_path):
    outdir = GatedOutput(tmp_path / "out")
    summary = summary_of("k", 4, 3, methods=("hirescam", "gradcam"), targets=2)
    writers = Writers(processes=0, threads=8)  # threads to spare: a summary written too early would show
    try:
        parts = parts_of(writers, outdir, "k", summary, np.zeros((4, 1, 3, 4, 3), np.uint8))
        done = writers.after(parts, write_image, outdir, "k", summary, {}, None)
        with pytest.raises(TimeoutError):
            done.result(timeout=0.3)
        assert not (tmp_path / "out/k/summary.json").exists()
        outdir.gate.set()
        done.result(timeout=60)
    finally:
        outdir.gate.set()
        writers.shutdown()
    assert sorted(p.name for p in (tmp_path / "out/k").iterdir()) == [
        "gradcam-0.png", "gradcam-1.png", "hirescam-0.png", "hirescam-1.png", "summary.json"
    ]


@pytest.mark.parametrize("processes", [0, 2])
def test_parts_write_their_pictures_and_a_failed_part_leaves_no_summary(tmp_path, processes):
    outdir = OutputDir(tmp_path / "out")
    summary = summary_of("k", 4, 3, methods=("hirescam", "gradcam"), targets=2)
    pictures = np.arange(4 * 3 * 4 * 3, dtype=np.uint8).reshape(4, 1, 3, 4, 3)
    bad = summary_of("bad", 4, 3, targets=2)
    bad["targets"][1]["maps"]["hirescam"]["png"] = "../../escape.png"
    writers = Writers(processes=processes)
    try:
        parts = parts_of(writers, outdir, "k", summary, pictures)
        writers.after(parts, write_image, outdir, "k", summary, {}, None).result(60)
        parts = parts_of(writers, outdir, "bad", bad, pictures[:2])
        failed = writers.after(parts, write_image, outdir, "bad", bad, {}, None)
        with pytest.raises(OutputError, match="outside"):
            failed.result(timeout=60)
    finally:
        writers.shutdown()
    with Image.open(tmp_path / "out/k/hirescam-1.png") as png:  # the third picture: target 1's first
        assert np.array_equal(np.asarray(png), pictures[2, 0])
    assert (tmp_path / "out/k/summary.json").exists()
    assert not (tmp_path / "out/bad").exists()  # its written part stayed in staging: nothing of it shows
