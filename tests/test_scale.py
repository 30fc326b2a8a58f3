"""Past one process: torchrun jobs, the OUT lock, path lists, empty inputs, and the defaults by machine."""

import ctypes
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import config, run
from test_faults import folder, tree

from hirescam_cli import formats, outputs, resources
from hirescam_cli.batches import InputDataset, make_loader
from hirescam_cli.discovery import InputError, catalogue, discover
from hirescam_cli.distributed import Share
from hirescam_cli.errors import EXIT_LOCKED, EXIT_RANK_LOST
from hirescam_cli.lock import OutLock, OutputLocked
from hirescam_cli.modalities.image_files import ImageError, decode
from hirescam_cli.modalities.images import Images, Preprocess

TESTS = Path(__file__).parent
TIMEOUT = 240  # seconds any subprocess may take before the test fails (and kills it): nothing hangs


@pytest.fixture(autouse=True)
def importable_tiny_models(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def environment(gate: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *sys.path])
    return {**env, "HIRESCAM_TEST_GATE": str(gate)} if gate else env


def launch(
    args: list,
    cwd: Path,
    processes: int | None = None,
    gate: Path | None = None,
    stderr=subprocess.PIPE,
    **options,
) -> subprocess.Popen:
    """`python -m hirescam_cli ARGS`, or under torchrun with `processes` processes, in its own session;
    a gated_net model waits at its second batch while the file `gate` exists."""
    runner = [sys.executable, "-m", "hirescam_cli"]
    if processes is not None:
        runner = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        runner += ["--nproc-per-node", str(processes), "-m", "hirescam_cli"]
    return subprocess.Popen(
        [*runner, *map(str, args)],
        env=environment(gate),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
        **options,
    )


def closed_gate(tmp_path: Path) -> Path:
    gate = tmp_path / "gate"
    gate.touch()
    return gate


def finish(process: subprocess.Popen, stdin: bytes | None = None) -> tuple[int, str]:
    """Wait for a process (killing its whole group on timeout); returns (exit code, stderr)."""
    try:
        _, err = process.communicate(stdin, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the run hung")
    return process.returncode, (err or b"").decode(errors="replace")


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def outputs_of(out: Path) -> dict[str, bytes]:
    """Every output file but the ledgers (a resumed run's results.jsonl says "skipped")."""
    return {k: v for k, v in tree(out).items() if k != "results.jsonl"}


def wait_for(condition, process: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended early: {process.communicate()}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("the run made no progress")
        time.sleep(0.05)


def rank_pid(torchrun: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker process with this RANK among torchrun's children."""
    children = Path(f"/proc/{torchrun.pid}/task/{torchrun.pid}/children").read_text().split()
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


# ---------------------------------------------------------------------------------------------------
# torchrun


def test_two_processes_give_the_one_process_outputs_and_one_ledger(tmp_path, capsys):
    images = folder(tmp_path / "images", 11)  # 3 batches of 4: ranks take batches 0, 2 and 1
    cfg = config(tmp_path)
    assert run(["explain", images, "-o", tmp_path / "one", "-c", cfg, "-q"], capsys)[0] == 0
    code, err = finish(launch(["explain", images, "-o", tmp_path / "two", "-c", cfg], tmp_path, processes=2))
    assert code == 0, err
    assert tree(tmp_path / "two") == tree(tmp_path / "one")  # summaries, PNGs and results.jsonl
    assert err.count("11 explained, 0 skipped, 0 failed") == 1  # one report, from rank 0
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["resources"]["processes"] == 2 and info["counts"]["ok"] == 11
    assert [r["counts"]["ok"] for r in info["ranks"]] == [7, 4]
    assert not (tmp_path / "two" / ".tmp").exists()
    assert "Traceback" not in err


def test_a_dead_rank_stops_the_job_and_any_process_count_resumes(tmp_path, capsys):
    images = folder(tmp_path / "images", 40)
    gated = config(tmp_path, "gated_net")
    reference = tmp_path / "reference"
    assert run(["explain", images, "-o", reference, "-c", gated, "-q"], capsys)[0] == 0
    out, gate = tmp_path / "out", closed_gate(tmp_path)
    job = launch(["explain", images, "-o", out, "-c", gated], tmp_path, processes=2, gate=gate)
    wait_for(lambda: len(list(out.glob("*/summary.json"))) == 8, job)  # a batch each, then both wait
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    gate.unlink()
    code, err = finish(job)
    assert code != 0  # torchrun's own code; rank 0 exits EXIT_RANK_LOST and says so:
    assert f"exitcode  : {EXIT_RANK_LOST}" in err and "rank 1 stopped before finishing" in err
    lines = records(out)
    assert 0 < len(lines) < 40 and all(r["status"] == "ok" and (out / r["summary"]).exists() for r in lines)
    info = json.loads((out / "run.json").read_text())
    assert info["interrupted"] and info["counts"]["ok"] == len(lines)
    assert info["ranks"][1] == {"rank": 1, "lost": True}
    assert not (out / ".tmp").exists()
    assert run(["explain", images, "-o", out, "-c", gated, "-q"], capsys)[0] == 0
    assert outputs_of(out) == outputs_of(reference)
    assert [r["input"] for r in records(out)] == [r["input"] for r in records(reference)]


# ---------------------------------------------------------------------------------------------------
# the OUT lock


def test_a_second_run_into_a_locked_out_exits_4_and_with_wait_follows(tmp_path, capsys):
    images = folder(tmp_path / "images", 24)
    gated = config(tmp_path, "gated_net")
    out, gate = tmp_path / "out", closed_gate(tmp_path)
    first = launch(["explain", images, "-o", out, "-c", gated, "-q"], tmp_path, gate=gate)
    wait_for(lambda: len(list(out.glob("*/summary.json"))) == 4, first)  # held at its second batch
    code, _, err = run(["explain", images, "-o", out, "-c", gated], capsys)
    assert code == EXIT_LOCKED
    assert err.count("\n") == 1 and "locked by another run" in err and f"pid {first.pid} " in err
    log = tmp_path / "waiting.log"
    with open(log, "wb") as stderr:
        waiting = launch(["explain", images, "-o", out, "-c", gated, "--wait"], tmp_path, stderr=stderr)
    wait_for(lambda: b"waiting for the run that holds" in log.read_bytes(), waiting)
    gate.unlink()
    assert finish(first)[0] == 0
    code, _ = finish(waiting)
    assert code == 0, log.read_text()
    lines = records(out)
    assert len(lines) == 24 and all(r["status"] == "skipped" for r in lines)  # the first did them all
    assert json.loads((out / "run.json").read_text())["counts"]["skipped"] == 24
    assert not (out / ".tmp").exists()


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from hirescam_cli.lock import OutLock; OutLock({str(out)!r}).acquire(); "
            "print('held', flush=True); import time; time.sleep(60)",
        ],
        env=environment(),
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        message = rf"{re.escape(str(out))} is locked by another run \(pid {holder.pid} on .* since"
        with pytest.raises(OutputLocked, match=message):
            OutLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = OutLock(out)
    lock.acquire()  # the kernel dropped the dead holder's lock
    lock.release()
    assert (out / outputs.LOCK_NAME).read_bytes() == b""


def test_temp_folders_are_per_process_and_stale_ones_go(tmp_path):
    live = outputs.OutputDir(tmp_path)
    stale = outputs.temp_root(tmp_path) / "somehost-1-dead"
    stale.mkdir()
    outputs.remove_stale_temp(tmp_path)
    assert live.tmp.is_dir() and not stale.exists()  # a live process's folder is kept
    other = outputs.OutputDir(tmp_path)
    assert other.tmp != live.tmp
    other.close()
    assert live.tmp.is_dir()
    live.close()
    assert not outputs.temp_root(tmp_path).exists()


# ---------------------------------------------------------------------------------------------------
# inputs


def test_inputs_from_stdin_match_the_same_inputs_as_arguments(tmp_path, capsys, monkeypatch):
    images = folder(tmp_path / "images", 5)
    cfg = config(tmp_path)
    assert run(["explain", images, "-o", tmp_path / "args", "-c", cfg, "-q"], capsys)[0] == 0
    listed = b"".join(os.fsencode(p) + b"\n" for p in sorted(images.iterdir(), reverse=True))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(listed + b"\n")))
    assert run(["explain", "--inputs-from", "-", "-o", tmp_path / "stdin", "-c", cfg, "-q"], capsys)[0] == 0
    assert tree(tmp_path / "stdin") == tree(tmp_path / "args")
    own = next((tmp_path / "stdin").glob("*/*.png"))  # `find .` lists OUT's files and folders: not taken
    more = b"".join(os.fsencode(p) + b"\n" for p in (own, own.parent, tmp_path / "stdin"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(listed + more)))
    assert run(["explain", "--inputs-from", "-", "-o", tmp_path / "stdin", "-c", cfg, "-q"], capsys)[0] == 0
    assert [r["status"] for r in records(tmp_path / "stdin")] == ["skipped"] * 5


def test_inputs_from_a_file_through_a_pipe_and_a_missing_listed_file(tmp_path, capsys):
    images = folder(tmp_path / "images", 3)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images / '000.png'}\n{images}\n{images / 'gone.png'}\n")
    out = tmp_path / "out"
    code, _, err = run(["explain", "--inputs-from", listing, "-o", out, "-c", config(tmp_path), "-q"], capsys)
    assert code == 1, err  # the missing file is a per-image error, the others are done
    assert [(r["input"].rsplit("/", 1)[1], r["status"]) for r in records(out)] == [
        ("000.png", "ok"),
        ("001.png", "ok"),
        ("002.png", "ok"),
        ("gone.png", "error"),
    ]
    args = ["explain", "--inputs-from", "-", "-o", tmp_path / "piped", "-c", config(tmp_path)]
    process = launch(args, tmp_path, stdin=subprocess.PIPE)
    code, err = finish(process, stdin=f"{images}\n".encode())
    assert code == 0 and "3 explained" in err


def test_empty_folder_is_exit_2_unless_allowed(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    cfg = config(tmp_path)
    code, _, err = run(["explain", empty, "-o", out, "-c", cfg], capsys)
    assert code == 2 and "no image files found in folder" in err
    code, _, err = run(["explain", empty, "-o", out, "-c", cfg, "--allow-empty"], capsys)
    assert code == 0 and err.count("\n") == 1 and "no images found" in err
    assert not out.exists()  # nothing to do, nothing written
    code, _, err = run(["explain", str(empty / "*.jpg"), "-o", out, "-c", cfg, "--allow-empty"], capsys)
    assert code == 0
    code, _, err = run(["explain", tmp_path / "missing", "-o", out, "-c", cfg, "--allow-empty"], capsys)
    assert code == 2 and "no such file or folder" in err
    code, _, err = run(["explain", "-o", out, "-c", cfg], capsys)
    assert code == 2 and "--inputs-from" in err


def test_catalogue_is_sorted_deduplicated_and_read_by_workers(tmp_path):
    folder(tmp_path / "images", 7)
    (tmp_path / "images" / "sub").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "images" / "sub" / "a.png")
    args = [tmp_path / "images", tmp_path / "images" / "003.png", str(tmp_path / "images" / "*.png")]
    with catalogue(args) as found:
        keys = [item.key for item in found]
        assert keys == sorted(keys) == [f"{i:03d}.png" for i in range(7)] + ["sub/a.png"]
        assert found[-1].key == "sub/a.png" and len(found) == 8
        assert pickle.loads(pickle.dumps(found))[2] == found[2]
        dataset = InputDataset(found, Images(Preprocess(16, 16, (0.0,) * 3, (1.0,) * 3)))
        batches = list(make_loader(dataset, 3, workers=2))
        assert [i for b in batches for i in b.indices] == list(range(8))
        path = found.path
    assert not os.path.exists(path)  # the file goes with the catalogue


BUILDS_A_CATALOGUE = (
    "import os, signal, sys\n"
    "from hirescam_cli.discovery import catalogue\n"
    "found = catalogue([sys.argv[1]])\n"
    "print(found.path, flush=True)\n"
)


def test_the_catalogue_a_killed_run_left_is_removed_by_the_next_and_a_live_runs_never(tmp_path, monkeypatch):
    """A run killed before it could remove its catalogue file (SIGKILL) leaves it behind; the next run
    removes it, never one that a live process holds, nor one just made."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    folder(tmp_path / "images", 2)

    def start(then: str) -> subprocess.Popen:
        command = [sys.executable, "-c", BUILDS_A_CATALOGUE + then, tmp_path / "images"]
        env = {**os.environ, "TMPDIR": str(temp)}
        return subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    killed, live = start("os.kill(os.getpid(), signal.SIGKILL)"), start("sys.stdin.read()")
    try:
        left = Path(killed.communicate(timeout=TIMEOUT)[0].strip())
        held = Path(live.stdout.readline().strip())
        assert killed.returncode == -signal.SIGKILL and left.exists() and held.exists()
        fresh = temp / "hirescam-inputs-fresh.sqlite"
        fresh.touch()
        old = time.time() - 3600
        for path in (left, held):
            os.utime(path, (old, old))
        monkeypatch.setattr(tempfile, "tempdir", str(temp))
        with catalogue([tmp_path / "images"]) as found:
            assert len(found) == 2
            assert not left.exists() and held.exists() and fresh.exists()
            own = Path(found.path)
        assert not own.exists()
    finally:
        live.communicate("", timeout=TIMEOUT)
    assert live.returncode == 0 and not held.exists()  # the live run removed its own at exit


def test_extreme_aspect_ratios_are_refused_before_decoding():
    strip = io.BytesIO()
    Image.new("RGB", (4000, 1)).save(strip, "PNG")
    with pytest.raises(ImageError, match=r"aspect ratio too extreme .*256000 x 64"):
        decode(strip.getvalue(), max_pixels=1_000_000, resize=64)
    assert decode(strip.getvalue(), max_pixels=1_000_000, resize=(16, 16)).shape == (3, 1, 4000)


# ---------------------------------------------------------------------------------------------------
# shares, defaults, PNG fallback


@pytest.mark.parametrize(("count", "world"), [(11, 2), (40, 3), (3, 4), (0, 2)])
def test_ranks_take_disjoint_batches_that_keep_every_slot(count, world):
    batch_size = 4
    shares = [list(Share(count, batch_size, rank, world)) for rank in range(world)]
    batches = sorted(b for share in shares for b in share)
    assert batches == list(Share(count, batch_size))  # every batch once, as one process cuts them
    assert all(i // batch_size == b[0] // batch_size for b in batches for i in b)
    assert [len(Share(count, batch_size, r, world)) for r in range(world)] == [len(s) for s in shares]


def test_defaults_follow_the_usable_cores_and_the_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert resources.choose(cpu, None, None) == resources.Resources(2, 2, 0, 2, 8)
    assert resources.choose(cpu, 2, 5) == resources.Resources(2, 2, 0, 2, 5)  # set values stay
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert resources.choose(cpu, None, None) == resources.Resources(16, 4, 0, 16, 8)
    assert resources.choose(cuda, None, None) == resources.Resources(16, 8, 5, 8, 32)
    assert resources.choose(cuda, None, None, processes_on_node=8) == resources.Resources(2, 1, 1, 1, 32)


HEAP_PROBE = """
import ctypes, sys, numpy
from hirescam_cli import resources
class Info(ctypes.Structure):  # glibc's struct mallinfo2, in bytes
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena ordblks smblks hblks mapped usmblks fsmblks uordblks fordblks keepcost".split())]
info = ctypes.CDLL(None).mallinfo2
info.restype = Info
if sys.argv[1] == "tuned":
    print(resources.keep_freed_heap())
before = info()
blocks = [numpy.ones(16 * 2**20, numpy.uint8) for _ in range(8)]  # 128 MiB, in blocks of 16 MiB
mapped = info().mapped - before.mapped
del blocks
kept = info().arena - before.arena
print(mapped >= 2**27, kept >= 2**27)  # mapped each on its own; or in the heap, and kept there once freed
"""


@pytest.mark.skipif(
    not resources.uses_glibc() or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="the heap's limits are glibc's; reading them takes mallinfo2 (glibc 2.33)",
)
def test_the_heap_keeps_freed_memory_for_the_next_batch_unless_the_user_set_its_limits(monkeypatch):
    def probe(mode: str) -> list[str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
        done = subprocess.run(
            [sys.executable, "-c", HEAP_PROBE, mode], env=environment, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert probe("default") == ["True", "False"]  # glibc's defaults: mapped afresh, handed back when freed
    assert probe("tuned") == [str(resources.HEAP_KEPT), "False", "True"]  # in the heap, and kept there
    for name, value in [("MALLOC_MMAP_THRESHOLD_", "131072"), ("GLIBC_TUNABLES", "glibc.malloc.mxfast=0")]:
        with monkeypatch.context() as patch:  # the user's own limits stay (decided before any change)
            patch.setenv(name, value)
            assert resources.keep_freed_heap.__wrapped__() is None


def test_png_falls_back_to_zlib_without_fpng(tmp_path, capsys, monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 255, (9, 7, 3), dtype=np.uint8)
    monkeypatch.setattr(formats, "fpng", None)
    data = formats.encode_png(pixels, "fast")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    images = folder(tmp_path / "images", 2)
    assert run(["explain", images, "-o", tmp_path / "out", "-c", config(tmp_path), "-q"], capsys)[0] == 0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["png_encoder"] == "zlib"


def test_discover_lists_stay_a_plain_list(tmp_path):
    folder(tmp_path / "images", 2)
    assert [item.key for item in discover([tmp_path / "images"])] == ["000.png", "001.png"]
    with pytest.raises(InputError, match="no inputs"):
        discover([])
