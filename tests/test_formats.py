"""Overlay formats: PNG (the default), JPEG and WebP files, encoded on the host or on the device."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import config, run

from hirescam_cli import render, resources
from hirescam_cli.formats import PictureFormat, picture_of

TESTS = Path(__file__).parent


def smooth_images(folder: Path, count: int = 3) -> Path:
    """Photo-like pictures of a few sizes (smooth colour fields: what lossy formats are for)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(64, 48), (40, 56), (50, 50)][:count]):
        small = Image.fromarray(rng.integers(0, 255, (3, 4, 3), dtype=np.uint8))
        small.resize(size, Image.BICUBIC).save(folder / f"{i}.png")
    return folder


def explain(tmp_path: Path, capsys, name: str, *flags: str) -> Path:
    """Explain the smooth images into tmp_path/name; returns OUT."""
    images = tmp_path / "images"
    if not images.exists():
        smooth_images(images)
    out = tmp_path / name
    args = ["explain", images, "-o", out, "-c", config(tmp_path), "-q", "--top-k", "2", *flags]
    assert run(args, capsys)[0] == 0
    return out


def pictures(out: Path) -> dict[str, tuple[str, np.ndarray]]:
    """(method, class) of every map of every summary -> (its picture's path, its decoded pixels)."""
    found = {}
    for summary_file in sorted(out.glob("*/summary.json")):
        summary = json.loads(summary_file.read_text())
        size = (summary["overlay"]["width"], summary["overlay"]["height"])
        for target in summary["targets"]:
            for method, files in target["maps"].items():
                path = picture_of(files)
                with Image.open(out / path) as image:
                    assert image.size == size
                    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
                found[f"{summary['key']}/{method}-{target['class']}"] = (path, pixels)
    return found


def assert_near(lossy: dict, lossless: dict, extension: str) -> None:
    """Every lossy picture decodes to its PNG twin's size within a bounded error."""
    assert lossy.keys() == lossless.keys() and lossy
    for name, (path, pixels) in lossy.items():
        assert path.endswith(f".{extension}") and path.removesuffix(extension) == lossless[name][0][:-3]
        error = np.abs(pixels - lossless[name][1])
        # out of 255, at quality 90, on pictures of 64 x 48: about 4.5 and 30 dB at worst here
        assert error.mean() <= 6.0, (name, error.mean())
        psnr = 10 * np.log10(255**2 / max((error**2).mean(), 1e-12))
        assert psnr >= 28, (name, psnr)


@pytest.mark.parametrize(("name", "extension"), [("jpeg", "jpg"), ("webp", "webp")])
def test_lossy_overlays_decode_to_the_overlay_size_near_the_png_ones(tmp_path, capsys, name, extension):
    png = pictures(explain(tmp_path, capsys, "png"))
    out = explain(tmp_path, capsys, name, "--format", name)
    assert_near(pictures(out), png, extension)
    run_facts = json.loads((out / "run.json").read_text())
    assert run_facts["pictures"] == {
        "format": name,
        "quality": 90,
        "encoder": {"jpeg": "libjpeg-turbo", "webp": "libwebp"}[name],
        "encoded_on": "host",
    }
    assert not [path for path in out.rglob("*.png") if path.is_file()]
    rerun = ["explain", tmp_path / "images", "-o", out, "-c", config(tmp_path), "--top-k", "2"]
    assert "3 skipped" in run([*rerun, "--format", name], capsys)[2]  # resume knows the files
    assert "3 explained" in run([*rerun, "--format", "png"], capsys)[2]  # another format: redone
    assert not [path for path in out.rglob(f"*.{extension}") if path.is_file()]


def test_quality_trades_size_for_fidelity(tmp_path, capsys):
    low = explain(tmp_path, capsys, "low", "--format", "jpeg", "--quality", "20")
    high = explain(tmp_path, capsys, "high", "--format", "jpeg", "--quality", "95")
    size = lambda out: sum(p.stat().st_size for p in out.rglob("*.jpg"))  # noqa: E731
    assert size(low) < size(high)


@pytest.mark.parametrize("processes", [0, 2])
def test_jpeg_encoded_on_the_device_is_written_whole(tmp_path, capsys, monkeypatch, processes):
    """The device path (batched encode_jpeg, one copy of the bytes), CPU tensors standing in for CUDA."""
    png = pictures(explain(tmp_path, capsys, "png"))
    used = []

    def on_device(picture_format: PictureFormat, device: torch.device):
        used.append(device.type)
        return lambda canvas, sizes: render.encode_jpeg(canvas, sizes, picture_format.quality)

    monkeypatch.setattr(render, "device_encoder", on_device)
    monkeypatch.setattr(resources, "default_writers", lambda device, cores: processes)
    monkeypatch.setenv("PYTHONPATH", str(TESTS.parent))
    out = explain(tmp_path, capsys, "device", "--format", "jpeg")
    assert used and set(used) == {"cpu"}
    assert_near(pictures(out), png, "jpg")
    assert json.loads((out / "run.json").read_text())["pictures"]["encoded_on"] == "cpu"


def test_encode_jpeg_cuts_each_picture_to_its_own_size():
    rng = np.random.default_rng(1)
    canvas = torch.from_numpy(rng.integers(0, 255, (2, 3, 20, 30, 3), dtype=np.uint8))
    files = render.encode_jpeg(canvas, [(20, 30), (11, 7)], quality=95)
    assert [len(row) for row in files] == [3, 3]
    for i, (h, w) in enumerate([(20, 30), (11, 7)]):
        for c in range(3):
            image = torchvision_decode(files[i][c])
            assert image.shape == (3, h, w)


def torchvision_decode(data: bytes) -> torch.Tensor:
    import torchvision

    return torchvision.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


@pytest.mark.parametrize(
    ("key", "value"), [("format", "gif"), ("quality", 0), ("quality", 101), ("quality", True)]
)
def test_bad_format_keys_are_one_line_errors(tmp_path, capsys, key, value):
    images = smooth_images(tmp_path / "images", 1)
    toml = f"[output]\n{key} = {json.dumps(value)}\n"
    code, _, err = run(
        ["explain", images, "-o", tmp_path / "out", "-c", config(tmp_path, extra=toml)], capsys
    )
    assert code == 2 and f"output.{key}" in err and "Traceback" not in err


def test_report_and_compare_read_overlays_of_any_format(tmp_path, capsys):
    """Thumbnails of WebP overlays in the report; compare names each side's picture whatever its format."""
    from report_runs import report_data

    from hirescam_cli.report import write_report

    png, webp = explain(tmp_path, capsys, "png"), explain(tmp_path, capsys, "webp", "--format", "webp")
    write_report(webp)
    cells = [cell for image in report_data(webp)["images"] for t in image["t"] for cell in t["m"]]
    assert len(cells) == 3 * 2 * 2 and all(cell[0] and cell[1].endswith(".webp") for cell in cells)
    assert run(["compare", png, webp, "-o", tmp_path / "compare"], capsys)[0] == 0
    rows = json.loads((tmp_path / "compare" / "compare.json").read_text())["inputs"]
    maps = [m for row in rows for c in row["classes"] for m in c["maps"].values()]
    assert len(maps) == 3 * 2 * 2
    assert all(m["base_png"].endswith(".png") and m["new_png"].endswith(".webp") for m in maps)
    assert all(m["pearson"] > 0.99 for m in maps)
