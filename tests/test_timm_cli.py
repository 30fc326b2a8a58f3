"""timm as a model source, .safetensors checkpoints, and `hirescam` end to end on token models."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from determinism import seeded
from safetensors.torch import save_file
from test_cli import TESTS, rgb, run

from hirescam_cli.config import ModelConfig, PreprocessConfig
from hirescam_cli.modalities.images import Preprocess, make_preprocess
from hirescam_cli.sources import ModelError, load_model
from hirescam_cli.sources.checkpoint import load_checkpoint


@pytest.fixture(autouse=True)
def importable_tiny_models(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@seeded()
def test_vit(num_classes: int = 1000) -> torch.nn.Module:
    return timm.create_model("test_vit", num_classes=num_classes)


test_vit.__test__ = False  # a helper, not a test


def test_timm_model_brings_its_preprocessing_and_imagenet_labels():
    loaded = load_model(ModelConfig(arch="timm:test_vit"), load_weights=False)
    assert loaded.labels[:3] == ["tench", "goldfish", "great white shark"] and len(loaded.labels) == 1000
    # test_vit's pretrained config: 160x160 input, crop_pct 0.95, bicubic, mean = std = 0.5
    assert make_preprocess(PreprocessConfig(), loaded.transforms) == Preprocess(
        168, (160, 160), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"
    )
    mine = PreprocessConfig(resize=200, interpolation="bilinear", mean=(0.4, 0.4, 0.4))
    assert make_preprocess(mine, loaded.transforms) == Preprocess(
        200, (160, 160), (0.4, 0.4, 0.4), (0.5, 0.5, 0.5), "bilinear"
    )
    few = load_model(ModelConfig(arch="timm:test_vit", num_classes=3), load_weights=False)
    assert few.labels is None  # ImageNet names only fit 1000 classes


def test_unknown_timm_name_suggests_the_closest():
    with pytest.raises(ModelError, match=r"'timm:test_vitt' is not a timm model; did you mean test_vit"):
        load_model(ModelConfig(arch="timm:test_vitt"))


def test_timm_weights_offline_fail_at_once_and_say_to_pass_a_checkpoint(tmp_path, capsys, monkeypatch):
    """Offline and not cached: one line naming the checkpoint flag; the hub is never asked (no retries)."""
    real, attempts, hub = timm.create_model, [], []

    def no_network(address, *_args, **_kwargs):
        attempts.append(address)
        raise OSError("Name or service not known")

    def counted(name, pretrained=False, **kwargs):
        hub.append(pretrained)
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr("socket.create_connection", no_network)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *_a, **_k: None)
    monkeypatch.setattr(timm, "create_model", counted)
    rgb(20, 20).save(tmp_path / "x.png")
    code, _, err = run(
        ["explain", tmp_path / "x.png", "-o", tmp_path / "out", "--model", "timm:test_vit"], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot download timm weights for test_vit" in err and "set model.checkpoint (--checkpoint)" in err
    assert attempts == [("huggingface.co", 443)] and True not in hub
    assert not (tmp_path / "out").exists()


def test_safetensors_checkpoints_load_torchvision_models_too(tmp_path):
    source = torchvision.models.resnet18(num_classes=3)
    save_file(source.state_dict(), tmp_path / "r18.safetensors")
    target = torchvision.models.resnet18(num_classes=3)
    load_checkpoint(target, tmp_path / "r18.safetensors")
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[name])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ModelError, match=r"bad\.safetensors cannot be read"):
        load_checkpoint(target, tmp_path / "bad.safetensors")


def images(folder: Path) -> None:
    folder.mkdir()
    rgb(40, 30, 0).save(folder / "a.png")
    rgb(30, 40, 1).save(folder / "b.png")
    rgb(64, 64, 2).save(folder / "c.jpg")


def test_explain_a_timm_vit_from_a_safetensors_checkpoint_with_resume(tmp_path, capsys):
    save_file(test_vit().state_dict(), tmp_path / "vit.safetensors")
    images(tmp_path / "images")
    out = tmp_path / "out"
    args = ["explain", tmp_path / "images", "-o", out, "--model", "timm:test_vit"]
    args += ["--checkpoint", tmp_path / "vit.safetensors", "--top-k", "2", "--save-raw", "--workers", "0"]
    code, _, err = run(args, capsys)
    assert code == 0, err
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["layout"] == {"kind": "tokens", "grid": [10, 10], "prefix_tokens": 1}
    assert run_json["target_layer"] == "blocks.5.norm1"
    assert run_json["config"]["preprocess"]["interpolation"] is None  # the preset's bicubic was used
    labels = load_model(ModelConfig(arch="timm:test_vit"), load_weights=False).labels
    for name, (width, height) in {"a.png": (40, 30), "b.png": (30, 40), "c.jpg": (64, 64)}.items():
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["layout"] == run_json["layout"]
        assert len(summary["targets"]) == 2
        for target in summary["targets"]:
            assert target["label"] == labels[target["class"]]
            assert isinstance(target["hirescam_prefix_sum"], float) and target["hirescam_prefix_sum"] != 0
            raw = np.load(out / target["maps"]["hirescam"]["raw"])
            assert raw.shape == (10, 10) and raw.dtype == np.float32
            # the peak lands on the patch it came from: 16x16 input pixels per token, through the crop
            row, col = np.unravel_index(raw.argmax(), raw.shape)
            _, (x0, y0, x1, y1) = Preprocess(168, 160, (0.5,) * 3, (0.5,) * 3, "bicubic")(
                torch.zeros((3, height, width), dtype=torch.uint8)
            )
            peak = target["maps"]["hirescam"]["peak"]
            assert x0 + col * (x1 - x0) / 10 <= peak[0] + 1 and peak[0] <= x0 + (col + 1) * (x1 - x0) / 10
            assert y0 + row * (y1 - y0) / 10 <= peak[1] + 1 and peak[1] <= y0 + (row + 1) * (y1 - y0) / 10
    before = {p: p.read_bytes() for p in out.rglob("*-*.*")}  # maps and raw maps
    code, _, err = run([*args, "--quiet"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line["status"] for line in lines] == ["skipped"] * 3
    assert {p: p.read_bytes() for p in before} == before


def test_explain_a_multilabel_timm_vit_from_a_pt_checkpoint_threshold_and_signed(tmp_path, capsys):
    torch.save(test_vit(num_classes=3).state_dict(), tmp_path / "vit.pt")
    images(tmp_path / "images")
    (tmp_path / "c.toml").write_text(
        '[model]\narch = "timm:test_vit"\nnum_classes = 3\nmultilabel = true\ncheckpoint = "vit.pt"\n'
        "[explain]\nthreshold = 0.0\nworkers = 0\n"
    )
    out = tmp_path / "out"
    args = ["explain", tmp_path / "images", "-o", out, "-c", tmp_path / "c.toml", "--signed", "-q"]
    code, _, err = run(args, capsys)
    assert code == 0, err
    summary = json.loads((out / "a.png" / "summary.json").read_text())
    assert sorted(t["class"] for t in summary["targets"]) == [0, 1, 2]  # every sigmoid passes 0.0
    assert summary["layout"]["kind"] == "tokens"
    assert {p.name for p in (out / "a.png").glob("*.png")} == {
        f"{m}-{c}.png" for m in ("hirescam", "gradcam") for c in range(3)
    }


TINY = '[model]\nfactory = "tiny_models:{}"\n[preprocess]\nresize = [32, 32]\n'
LINE = re.compile(
    r"^(\S+)\s+(\d+(?:x\d+)*)\s+(\S+)\s+(\S+)\s+(\S+)\s+(once|\dx \(not usable\))\s+(identical|differ|-)"
)


def listed(out: str) -> dict[str, tuple[str, ...]]:
    """name -> (shape, layout, grid, prefix, runs, HiResCAM vs Grad-CAM) of each layer `layers` lists."""
    rows = {}
    for line in out.splitlines()[2:]:
        if line.startswith("identical: "):  # the closing note when auto's pick is identical
            break
        match = LINE.match(line)
        assert match, line
        rows[match[1]] = match.groups()[1:]
    return rows


def test_layers_shows_the_right_layout_for_every_token_layer(capsys):
    code, out, err = run(["layers", "--model", "timm:test_vit"], capsys)
    assert code == 0, err
    assert out.startswith("timm:test_vit, input 160x160; 'auto' picks blocks.5.norm1")
    rows = listed(out)
    assert "blocks.5.norm1" in rows and "blocks.5" in rows and "patch_embed.proj" in rows
    for name, (shape, kind, grid, prefix, _runs, _maps) in rows.items():
        dims = tuple(map(int, shape.split("x")))
        if name == "patch_embed.proj":
            assert (kind, grid, prefix) == ("nchw", "10x10", "0")
        elif len(dims) == 3:  # 10x10x64 from timm's NHWC patch embedding
            assert (kind, grid, prefix) == ("nhwc", "10x10", "0"), name
        else:
            assert dims[0] == 101 and (kind, grid, prefix) == ("tokens", "10x10", "1"), name
    after = out.split("<- auto")[1]
    assert "blocks.5.mlp" in after and "(scores do not depend on its grid)" in after


def test_layers_shows_the_right_layout_for_every_channels_last_layer(tmp_path, capsys):
    (tmp_path / "c.toml").write_text(TINY.format("tiny_swin"))
    code, out, err = run(["layers", "-c", tmp_path / "c.toml"], capsys)
    assert code == 0, err
    assert "input 32x32; 'auto' picks permute" in out
    rows = listed(out)
    assert rows["permute"][-1] == "identical"  # global average pool + linear after it
    assert out.rstrip().splitlines()[-1].startswith("identical: the gradient is constant over the grid")
    assert rows["features.0"][-1] == "differ"  # a windowed attention stage still to come
    for name, (shape, kind, grid, prefix, _runs, _maps) in rows.items():
        a, b, c = map(int, shape.split("x"))
        channels_last = a == b != c  # (h, w, K); channels-first ones are (K, h, h)
        expected = ("nhwc", f"{a}x{b}") if channels_last else ("nchw", f"{b}x{c}")
        assert (kind, grid, prefix) == (*expected, "0"), name


def test_layers_marks_an_undecidable_layer_with_the_key_to_set(tmp_path, capsys):
    (tmp_path / "c.toml").write_text(TINY.format("tiny_vit"))
    code, out, _ = run(["layers", "-c", tmp_path / "c.toml", "--layout", "nhwc"], capsys)
    assert code == 0 and "'auto' finds nothing" in out and "conv_proj" not in out  # never read channels-last
    code, out, _ = run(["layers", "-c", tmp_path / "c.toml", "--grid", "2x2"], capsys)
    assert code == 0
    assert re.search(r"encoder\.ln\s+17x16\s+\?.*\(set model\.prefix_tokens", out)
