"""Output writers: the process pool used on GPUs writes exactly what the thread pool writes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli import config, rgb, run

from hirescam_cli import resources
from hirescam_cli.outputs import OutputDir, OutputError
from hirescam_cli.writers import ImageJob, Writers

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


def test_a_write_error_in_a_writer_process_comes_back_as_an_error(tmp_path):
    outdir = OutputDir(tmp_path / "out")
    summary = {"width": 4, "height": 4, "targets": [{"maps": {"hirescam": {"png": "../../escape.png"}}}]}
    writers = Writers(processes=1)
    try:
        (future,) = writers.submit(outdir, {"hirescam": np.zeros((1, 1, 4, 4, 3), np.uint8)}, [
            ImageJob("k", summary, row=0, columns=[0], raw_maps=None)
        ])
        with pytest.raises(OutputError, match="outside"):
            future.result()
    finally:
        writers.shutdown()
    assert not (tmp_path / "escape.png").exists()


def test_writer_processes_leave_sigterm_to_the_run(tmp_path):
    """A scheduler's SIGTERM to the whole job must not kill the writers under the run's feet."""
    outdir = OutputDir(tmp_path / "out")
    summary = {"width": 4, "height": 3, "targets": [{"maps": {"hirescam": {"png": "k/h.png"}}}]}
    writers = Writers(processes=2)
    try:
        for pid in writers.pool._processes:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.2)
        pictures = {"hirescam": np.zeros((1, 1, 3, 4, 3), np.uint8)}
        (future,) = writers.submit(outdir, pictures, [ImageJob("k", summary, 0, [0], None)])
        future.result(timeout=60)
    finally:
        writers.shutdown()
    assert (tmp_path / "out/k/h.png").exists()


SHARED_MEMORY_RUN = """
import sys
from pathlib import Path
import numpy as np
from hirescam_cli.outputs import OutputDir
from hirescam_cli.writers import ImageJob, Writers

out = OutputDir(Path(sys.argv[1]))
writers = Writers(processes=2)
for batch in range(5):
    pictures = {"hirescam": np.full((2, 1, 3, 5, 3), batch, np.uint8)}
    maps = lambda key: {"hirescam": {"png": f"{key}/h.png"}}
    jobs = [
        ImageJob(f"b{batch}-{row}", {"width": 5, "height": 3, "targets": [{"maps": maps(f"b{batch}-{row}")}]},
                 row=row, columns=[0], raw_maps=None)
        for row in range(2)
    ]
    for future in writers.submit(out, pictures, jobs):
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
    )
    assert done.returncode == 0, done.stderr
    count, *names = done.stdout.split()
    assert count == "1"  # every batch found the first segment free again
    assert not any((Path("/dev/shm") / name.lstrip("/")).exists() for name in names)
    assert "resource_tracker" not in done.stderr and "leaked" not in done.stderr, done.stderr
    assert (tmp_path / "out/b4-1/h.png").exists() and (tmp_path / "out/b4-1/summary.json").exists()
