"""Weights are a choice, never an accident: pretrained by default, random only when asked (and seeded),
offline failures at once with the flag that fixes them, all-zero gradients reported as such."""

import json
from pathlib import Path

import pytest
import torch
import torchvision
from test_cli import config, rgb, run

from hirescam_cli.config import ModelConfig
from hirescam_cli.sources import ModelError, load_model

SMALL = "[preprocess]\nresize = 32\ncrop = 32\n[explain]\nbatch_size = 2\nworkers = 0\n"


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """torch's download cache, empty; no network (every connection attempt is recorded and refused)."""
    attempts: list = []

    def refuse(address, *_args, **_kwargs):
        attempts.append(address)
        raise OSError("Name or service not known")

    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    monkeypatch.setattr("socket.create_connection", refuse)
    yield attempts
    torch.hub.set_dir(previous)


def images(folder: Path, count: int = 2) -> Path:
    folder.mkdir()
    for i in range(count):
        rgb(40, 32, seed=i).save(folder / f"{i}.png")
    return folder


def test_a_torchvision_model_without_weights_means_its_default_weights(empty_hub, monkeypatch):
    downloads = []
    monkeypatch.setattr(
        "torchvision.models._api.load_state_dict_from_url", lambda url, **_k: downloads.append(url)
    )
    with pytest.raises(ModelError) as error:
        load_model(ModelConfig(arch="resnet18"))
    message = str(error.value)
    assert "torchvision weights ResNet18_Weights.IMAGENET1K_V1" in message
    assert "download.pytorch.org cannot be reached" in message and "--checkpoint" in message
    assert "--weights none" in message and "\n" not in message
    assert empty_hub == [("download.pytorch.org", 443)] and downloads == []  # one quick probe, no download


def test_cached_default_weights_load_without_the_network(empty_hub, monkeypatch):
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached")  # present: no probe; torch's own loader reads it
    state = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", lambda url, **_k: state)
    loaded = load_model(ModelConfig(arch="resnet18"))
    assert loaded.name == "resnet18 (IMAGENET1K_V1)" and not loaded.random_weights
    assert loaded.labels[0] == "tench" and loaded.transforms is not None
    assert empty_hub == []


def test_num_classes_that_do_not_fit_the_default_weights_are_refused_before_any_download(empty_hub):
    with pytest.raises(ModelError, match=r"num_classes = 10 does not fit resnet18's IMAGENET1K_V1 weights"):
        load_model(ModelConfig(arch="resnet18", num_classes=10))
    assert empty_hub == []


def test_random_weights_only_when_asked_seeded_and_recorded(tmp_path, capsys, empty_hub):
    folder = images(tmp_path / "in")
    cfg = tmp_path / "c.toml"
    cfg.write_text(SMALL)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        args = ["explain", folder, "-o", out, "-c", cfg, "--model", "resnet18", "--weights", "none"]
        code, _, err = run(args, capsys)
        assert code == 0, err
        assert err.count('model.weights = "none"') == 1 and "random weights" in err
    assert empty_hub == []  # nothing to download
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file() and p.suffix != ".json")
    assert files and all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files)
    for out in outs:
        assert json.loads((out / "run.json").read_text())["random_weights"] is True
        for summary in out.rglob("summary.json"):
            data = json.loads(summary.read_text())
            assert data["random_weights"] is True and data["model"] == "resnet18 (random weights)"
    again = ["explain", folder, "-o", outs[0], "-c", cfg, "--model", "resnet18", "--weights", "none"]
    code, _, err = run(again, capsys)
    assert code == 0 and "0 explained, 2 skipped" in err  # the same weights: resume skips everything


def test_building_a_model_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = load_model(ModelConfig(arch="resnet18", weights="none")).module.state_dict()
    assert torch.equal(torch.rand(3), expected)
    second = load_model(ModelConfig(arch="resnet18", weights="none")).module.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_timm_random_weights_are_seeded_and_need_no_network(empty_hub):
    pytest.importorskip("timm")
    first = load_model(ModelConfig(arch="timm:test_vit", weights="none"))
    second = load_model(ModelConfig(arch="timm:test_vit", weights="none"))
    assert first.random_weights and first.name == "timm:test_vit (random weights)"
    a, b = first.module.state_dict(), second.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert empty_hub == []


def test_timm_takes_only_none_as_weights(tmp_path, capsys):
    rgb(20, 20).save(tmp_path / "x.png")
    args = [
        "explain",
        tmp_path / "x.png",
        "-o",
        tmp_path / "out",
        "--model",
        "timm:test_vit",
        "--weights",
        "V1",
    ]
    code, _, err = run(args, capsys)
    assert code == 2 and 'timm models take "none"' in err and len(err.strip().splitlines()) == 1


def test_an_untrained_head_is_reported_as_zero_gradient_not_as_identical_maps(tmp_path, capsys):
    folder = images(tmp_path / "in", 3)
    cfg = config(tmp_path, "untrained_vit")
    cfg.write_text(cfg.read_text().replace("resize = 16\ncrop = 16", "resize = 32\ncrop = 32"))
    code, _, err = run(["explain", folder, "-o", tmp_path / "out", "-c", cfg], capsys)
    assert code == 0, err
    assert "zero gradient" in err and "logits are the same for every class" in err
    assert "identical by construction" not in err
    for summary in (tmp_path / "out").rglob("summary.json"):
        (target,) = json.loads(summary.read_text())["targets"]
        assert target["zero_gradient"] is True and target["identical_by_construction"] is False
    run_info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_info["zero_gradient"] is True and run_info["identical_by_construction"] is False
