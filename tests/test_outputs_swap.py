"""Redoing an input replaces its folder whole: OUT/<key> holds exactly the files its summary lists, and a
kill at any moment leaves the old complete set or the new complete set, never a mix."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from image_sets import NEW, OLD, image_set
from PIL import Image
from report_runs import cli
from test_cli import config, rgb, run
from test_faults import folder, tree

from hirescam_cli import outputs, resources
from hirescam_cli.outputs import OutputDir, OutputError
from hirescam_cli.sinks.folders import write_image

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def importable_tiny_models(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def assert_whole(out: Path) -> dict[str, dict]:
    """Every input folder under OUT holds exactly the files its summary lists plus the summary, each whole
    (PNGs decode at the image's size, raw maps load); folders without a summary hold no file. Returns
    key -> summary."""
    summaries = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        if path.is_symlink() or not path.is_dir() or relative.parts[0] in (".tmp", "report"):
            continue
        files = {p.name for p in path.iterdir() if not p.is_dir()}
        if "summary.json" not in files:
            assert not files, f"{relative} holds files but no summary: {sorted(files)}"
            continue
        summary = json.loads((path / "summary.json").read_bytes())
        key = relative.as_posix()
        listed = {"summary.json"}
        for target in summary["targets"]:
            for maps in target["maps"].values():
                for listed_path in filter(None, (maps["png"], maps.get("raw"))):
                    assert listed_path.rpartition("/")[0] == key, listed_path
                    listed.add(listed_path.rpartition("/")[2])
        assert files == listed, f"{key}: {sorted(files ^ listed)} differ from its summary"
        for name in listed - {"summary.json"}:
            if name.endswith(".png"):
                with Image.open(path / name) as image:
                    image.load()
                    assert image.size == (summary["width"], summary["height"])
            else:
                assert np.load(path / name, allow_pickle=False).dtype == np.float32
        summaries[key] = summary
    return summaries


def outputs_of(out: Path) -> dict[str, bytes]:
    """Every file under OUT but the ledgers (run.json holds timings, results.jsonl says skipped or ok)."""
    return {k: v for k, v in tree(out).items() if k != "results.jsonl"}


def statuses(out: Path) -> list[str]:
    return [json.loads(line)["status"] for line in (out / "results.jsonl").read_text().splitlines()]


def biased_checkpoint(path: Path) -> Path:
    """tiny_net's weights with class 0 winning every image (tiny_net itself picks 2 on these)."""
    from tiny_models import tiny_net

    model = tiny_net()
    with torch.no_grad():
        model[5].bias.copy_(torch.tensor([50.0, 0.0, 0.0]))
    torch.save(model.state_dict(), path)
    return path


def no_exchange(_a, _b):
    raise OSError(errno.EINVAL, "Invalid argument")


@pytest.fixture(params=["threads", "processes", "no-exchange"])
def writer_kind(request, monkeypatch) -> str:
    """Threads write; or writer processes; or threads on a file system without an atomic exchange."""
    if request.param == "processes":
        monkeypatch.setattr(resources, "default_writers", lambda device, cores: 2)
        monkeypatch.setenv("PYTHONPATH", str(TESTS.parent))  # spawned writers import the package from here
    if request.param == "no-exchange":
        monkeypatch.setattr(outputs, "exchange", no_exchange)
    return request.param


CHANGES = {  # first run's flags, second run's flags
    "classes": (["--classes", "0,1"], ["--classes", "2"]),
    "methods": (["--methods", "hirescam,gradcam,layercam"], ["--methods", "gradcam"]),
    "save-raw off": (["--save-raw", "--top-k", "2"], ["--top-k", "2"]),
    "predictions": (["--top-k", "1"], ["--top-k", "1", "--checkpoint", "biased.pt"]),
    "overwrite": (["--top-k", "2"], ["--top-k", "2", "--overwrite"]),
    "input bytes": (["--top-k", "2"], ["--top-k", "2"]),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_redone_input_holds_exactly_its_new_outputs(tmp_path, capsys, monkeypatch, writer_kind, change):
    images = folder(tmp_path / "images", 6)
    biased_checkpoint(tmp_path / "biased.pt")
    monkeypatch.chdir(tmp_path)
    common = ["-c", config(tmp_path), "-q"]
    first, second = CHANGES[change]
    out = tmp_path / "out"
    assert run(["explain", images, "-o", out, *common, *first], capsys)[0] == 0
    before = outputs_of(out)
    if change == "overwrite":  # files no summary lists, as an earlier version of the tool left them
        for key in ("000.png", "003.png"):
            (out / key / "hirescam-9.png").write_bytes(b"stale")
    if change == "input bytes":
        rng = np.random.default_rng(7)
        for path in sorted(images.iterdir()):
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    assert run(["explain", images, "-o", out, *common, *second], capsys)[0] == 0
    assert statuses(out) == ["ok"] * 6  # every input was redone
    assert run(["explain", images, "-o", tmp_path / "reference", *common, *second], capsys)[0] == 0
    assert outputs_of(out) == outputs_of(tmp_path / "reference")
    assert len(assert_whole(out)) == 6
    if change in ("classes", "methods", "save-raw off", "predictions"):
        assert set(before) - set(outputs_of(out)), "the change should have retired some files"
    assert not (out / ".tmp").exists()


def test_a_folder_holding_files_its_summary_does_not_list_is_redone(tmp_path, capsys):
    images = folder(tmp_path / "images", 5)
    args = ["explain", images, "-o", tmp_path / "out", "-c", config(tmp_path), "-q"]
    assert run(args, capsys)[0] == 0
    whole = outputs_of(tmp_path / "out")
    (tmp_path / "out/001.png/gradcam-9.png").write_bytes(b"stale")  # one file too many
    next((tmp_path / "out/003.png").glob("hirescam-*.png")).unlink()  # one too few
    assert run(args, capsys)[0] == 0
    assert statuses(tmp_path / "out") == ["skipped", "ok", "skipped", "ok", "skipped"]
    assert outputs_of(tmp_path / "out") == whole


def test_an_input_that_now_fails_keeps_its_earlier_outputs(tmp_path, capsys):
    images = folder(tmp_path / "images", 4)
    args = ["explain", images, "-o", tmp_path / "out", "-c", config(tmp_path), "-q"]
    assert run(args, capsys)[0] == 0
    whole = outputs_of(tmp_path / "out")
    (images / "002.png").write_bytes(b"no longer an image")
    assert run([*args, "--overwrite"], capsys)[0] == 1
    assert statuses(tmp_path / "out") == ["ok", "ok", "error", "ok"]
    assert outputs_of(tmp_path / "out") == whole  # its summary still describes exactly what is there
    assert_whole(tmp_path / "out")


def test_nested_keys_keep_each_other_across_redos(tmp_path, capsys, writer_kind):
    """A key can extend another's (an escaped name beside a folder of that name): redoing the outer one
    keeps the inner one's folder, whatever order the writers finish in."""
    images = tmp_path / "images"
    (images / "a%01.png").mkdir(parents=True)
    rgb(30, 20, 1).save(images / "a\x01.png", format="PNG")
    rgb(20, 30, 2).save(images / "a%01.png" / "b.png")
    rgb(25, 25, 3).save(images / "a%01.png" / "c.png")
    out = tmp_path / "out"
    common = ["-c", config(tmp_path), "-q"]
    for classes in ("0,1", "2", "1"):
        code, _, err = run(["explain", images, "-o", out, *common, "--classes", classes], capsys)
        assert code == 0, err
        assert statuses(out) == ["ok"] * 3
        assert sorted(assert_whole(out)) == ["a%01.png", "a%01.png/b.png", "a%01.png/c.png"]
    assert run(["explain", images, "-o", tmp_path / "reference", *common, "--classes", "1"], capsys)[0] == 0
    assert outputs_of(out) == outputs_of(tmp_path / "reference")


# ---------------------------------------------------------------------------------------------------
# the swap itself, and what lies at OUT/<key>


def version_at(folder: Path) -> int | None:
    """Which whole set lies in the folder (None: no folder); fails on a mix."""
    if not folder.exists():
        return None
    (summary,) = assert_whole(folder.parent).values()
    version = summary["version"]
    for path in folder.iterdir():
        if path.suffix == ".png":
            assert (np.asarray(Image.open(path)) == version).all(), path
        if path.suffix == ".npy":
            assert (np.load(path) == version).all(), path
    return version


SWAP_CHILD = """
import os, shutil, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from image_sets import NEW, OLD, image_set
from report_runs import cli
from hirescam_cli import outputs
from hirescam_cli.sinks import folders

root, moment = Path(sys.argv[1]), sys.argv[2]
out = outputs.OutputDir(root)
folders.write_image(out, "k", *image_set(*OLD))
out.atomic_exchange = out.atomic_exchange and not moment.startswith("fallback")
target = (root / "k").resolve()
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
rename, exchange, rmtree, create = os.rename, outputs.exchange, shutil.rmtree, out.create
created = []

def killing_create(path, data):
    create(path, data)
    created.append(path)
    if moment == "staging" and len(created) == 2:
        die()

def killing_rename(src, dst):
    rename(src, dst)
    if (moment, Path(src)) == ("fallback-aside", target) or (moment, Path(dst)) == ("fallback-in", target):
        die()

def killing_exchange(a, b):
    exchange(a, b)
    if moment == "exchange":
        die()

def killing_rmtree(path, ignore_errors=False):
    files = [p for p in Path(path).iterdir() if p.is_file()] if Path(path).is_dir() else []
    if moment.endswith("removing") and files:
        files[0].unlink()
        die()
    rmtree(path, ignore_errors=ignore_errors)

out.create = killing_create
os.rename, outputs.exchange, shutil.rmtree = killing_rename, killing_exchange, killing_rmtree
folders.write_image(out, "k", *image_set(*NEW))
print("not killed")
"""

MOMENTS = {  # where the child stops -> the set OUT/k holds then (None: no folder; the input is not done)
    "staging": 1,
    "exchange": 2,
    "removing": 2,
    "fallback-aside": None,
    "fallback-in": 2,
    "fallback-removing": 2,
}


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_kill_during_the_swap_leaves_one_whole_set(tmp_path, moment):
    if not moment.startswith("fallback") and not outputs.can_exchange(tmp_path):
        pytest.skip("this file system has no atomic exchange")
    root = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", SWAP_CHILD, root, moment, TESTS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert version_at(root / "k") == MOMENTS[moment]
    assert any(outputs.temp_root(root).iterdir())  # the dead process's leftovers, removed by the next run:
    outputs.remove_stale_temp(root)
    assert not any(outputs.temp_root(root).iterdir())
    out = OutputDir(root)
    write_image(out, "k", *image_set(*NEW))
    out.close()
    assert version_at(root / "k") == 2 and not outputs.temp_root(root).exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_the_swap_replaces_the_whole_folder(tmp_path, exchange):
    if exchange and not outputs.can_exchange(tmp_path):
        pytest.skip("this file system has no atomic exchange")
    out = OutputDir(tmp_path / "out")
    out.atomic_exchange = exchange
    write_image(out, "k", *image_set(*OLD))
    assert version_at(tmp_path / "out/k") == 1
    (tmp_path / "out/k/notes.txt").write_text("left by hand")
    (tmp_path / "out/k/link").symlink_to(tmp_path)
    write_image(out, "k", *image_set(*NEW))
    assert version_at(tmp_path / "out/k") == 2
    assert not (tmp_path / "out/k/link").is_symlink()
    out.close()
    assert not outputs.temp_root(tmp_path / "out").exists()


def test_an_inner_set_is_put_in_place_while_the_outer_one_is_moved_aside(tmp_path, monkeypatch):
    """Without an atomic exchange, redoing OUT/k moves it aside first; an input whose key extends k that
    makes the folder k just then (mkdir sees it, then it is gone) makes it again and puts its set there."""
    out = OutputDir(tmp_path / "out")
    out.atomic_exchange = False
    write_image(out, "k", *image_set(*OLD))
    write_image(out, "k/b", *image_set(*OLD, key="k/b"))
    outer, aside, real_mkdir = (tmp_path / "out/k").resolve(), tmp_path / "aside", os.mkdir
    moved = []

    def outer_swap_meanwhile(path, *args, **kwargs):
        if Path(path) == outer and not moved:
            moved.append(os.rename(outer, aside))  # the outer input's first step
            raise FileExistsError(errno.EEXIST, "File exists", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", outer_swap_meanwhile)
    write_image(out, "k/b", *image_set(*NEW, key="k/b"))
    version = lambda folder: json.loads((folder / "summary.json").read_text())["version"]  # noqa: E731
    assert moved and version(aside) == 1 and version(outer / "b") == 2
    assert (np.asarray(Image.open(outer / "b" / "gradcam-2.png")) == 2).all()
    out.close()


def test_a_failed_write_leaves_the_old_set(tmp_path, monkeypatch):
    out = OutputDir(tmp_path / "out")
    write_image(out, "k", *image_set(*OLD))
    real_create = OutputDir.create

    def full_after_one(self, path, data):
        if any(self.tmp.glob("*/*")):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_create(self, path, data)

    monkeypatch.setattr(OutputDir, "create", full_after_one)
    with pytest.raises(OSError, match="No space"):
        write_image(out, "k", *image_set(*NEW))
    assert version_at(tmp_path / "out/k") == 1
    assert [p.name for p in out.tmp.iterdir()] == []  # the new set's staging folder is gone
    out.close()


def test_a_file_at_the_folders_place_is_refused_and_kept(tmp_path):
    out = OutputDir(tmp_path / "out")
    (tmp_path / "out/k").write_text("not ours")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        write_image(out, "k", *image_set(*NEW))
    assert (tmp_path / "out/k").read_text() == "not ours"
    out.close()


def test_a_link_leading_outside_out_is_refused(tmp_path):
    away = tmp_path / "away"
    away.mkdir()
    (away / "keep.txt").write_text("theirs")
    out = OutputDir(tmp_path / "out")
    (tmp_path / "out/k").symlink_to(away)
    (tmp_path / "out/a").symlink_to(away)
    for key in ("k", "a/k"):
        summary, pictures, raw = image_set(*NEW, key=key)
        with pytest.raises(OutputError, match="resolves outside"):
            write_image(out, key, summary, pictures, raw)
    assert [p.name for p in away.iterdir()] == ["keep.txt"] and (tmp_path / "out/k").is_symlink()
    out.close()


def test_a_link_onto_out_itself_or_its_own_names_is_refused(tmp_path):
    out = OutputDir(tmp_path / "out")
    (tmp_path / "out/report").mkdir()
    for name, points_to in (("self", "."), ("temp", ".tmp"), ("rep", "report")):
        (tmp_path / "out" / name).symlink_to(points_to)
        summary, pictures, raw = image_set(*NEW, key=name)
        with pytest.raises(OutputError, match="which OUT uses itself"):
            write_image(out, name, summary, pictures, raw)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".tmp", "rep", "report", "self", "temp"]
    out.close()


def test_a_link_inside_out_is_followed_and_kept(tmp_path):
    out = OutputDir(tmp_path / "out")
    (tmp_path / "out/real").mkdir()
    (tmp_path / "out/k").symlink_to("real")
    write_image(out, "k", *image_set(*OLD))
    write_image(out, "k", *image_set(*NEW))
    assert (tmp_path / "out/k").is_symlink()
    assert sorted(p.name for p in (tmp_path / "out/real").iterdir()) == ["gradcam-2.png", "summary.json"]
    assert json.loads((tmp_path / "out/real/summary.json").read_text())["version"] == 2
    out.close()


def test_a_summary_cannot_name_a_file_outside_its_folder(tmp_path):
    out = OutputDir(tmp_path / "out")
    summary, pictures, raw = image_set(*NEW)
    summary["targets"][0]["maps"]["gradcam"]["png"] = "other/gradcam-2.png"
    with pytest.raises(OutputError, match="outside the folder of k"):
        write_image(out, "k", summary, pictures, raw)
    assert not (tmp_path / "out/k").exists() and not (tmp_path / "out/other").exists()
    out.close()


def test_without_an_exchange_the_fallback_is_chosen_once(tmp_path, monkeypatch):
    calls = []

    def unsupported(a, b):
        calls.append((a, b))
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(outputs, "exchange", unsupported)
    out = OutputDir(tmp_path / "out")
    assert out.atomic_exchange is False and len(calls) == 1  # the probe
    for version in (1, 2, 3):
        write_image(out, "k", *image_set(version, [version], ["hirescam"], version == 2))
        assert version_at(tmp_path / "out/k") == version
    assert len(calls) == 1
    out.close()


# ---------------------------------------------------------------------------------------------------
# kill -9 while a run redoes everything

LAUNCH = """
import sys
from multiprocessing import shared_memory
from hirescam_cli import resources
from hirescam_cli.cli import main
if sys.argv[1] == "processes":
    resources.default_writers = lambda device, cores: 2
    Segment = shared_memory.SharedMemory

    def named(*args, **kwargs):  # says which segments the test must free after killing the whole job
        segment = Segment(*args, **kwargs)
        if kwargs.get("create"):
            print(segment.name, flush=True)
        return segment

    shared_memory.SharedMemory = named
sys.argv = ["hirescam", *sys.argv[2:]]
main()
"""


def classes_done(out: Path, classes: list[int]) -> int:
    """How many summaries explain exactly these classes."""
    count = 0
    for path in out.glob("*/summary.json"):
        summary = json.loads(path.read_bytes())
        count += [t["class"] for t in summary["targets"]] == classes
    return count


@pytest.fixture(scope="module")
def redo(tmp_path_factory) -> dict[str, Path]:
    """24 images explained for classes 0 and 1 with raw maps (base); a fresh run for class 2 (reference)."""
    root = tmp_path_factory.mktemp("redo")
    paths = {"images": folder(root / "images", 24, size=(120, 90)), "config": config(root, "slow_net")}
    for name, flags in (("base", ["--classes", "0,1", "--save-raw"]), ("reference", ["--classes", "2"])):
        paths[name] = root / name
        assert cli("explain", paths["images"], "-o", root / name, "-c", paths["config"], "-q", *flags) == 0
    return paths


@pytest.mark.parametrize("kind,moments", [("threads", (1, 11)), ("processes", (6,))])
def test_kill_9_while_redoing_leaves_whole_folders_and_a_rerun_completes(tmp_path, redo, kind, moments):
    args = ["explain", redo["images"], "-o", None, "-c", redo["config"], "-q", "--classes", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), *sys.path])}
    for moment in moments:
        out = tmp_path / f"out-{moment}"
        shutil.copytree(redo["base"], out)
        args[3] = out
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, kind, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while classes_done(out, [2]) < moment:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)  # the run and its writers, as kill -9 of the job
        for name in process.communicate()[0].split():
            (Path("/dev/shm") / name.decode().lstrip("/")).unlink(missing_ok=True)
        summaries = assert_whole(out)
        redone = sum([t["class"] for t in s["targets"]] == [2] for s in summaries.values())
        assert moment <= redone < 24
        assert len(summaries) == 24 or not outputs.can_exchange(tmp_path)  # an exchange leaves no gap
        assert cli(*args) == 0
        assert outputs_of(out) == outputs_of(redo["reference"])
        assert statuses(out).count("skipped") == redone
        assert not (out / ".tmp").exists()
