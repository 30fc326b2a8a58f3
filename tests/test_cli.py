"""End-to-end runs of `hirescam explain` and `hirescam layers` on temporary folders."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hirescam_cli import render, resources
from hirescam_cli.cli import main
from hirescam_cli.modalities import image_overlays
from hirescam_cli.modalities.images import Preprocess

TESTS = Path(__file__).parent
CONFIG = """
[model]
factory = "tiny_models:{factory}"
[preprocess]
resize = 16
crop = 16
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]
[explain]
batch_size = 4
workers = 0
"""


@pytest.fixture(autouse=True)
def importable_tiny_models(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["hirescam", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def config(tmp_path: Path, factory: str = "tiny_net", extra: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(factory=factory) + extra)
    return path


def rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def make_folder(root: Path) -> dict[str, tuple[int, int]]:
    """Images of many modes and formats; returns key -> expected (width, height)."""
    (root / "a").mkdir(parents=True)
    sizes = {}

    def save(key: str, image: Image.Image, **kwargs) -> None:
        image.save(root / key, **kwargs)
        sizes[key] = image.size

    save("a/cat.jpg", rgb(40, 30))
    save("a/cat.png", rgb(30, 40, 1))
    save("gray.png", rgb(33, 21, 2).convert("L"))
    save("rgba.png", rgb(20, 20, 3).convert("RGBA"))
    save("palette.gif", rgb(24, 18, 4).convert("P"))
    save("cmyk.jpg", rgb(26, 22, 5).convert("CMYK"))
    save("wide.bmp", rgb(64, 16, 6))
    save("photo.webp", rgb(18, 30, 7))
    save("scan.tiff", rgb(22, 22, 8))
    deep = np.linspace(0, 65535, 25 * 17).astype(np.uint16).reshape(17, 25)
    save("deep.png", Image.fromarray(deep))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rgb(36, 20, 9).save(root / "rotated.jpg", exif=exif.tobytes())
    sizes["rotated.jpg"] = (20, 36)
    return sizes


def test_explain_mixed_folder_with_bad_files(tmp_path, capsys):
    images = tmp_path / "images"
    sizes = make_folder(images)
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.jpg").write_text("this is text, not a JPEG")
    (images / "broken.png").write_bytes((images / "a/cat.png").read_bytes()[:60])
    out = tmp_path / "out"
    code, _, err = run(
        ["explain", images, "-o", out, "-c", config(tmp_path), "--methods", "hirescam,gradcam"], capsys
    )
    assert code == 1, err
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["input"] for r in results] == sorted(r["input"] for r in results)
    status = {Path(r["input"]).relative_to(images).as_posix(): r for r in results}
    assert {k for k, r in status.items() if r["status"] == "error"} == {
        "empty.jpg",
        "notes.jpg",
        "broken.png",
    }
    assert "empty" in status["empty.jpg"]["error"]
    for key, (width, height) in sizes.items():
        record = status[key]
        assert record["status"] == "ok", record
        summary = json.loads((out / record["summary"]).read_text())
        assert (summary["width"], summary["height"]) == (width, height)
        assert summary["schema"] and summary["sha256"] and summary["model"] and summary["target_layer"] == "3"
        assert len(summary["predictions"]) == 3
        (target,) = summary["targets"]
        assert target["guarantee"] is True
        assert abs(target["completeness_gap"]) < 1e-4
        assert set(target["maps"]) == {"hirescam", "gradcam"}
        assert set(target["agreement"]) == {"pearson", "top20_iou"}
        for entry in target["maps"].values():
            with Image.open(out / entry["png"]) as png:
                assert png.size == (width, height) and png.mode == "RGB"
            assert entry["raw"] is None
            assert 0 <= entry["peak"][0] < width and 0 <= entry["peak"][1] < height
    assert not list(out.rglob("*.tmp*")) and not (out / ".tmp").exists()
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["counts"]["ok"] == len(sizes) and run_info["counts"]["error"] == 3
    assert run_info["resources"]["heap_kept"] == resources.keep_freed_heap()  # bytes, None: not tuned
    assert "3 failed" in err


def test_resume_skips_done_images_and_overwrite_redoes_them(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        rgb(20, 20, i).save(images / f"{i}.png")
    out = tmp_path / "out"
    args = ["explain", images, "-o", out, "-c", config(tmp_path), "-q"]
    assert run(args, capsys)[0] == 0
    summary = out / "0.png" / "summary.json"
    first = summary.stat().st_mtime_ns
    assert run(args, capsys)[0] == 0
    statuses = [json.loads(line)["status"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert statuses == ["skipped"] * 5
    assert summary.stat().st_mtime_ns == first
    rgb(20, 20, 99).save(images / "0.png")  # new content is redone
    assert run(args, capsys)[0] == 0
    statuses = [json.loads(line)["status"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert statuses == ["ok"] + ["skipped"] * 4
    assert run([*args, "--colormap", "viridis"], capsys)[0] == 0  # a new config redoes all
    statuses = [json.loads(line)["status"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert statuses == ["ok"] * 5
    assert run([*args, "--colormap", "viridis", "--overwrite"], capsys)[0] == 0
    statuses = [json.loads(line)["status"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert statuses == ["ok"] * 5


def test_outputs_are_registered_to_the_original_image(tmp_path, capsys):
    width, height = 48, 24
    Image.new("RGB", (width, height), (200, 200, 200)).save(tmp_path / "flat.png")
    out = tmp_path / "out"
    code, _, err = run(
        ["explain", tmp_path / "flat.png", "-o", out, "-c", config(tmp_path, "corner_net"), "--save-raw"],
        capsys,
    )
    assert code == 0, err
    summary = json.loads((out / "flat.png/summary.json").read_text())
    entry = summary["targets"][0]["maps"]["hirescam"]
    raw = np.load(out / entry["raw"])
    assert raw.shape == (8, 8) and raw.dtype == np.float32
    assert raw[0, 0] > 0 and (raw.flatten()[1:] == 0).all()
    assert entry["sum"] == pytest.approx(float(raw.sum()), rel=1e-5)
    # resize 16 (shorter side) + crop 16: the model saw x in [12, 36) of the 48 x 24 image
    _, box = Preprocess(16, 16, (0.5,) * 3, (0.5,) * 3)(torch.zeros((3, height, width), dtype=torch.uint8))
    x0, y0, x1, y1 = box
    assert (x0, y0, x1, y1) == (12.0, 0.0, 36.0, 24.0)
    cell = (x1 - x0) / 8
    assert entry["peak"] == [int(x0 + cell / 2), int(y0 + cell / 2)]
    pixels = np.asarray(Image.open(out / entry["png"]))
    grey = round(0.5 * 200 + 0.5 * 128)
    assert (pixels[:, : int(x0)] == grey).all() and (pixels[:, int(x1) :] == grey).all()
    assert (pixels[:, int(x0) : int(x1)] != grey).any(axis=-1).all()


def test_overlays_of_a_large_image_are_scaled_and_peaks_stay_in_original_pixels(tmp_path, capsys):
    width, height = 600, 400
    Image.new("RGB", (width, height), (200, 200, 200)).save(tmp_path / "flat.png")
    args = ["explain", tmp_path / "flat.png", "-c", config(tmp_path, "corner_net"), "-q"]
    assert run([*args, "-o", tmp_path / "out", "--max-side", "100"], capsys)[0] == 0
    assert run([*args, "-o", tmp_path / "full"], capsys)[0] == 0  # 600 <= 4096: not scaled
    summaries = [tmp_path / name / "flat.png/summary.json" for name in ("out", "full")]
    summary, full = (json.loads(path.read_text()) for path in summaries)
    assert (summary["width"], summary["height"]) == (600, 400)
    assert summary["overlay"] == {"width": 100, "height": 67, "scale": 100 / 600}
    assert full["overlay"] == {"width": 600, "height": 400, "scale": 1.0}
    # the numbers, peaks included, are those of the full-size run: in original pixels
    for s in (summary, full):
        s.pop("overlay"), s.pop("fingerprint")
    assert summary == full
    # resize 16 (shorter side) + crop 16: the model saw x in [100, 500) of the 600 x 400 image
    entry = summary["targets"][0]["maps"]["hirescam"]
    cell = 400 / 8
    assert entry["peak"] == [int(100 + cell / 2), int(cell / 2)]
    pixels = np.asarray(Image.open(tmp_path / "out" / entry["png"]))
    assert pixels.shape == (67, 100, 3)
    # the box lands on overlay pixels x in [16.67, 83.33): columns 17 to 82 are coloured, the rest grey
    grey = round(0.5 * 200 + 0.5 * 128)
    assert (pixels[:, :17] == grey).all() and (pixels[:, 83:] == grey).all()
    assert (pixels[:, 17:83] != grey).any(axis=-1).all()
    # HiResCAM is 1 from the box's corner to the centre of the top-left cell, (125, 25) -> (20.8, 4.2)
    hottest = (200 * 64 >> 7) + ((render.colormap_table("jet")[255].int() * 64 + 64) >> 7)
    assert (pixels[:4, 17:21] == hottest.numpy()).all() and (pixels[5:, 22:] != hottest.numpy()).any(-1).all()
    # max_side is part of the fingerprint: a rerun with another one redoes the image
    assert run([*args, "-o", tmp_path / "out", "--max-side", "100"], capsys)[0] == 0
    assert json.loads((tmp_path / "out/results.jsonl").read_text())["status"] == "skipped"
    assert run([*args, "-o", tmp_path / "out", "--max-side", "120"], capsys)[0] == 0
    assert json.loads((tmp_path / "out/results.jsonl").read_text())["status"] == "ok"
    assert Image.open(tmp_path / "out" / entry["png"]).size == (120, 80)


def test_outputs_do_not_depend_on_how_the_overlays_are_cut(tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(30, 20), (300, 180), (25, 40), (21, 17), (160, 240), (33, 33), (40, 10)]):
        rgb(*size, i).save(images / f"{i}.png")
    args = ["explain", images, "-c", config(tmp_path, extra="[output]\nsave_raw = true\n"), "-q"]
    args += ["--max-side", "120", "--top-k", "2", "--methods", "hirescam,gradcam,layercam"]
    assert run([*args, "-o", tmp_path / "whole"], capsys)[0] == 0
    # parts of at most 500 pixels (a picture each, cut images) drawn 300 pixels at a time, other batches,
    # written by processes
    monkeypatch.setattr(image_overlays, "PART_PIXELS", 500)
    monkeypatch.setattr(image_overlays, "RENDER_PIXELS", 300)
    monkeypatch.setattr(resources, "default_writers", lambda device, cores: 2)
    assert run([*args, "-o", tmp_path / "cut", "--batch-size", "3"], capsys)[0] == 0
    whole, cut = (
        {p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*") if p.is_file()}
        for name in ("whole", "cut")
    )
    whole.pop(Path("run.json")), cut.pop(Path("run.json"))
    assert len(whole) == 2 + 7 * (1 + 2 * 3 * 2) and whole == cut  # results.jsonl, .lock; per image
    for key, size in (("1.png", (120, 72)), ("4.png", (80, 120)), ("0.png", (30, 20))):
        for path in (tmp_path / "cut" / key).glob("*.png"):
            assert Image.open(path).size == size


def test_same_inputs_give_byte_identical_outputs(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        rgb(25, 19, i).save(images / f"{i}.jpg")
    trees = []
    for name in ("one", "two"):
        assert run(["explain", images, "-o", tmp_path / name, "-c", config(tmp_path), "-q"], capsys)[0] == 0
        trees.append(
            {
                p.relative_to(tmp_path / name): p.read_bytes()
                for p in (tmp_path / name).rglob("*")
                if p.is_file()
            }
        )
    trees[0].pop(Path("run.json")), trees[1].pop(Path("run.json"))
    assert trees[0] == trees[1]


def test_workers_stream_the_same_results(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(9):
        rgb(20, 24, i).save(images / f"{i}.png")
    for name, workers in (("w0", "0"), ("w2", "2")):
        args = ["explain", images, "-o", tmp_path / name, "-c", config(tmp_path), "--workers", workers, "-q"]
        assert run(args, capsys)[0] == 0
    assert (tmp_path / "w0/results.jsonl").read_text() == (tmp_path / "w2/results.jsonl").read_text()
    assert (tmp_path / "w0/5.png/summary.json").read_bytes() == (
        tmp_path / "w2/5.png/summary.json"
    ).read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-k", "0"], "explain.top_k = 0"),
        (["--alpha", "nan"], "render.alpha"),
        (["--methods", "hirescam,magic"], "'magic'"),
        (["--device", "tpu"], "explain.device"),
        (["--colormap", "nope"], "colormap"),
        (["--batch-size", "x"], "batch-size"),
        (["--no-such-flag"], "no-such-flag"),
        (["--target-layer", "nope"], "unknown target layer 'nope'"),
        (["--checkpoint", "missing.pt"], "does not exist"),
        (["--classes", "cat"], "unknown label 'cat'"),
        (["--max-side", "0"], "output.max_side = 0 is not allowed: expected a positive integer"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, args, message):
    rgb(16, 16).save(tmp_path / "x.png")
    code, _, err = run(
        ["explain", tmp_path / "x.png", "-o", tmp_path / "out", "-c", config(tmp_path), *args], capsys
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[render]\ncolour = 'red'\n", "unknown key render.colour; valid keys: colormap"),
        ("[render]\nalpha = 'three'\n", "render.alpha = 'three'"),
        ("[preprocess2]\n", "unknown config section"),
        ("[output]\nmax_side = 'large'\n", "output.max_side = 'large' is not allowed: expected a positive"),
        ("[model]\narch = 'resnet18'\n", "TOML"),  # a table defined twice
    ],
)
def test_bad_config_exit_2_with_one_line(tmp_path, capsys, extra, message):
    rgb(16, 16).save(tmp_path / "x.png")
    code, _, err = run(
        ["explain", tmp_path / "x.png", "-o", tmp_path / "out", "-c", config(tmp_path, extra=extra)], capsys
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_missing_input_exits_2(tmp_path, capsys):
    code, _, err = run(
        ["explain", tmp_path / "nothing", "-o", tmp_path / "out", "-c", config(tmp_path)], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_layers_lists_candidates_and_the_auto_pick(tmp_path, capsys):
    code, out, err = run(["layers", "-c", config(tmp_path)], capsys)
    assert code == 0, err
    assert "'auto' picks 3" in out
    assert "<- auto" in out


def test_progress_lines_when_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    rgb(16, 16).save(tmp_path / "x.png")
    run(["explain", tmp_path / "x.png", "-o", tmp_path / "out", "-c", config(tmp_path)], capsys)
    assert "1/1 inputs" in sys.stderr.getvalue()


def test_both_png_encoders_give_the_same_pixels(tmp_path, capsys):
    rgb(37, 29).save(tmp_path / "x.png")
    for png in ("fast", "small"):
        args = [
            "explain",
            tmp_path / "x.png",
            "-o",
            tmp_path / png,
            "-c",
            config(tmp_path),
            "--png",
            png,
            "-q",
        ]
        assert run(args, capsys)[0] == 0
    fast, small = (
        np.asarray(Image.open(next((tmp_path / png / "x.png").glob("hirescam-*.png"))))
        for png in ("fast", "small")
    )
    assert fast.shape == (29, 37, 3) and np.array_equal(fast, small)


@pytest.mark.parametrize(
    ("preprocess", "message"),
    [
        ("resize = -5\ncrop = 16", "preprocess.resize = -5 is not allowed: expected a positive integer"),
        ("resize = 16\ncrop = 0", "preprocess.crop = 0"),
        ("resize = [16]\ncrop = 16", "an integer or [height, width]"),
        ("resize = 16.5\ncrop = 16", "preprocess.resize = 16.5"),
        ("resize = 16\nmean = [0.5, 0.5]", "preprocess.mean"),
        ("resize = 16\nstd = [0.5, 0.0, 0.5]", "three positive numbers"),
        ("resize = 16\nmax_pixels = 0", "preprocess.max_pixels = 0"),
        ("resize = 'big'", "preprocess.resize = 'big'"),
    ],
)
def test_bad_preprocess_values_exit_2_with_one_line(tmp_path, capsys, preprocess, message):
    text = CONFIG.format(factory="tiny_net")
    start, end = text.index("[preprocess]"), text.index("[explain]")
    (tmp_path / "c.toml").write_text(text[:start] + "[preprocess]\n" + preprocess + "\n" + text[end:])
    rgb(16, 16).save(tmp_path / "x.png")
    code, _, err = run(
        ["explain", tmp_path / "x.png", "-o", tmp_path / "out", "-c", tmp_path / "c.toml"], capsys
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_layers_of_a_torchvision_config_need_no_download(capsys, monkeypatch):
    def offline(*_args, **_kwargs):
        raise OSError("no network")

    monkeypatch.setattr("torch.hub.load_state_dict_from_url", offline)
    code, out, err = run(["layers", "-c", TESTS.parent / "configs" / "resnet50.toml"], capsys)
    assert code == 0, err
    assert "input 224x224; 'auto' picks layer4" in out
    assert "layer4.2.relu" in out and "3x (not usable)" in out


def test_classes_by_label_name_and_signed_maps(tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("apple\nbanana\ncherry\n")
    rgb(20, 20).save(tmp_path / "x.png")
    args = ["explain", tmp_path / "x.png", "-o", tmp_path / "out", "-c", config(tmp_path), "-q"]
    code, _, err = run(
        [*args, "--labels", tmp_path / "labels.txt", "--classes", "cherry,0", "--signed"], capsys
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "out/x.png/summary.json").read_text())
    assert [(t["class"], t["label"]) for t in summary["targets"]] == [(2, "cherry"), (0, "apple")]
    assert {p.name for p in (tmp_path / "out/x.png").glob("*.png")} == {
        "hirescam-2.png",
        "gradcam-2.png",
        "hirescam-0.png",
        "gradcam-0.png",
    }


def test_threshold_targets_each_get_their_own_class_map(tmp_path, capsys):
    from tiny_models import tiny_net

    from hirescam_cli import Explainer
    from hirescam_cli.modalities.image_files import decode

    text = CONFIG.format(factory="tiny_net").replace("[preprocess]", "multilabel = true\n[preprocess]")
    (tmp_path / "c.toml").write_text(text)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        rgb(18, 18, i).save(images / f"{i}.png")
    args = ["explain", images, "-o", tmp_path / "out", "-c", tmp_path / "c.toml", "--threshold", "0.5"]
    assert run([*args, "--save-raw", "-q"], capsys)[0] == 0
    preprocess = Preprocess(16, 16, (0.5,) * 3, (0.5,) * 3)
    counts = set()
    with Explainer(tiny_net(), "3") as explainer:
        for i in range(8):
            summary = json.loads((tmp_path / f"out/{i}.png/summary.json").read_text())
            counts.add(len(summary["targets"]))
            x, _ = preprocess(torch.from_numpy(decode((images / f"{i}.png").read_bytes(), None)))
            for target in summary["targets"]:
                assert target["probability"] >= 0.5
                expected = explainer(x[None], classes=target["class"]).maps["hirescam"][0, 0]
                raw = np.load(tmp_path / "out" / target["maps"]["hirescam"]["raw"])
                np.testing.assert_allclose(raw, expected.numpy(), rtol=1e-4, atol=1e-6)
    assert len(counts) > 1, "the images should differ in how many classes pass"


def test_inputs_with_no_class_above_the_threshold_are_accounted_for(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        rgb(16, 16, seed=i).save(images / f"{i}.png")
    cfg = config(tmp_path, extra="")
    cfg.write_text(cfg.read_text().replace("[model]\n", "[model]\nmultilabel = true\n"))
    out = tmp_path / "out"
    code, _, err = run(["explain", images, "-o", out, "-c", cfg, "--threshold", "1.0", "--report"], capsys)
    assert code == 0, err
    assert "0 explained, 3 with no class above 1.0 (no heatmap), 0 skipped, 0 failed" in err
    for record in map(json.loads, (out / "results.jsonl").read_text().splitlines()):
        assert record["status"] == "ok" and record["no_target"] is True
        summary = json.loads((out / record["summary"]).read_text())
        assert summary["targets"] == [] and not list((out / record["summary"]).parent.glob("*.png"))
        best = summary["predictions"][0]
        assert summary["no_target"] == {
            "threshold": 1.0,
            "best_class": best["class"],
            "best_label": best["label"],
            "best_probability": best["probability"],
        }
    assert json.loads((out / "run.json").read_text())["counts"]["no_target"] == 3
    page = (out / "report" / "index.html").read_text()
    assert page.count("no class above the threshold 1.0 (best: ") == 3


@pytest.mark.parametrize(
    "preprocess, message",
    [
        ("resize = 16\ncrop = 20", "preprocess.crop = 20 is larger than preprocess.resize = 16"),
        ("resize = [16, 16]\ncrop = [12, 20]", "preprocess.crop = [12, 20] is larger than preprocess.resize"),
        ("crop = 300", "preprocess.crop = 300 is larger than the resize of 256 (the default)"),
    ],
)
def test_a_crop_larger_than_the_resize_is_refused_naming_both(tmp_path, capsys, preprocess, message):
    text = CONFIG.format(factory="tiny_net")
    start, end = text.index("[preprocess]"), text.index("[explain]")
    (tmp_path / "c.toml").write_text(text[:start] + "[preprocess]\n" + preprocess + "\n" + text[end:])
    rgb(16, 16).save(tmp_path / "x.png")
    args = ["explain", tmp_path / "x.png", "-o", tmp_path / "out", "-c", tmp_path / "c.toml"]
    code, _, err = run(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_is_a_usage_error(tmp_path, capsys):
    rgb(16, 16).save(tmp_path / "x.png")
    (tmp_path / "out.txt").write_text("not a folder")
    code, _, err = run(["explain", tmp_path / "x.png", "-o", tmp_path / "out.txt"], capsys)
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["eval", tmp_path / "x.png", "-o", tmp_path / "out.txt"], capsys)
    assert code == 2 and "is a file, not a folder" in err


def test_a_selection_flag_replaces_the_configs_and_two_are_refused(tmp_path, capsys):
    rgb(16, 16).save(tmp_path / "x.png")
    cfg = config(tmp_path)
    cfg.write_text(cfg.read_text().replace("[model]\n", "[model]\nmultilabel = true\n") + "threshold = 1.0\n")
    out = tmp_path / "out"
    code, _, err = run(["explain", tmp_path / "x.png", "-o", out, "-c", cfg, "--top-k", "2"], capsys)
    assert code == 0, err
    assert len(json.loads((out / "x.png" / "summary.json").read_text())["targets"]) == 2
    args = ["explain", tmp_path / "x.png", "-o", out, "-c", cfg, "--top-k", "2", "--classes", "1"]
    code, _, err = run(args, capsys)
    assert code == 2 and "give one of --top-k, --classes, --threshold" in err
