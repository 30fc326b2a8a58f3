"""JPEGs decoded on the device in batches (nvJPEG on CUDA), with torchvision's CPU decoder standing in."""

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import config, run
from test_writers import tree

from hirescam_cli.batches import InputDataset, make_loader
from hirescam_cli.discovery import discover
from hirescam_cli.modalities import images as images_module
from hirescam_cli.modalities.images import Images, Preprocess

CPU = torch.device("cpu")
PREPROCESS = Preprocess(resize=20, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour field with a little texture."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (3, 4, 3), dtype=np.uint8)).resize((width, height))
    noise = rng.integers(-8, 8, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(small, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, orientation: int = 1) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()


def truncated(data: bytes) -> bytes:
    """A JPEG whose header is whole but whose picture data stops early: no decoder can finish it."""
    return data[: data.index(b"\xff\xda") + 200]


def loaded(modality: Images, files: list[Path]):
    """The batch of `files` as the loader (in this process) hands it over."""
    loader = make_loader(InputDataset(discover([str(f) for f in files]), modality), len(files), 0)
    (batch,) = list(loader)
    return batch


def write(folder: Path, files: dict[str, bytes]) -> list[Path]:
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpegs_decoded_on_the_device_keep_the_geometry_of_the_cpu_path(tmp_path, orientation):
    data = jpeg(photo(30, 22, orientation), orientation)
    on_cpu = Images(PREPROCESS, max_side=64)
    files = write(tmp_path, {"a.jpg": data, "b.jpg": jpeg(photo(17, 25, 9))})
    expected = on_cpu.finish(loaded(on_cpu, files), CPU)
    device = on_cpu.for_device(CPU)
    assert not device.jpeg_on_device  # only CUDA decodes on the device, unless told (below)
    device = replace(device, jpeg_on_device=True)
    batch = loaded(device, files)
    assert batch.inputs == [None, None] and all(p is not None for p in batch.views.pending)
    got = device.finish(batch, CPU)
    assert got.indices == expected.indices and got.failed == []
    assert got.views.sizes == expected.views.sizes
    assert torch.equal(got.views.boxes, expected.views.boxes)
    for mine, theirs in zip(got.views.pictures, expected.views.pictures, strict=True):
        assert mine.shape == theirs.shape
        assert (mine.float() - theirs.float()).abs().mean() <= 1.0  # two JPEG decoders round alike, nearly
    assert got.inputs.shape == expected.inputs.shape
    assert (got.inputs - expected.inputs).abs().mean() <= 4 / 255 / 0.25


def test_a_corrupt_jpeg_in_a_device_batch_fails_alone_and_the_rest_are_decoded_once(tmp_path, monkeypatch):
    good = jpeg(photo(30, 22))
    cmyk = io.BytesIO()
    photo(20, 20, 3).convert("CMYK").save(cmyk, "JPEG")
    png = io.BytesIO()
    photo(26, 18, 4).save(png, "PNG")
    files = write(
        tmp_path,
        {
            "0.jpg": good,
            "1.jpg": truncated(jpeg(photo(24, 24, 1))),
            "2.png": png.getvalue(),
            "3.jpg": cmyk.getvalue(),
            "4.jpg": jpeg(photo(22, 30, 2)),
        },
    )
    calls = []
    real = images_module.device_decode

    def counted(batch, device):
        calls.append(len(batch))
        return real(batch, device)

    monkeypatch.setattr(images_module, "device_decode", counted)
    modality = Images(PREPROCESS, max_side=64, jpeg_on_device=True)
    batch = loaded(modality, files)
    assert [p is not None for p in batch.views.pending] == [True, True, False, False, True]  # PNG, CMYK: CPU
    got = modality.finish(batch, CPU)
    assert calls == [3, 1, 1, 1]  # the batch failed, so each JPEG alone
    assert got.indices == [0, 2, 3, 4]
    ((index, error),) = got.failed
    assert index == 1 and "truncated" in error
    cpu = Images(PREPROCESS, max_side=64)
    expected = cpu.finish(loaded(cpu, files), CPU)
    assert expected.indices == got.indices
    for row in (1, 2):  # the PNG and the CMYK JPEG: decoded by the workers, exactly as without a device
        assert torch.equal(got.inputs[row], expected.inputs[row])
        assert torch.equal(got.views.pictures[row], expected.views.pictures[row])


def test_a_jpeg_the_device_cannot_decode_is_decoded_on_the_cpu(tmp_path, monkeypatch):
    files = write(tmp_path, {"0.jpg": jpeg(photo(30, 22)), "1.jpg": jpeg(photo(18, 24, 5), orientation=6)})
    real = images_module.device_decode

    second = files[1].stat().st_size

    def refuses_the_second(batch, device):
        if any(file.numel() == second for file in batch):
            raise RuntimeError("nvjpeg: unsupported")
        return real(batch, device)

    monkeypatch.setattr(images_module, "device_decode", refuses_the_second)
    modality = Images(PREPROCESS, max_side=64, jpeg_on_device=True)
    got = modality.finish(loaded(modality, files), CPU)
    cpu = Images(PREPROCESS, max_side=64)
    expected = cpu.finish(loaded(cpu, files), CPU)
    assert got.failed == [] and got.views.sizes == expected.views.sizes == [(22, 30), (18, 24)]
    assert torch.equal(got.inputs[1], expected.inputs[1])  # Pillow, as the workers decode it
    assert torch.equal(got.views.pictures[1], expected.views.pictures[1])


def test_runs_with_the_device_decoder_write_the_same_pngs_for_png_inputs(tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        photo(20 + i, 18, i).save(images / f"{i}.png")
    (images / "bad.jpg").write_bytes(truncated(jpeg(photo(20, 20))))
    (images / "good.jpg").write_bytes(jpeg(photo(21, 19, 7), orientation=8))
    args = ["-c", config(tmp_path, extra="[output]\nsave_raw = true\n"), "-q", "--top-k", "2"]
    assert run(["explain", images, "-o", tmp_path / "cpu", *args], capsys)[0] == 1
    monkeypatch.setattr(Images, "for_device", lambda self, device: replace(self, jpeg_on_device=True))
    assert run(["explain", images, "-o", tmp_path / "device", *args], capsys)[0] == 1  # bad.jpg failed
    cpu, device = tree(tmp_path / "cpu"), tree(tmp_path / "device")
    pngs = [p for p in cpu if p.parts[0].endswith(".png")]
    assert len(pngs) == 5 * (1 + 2 * 2 * 2)
    assert all(cpu[p] == device[p] for p in pngs)
    assert cpu.keys() == device.keys()  # the JPEG's files too, upright, at the size Pillow saw
