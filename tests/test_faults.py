"""Faults a batch job meets: kill -9, Ctrl-C, a full disk, an unusable OUT, hostile checkpoints."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import config, run

from hirescam_cli.outputs import OutputDir

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def importable_tiny_models(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def folder(root: Path, count: int, size: tuple[int, int] = (40, 30)) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / f"{i:03d}.png"
        )
    return root


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root but run.json (which holds timings)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != "run.json"
    }


def start(args: list, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    return subprocess.Popen(
        [sys.executable, "-m", "hirescam_cli", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        start_new_session=True,  # its own process group, as a shell job has
    )


def wait_for_summaries(out: Path, count: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.glob("*/summary.json"))) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)


def test_kill_9_then_rerun_gives_the_uninterrupted_result(tmp_path, capsys):
    images = folder(tmp_path / "images", 24)
    slow = config(tmp_path, "slow_net")
    reference = tmp_path / "reference"
    assert run(["explain", images, "-o", reference, "-c", slow, "-q"], capsys)[0] == 0
    out = tmp_path / "out"
    process = start(["explain", images, "-o", out, "-c", slow, "-q"], tmp_path)
    wait_for_summaries(out, 5, process)
    process.kill()
    process.wait()
    done_before = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    assert 5 <= len(done_before) < 24
    assert not (out / "results.jsonl").exists()
    assert run(["explain", images, "-o", out, "-c", slow, "-q"], capsys)[0] == 0
    assert tree(out) != {}  # and it matches the uninterrupted run byte for byte, ledger aside:
    assert {k: v for k, v in tree(out).items() if k != "results.jsonl"} == {
        k: v for k, v in tree(reference).items() if k != "results.jsonl"
    }
    assert all(p.stat().st_mtime_ns == t for p, t in done_before.items())  # not redone
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sum(r["status"] == "skipped" for r in records) == len(done_before)
    assert not (out / ".tmp").exists()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_ctrl_c_stops_at_a_batch_boundary_with_exit_130(tmp_path, workers):
    images = folder(tmp_path / "images", 40)
    out = tmp_path / "out"
    args = ["explain", images, "-o", out, "-c", config(tmp_path, "slow_net"), "--workers", workers]
    process = start(args, tmp_path)
    wait_for_summaries(out, 4, process)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole group, workers too
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert 4 <= len(records) < 40 and len(records) % 4 == 0  # whole batches of 4
    assert all(r["status"] == "ok" and (out / r["summary"]).exists() for r in records)
    assert len(list(out.glob("*/summary.json"))) == len(records)
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["interrupted"] is True and run_info["counts"]["ok"] == len(records)
    assert not (out / ".tmp").exists()
    assert b"Traceback" not in err
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith("hirescam: interrupted: ") and f"{40 - len(records)} not reached" in last


def test_disk_full_stops_with_one_error_and_a_consistent_ledger(tmp_path, capsys, monkeypatch):
    images = folder(tmp_path / "images", 12)
    real_create, calls = OutputDir.create, []

    def filling_create(self, path, data):
        calls.append(path)
        if len(calls) > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_create(self, path, data)

    monkeypatch.setattr(OutputDir, "create", filling_create)
    out = tmp_path / "out"
    code, _, err = run(["explain", images, "-o", out, "-c", config(tmp_path)], capsys)
    assert code == 3
    assert err.strip().splitlines()[-1].startswith("hirescam: error: cannot write outputs")
    assert "No space left on device" in err
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ok = {r["summary"] for r in records if r["status"] == "ok"}
    assert ok == {p.relative_to(out).as_posix() for p in out.glob("*/summary.json")}
    assert any(r["status"] == "error" and "No space left" in r["error"] for r in records)
    assert not (out / ".tmp").exists()


def test_unusable_output_folder_exits_3_with_one_line(tmp_path, capsys):
    images = folder(tmp_path / "images", 2)
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run(["explain", images, "-o", tmp_path / "file" / "out", "-c", config(tmp_path)], capsys)
    assert code == 3
    assert len(err.strip().splitlines()) == 1 and "cannot use output folder" in err


class Payload:
    """Unpickling this creates a marker file: the code a hostile checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"0.weight": torch.zeros(4, 3, 3, 3), "payload": Payload(marker)}, checkpoint)
    folder(tmp_path / "images", 1)
    args = [
        "explain",
        tmp_path / "images",
        "-o",
        tmp_path / "out",
        "-c",
        config(tmp_path),
        "--checkpoint",
        checkpoint,
    ]
    code, _, err = run(args, capsys)
    assert code == 2
    assert "not plain tensor data" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["plain", "nested", "dataparallel"])
def test_plain_checkpoint_loads_and_changes_the_result(tmp_path, capsys, layout):
    from tiny_models import tiny_net

    model = tiny_net()
    with torch.no_grad():
        model[5].bias.copy_(torch.tensor([0.0, 0.0, 50.0]))  # class 2 wins everywhere
    state = model.state_dict()
    saved = {
        "plain": state,
        "nested": {"state_dict": state, "epoch": 3},
        "dataparallel": {f"module.{k}": v for k, v in state.items()},
    }[layout]
    torch.save(saved, tmp_path / "ckpt.pt")
    folder(tmp_path / "images", 2)
    args = ["explain", tmp_path / "images", "-o", tmp_path / "out", "-c", config(tmp_path), "-q"]
    assert run([*args, "--checkpoint", tmp_path / "ckpt.pt"], capsys)[0] == 0
    summary = json.loads((tmp_path / "out/000.png/summary.json").read_text())
    assert summary["targets"][0]["class"] == 2 and summary["model"].endswith("+ ckpt.pt")


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path, capsys):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    folder(tmp_path / "images", 1)
    args = ["explain", tmp_path / "images", "-o", tmp_path / "out", "-c", config(tmp_path)]
    code, _, err = run([*args, "--checkpoint", tmp_path / "other.pt"], capsys)
    assert code == 2 and "do not fit the model" in err and "unexpected weight" in err


def test_offline_torchvision_weights_say_to_pass_a_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty cache

    def offline(*_args, **_kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    (tmp_path / "c.toml").write_text('[model]\narch = "resnet18"\nweights = "IMAGENET1K_V1"\n')
    folder(tmp_path / "images", 1)
    code, _, err = run(
        ["explain", tmp_path / "images", "-o", tmp_path / "out", "-c", tmp_path / "c.toml"], capsys
    )
    assert code == 2 and "set model.checkpoint" in err and len(err.strip().splitlines()) == 1


def test_torchvision_weights_name_with_a_local_checkpoint(tmp_path, capsys, monkeypatch):
    """Offline use of a torchvision model: the weights' preset and labels, the file's tensors."""
    import torchvision

    def offline(*_args, **_kwargs):
        raise AssertionError("must not download when a checkpoint is given")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    folder(tmp_path / "images", 1, size=(300, 200))
    args = ["explain", tmp_path / "images", "-o", tmp_path / "out", "--model", "resnet18", "-q"]
    args += ["--weights", "IMAGENET1K_V1", "--checkpoint", tmp_path / "resnet18.pth", "--workers", "0"]
    code, _, err = run(args, capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "out/000.png/summary.json").read_text())
    categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert summary["model"] == "resnet18 (IMAGENET1K_V1) + resnet18.pth"
    assert summary["predictions"][0]["label"] == categories[summary["predictions"][0]["class"]]
    assert summary["target_layer"] == "layer4" and summary["targets"][0]["guarantee"] is True
    run_info = json.loads((tmp_path / "out/run.json").read_text())
    assert "resize=256" in run_info["preprocess"] and "crop=224" in run_info["preprocess"]


def test_resumed_images_are_computed_bit_for_bit_as_in_a_whole_run(tmp_path, capsys):
    """A resumed batch holds fewer images; each keeps its slot, so even raw float maps match."""
    import shutil

    images = folder(tmp_path / "images", 9)
    out = tmp_path / "out"
    args = ["explain", images, "-o", out, "-c", config(tmp_path), "--save-raw", "-q"]
    assert run(args, capsys)[0] == 0
    whole = tree(out)
    for name in ("000.png", "001.png", "002.png", "005.png"):
        shutil.rmtree(out / name)
    assert run(args, capsys)[0] == 0
    statuses = [json.loads(line)["status"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert statuses.count("ok") == 4 and statuses.count("skipped") == 5
    redone = {
        k: v for k, v in tree(out).items() if k.split("/")[0] in {"000.png", "001.png", "002.png", "005.png"}
    }
    assert any(k.endswith(".npy") for k in redone)
    assert redone == {k: whole[k] for k in redone}
    assert tree(out).keys() == whole.keys()
