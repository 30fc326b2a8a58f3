"""Input discovery, decoding, preprocessing geometry, the dataset, collation and the loader."""

import hashlib
import io
import logging
import os
import struct
import unicodedata
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from hirescam_cli import batches, discovery
from hirescam_cli.batches import Batch, InputDataset, Sample, make_loader
from hirescam_cli.discovery import InputError, InputItem, discover
from hirescam_cli.modalities import image_files
from hirescam_cli.modalities.image_files import ImageError
from hirescam_cli.modalities.image_overlays import covered, register
from hirescam_cli.modalities.images import Images, PictureView, Preprocess, overlay_image, overlay_size

IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean, std: model input = pixel / 255


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    """Encode a Pillow image to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write(path: Path, content: bytes = b"") -> Path:
    """Create a file (and its folders)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def decode(data: bytes, max_pixels: int | None, resize=None) -> torch.Tensor:
    """image_files.decode as a (3, H, W) tensor."""
    return torch.from_numpy(image_files.decode(data, max_pixels, resize))


def ImageDataset(items, preprocess, max_pixels, skip=None, overlay_side=None) -> InputDataset:
    """The dataset of a pictures run with this preprocessing."""
    return InputDataset(items, Images(preprocess, max_pixels, overlay_side), skip)


def collate(samples: list[Sample]) -> Batch:
    return batches.collate(samples, Images(Preprocess(None, None, *IDENTITY)).collate)


def keys(items: list[InputItem]) -> list[str]:
    """The keys of discovered items."""
    return [item.key for item in items]


def pixels(tensor: torch.Tensor) -> np.ndarray:
    """A (3, H, W) tensor as an (H, W, 3) int array."""
    return tensor.permute(1, 2, 0).numpy().astype(int)


# --------------------------------------------------------------------------------------------------
# discovery


def test_folder_is_walked_recursively_keeping_image_extensions(tmp_path):
    for name in ["b.jpg", "a.PNG", "sub/c.Jpeg", "sub/deep/d.webp", "notes.txt", "model.h5",
                 "doc.pdf", "sub/.hidden.jpg", ".cache/e.jpg", "noext"]:
        write(tmp_path / name)
    items = discover([tmp_path])
    assert keys(items) == ["a.PNG", "b.jpg", "sub/c.Jpeg", "sub/deep/d.webp"]
    assert items[0].path == tmp_path / "a.PNG"


def test_explicit_file_is_taken_whatever_its_extension(tmp_path):
    scan = write(tmp_path / "x" / "scan.dat")
    assert discover([str(scan)]) == [InputItem(scan, "scan.dat")]


def test_glob_patterns_non_recursive_and_recursive(tmp_path, monkeypatch):
    for name in ["a.jpg", "b.png", "notes.txt", "sub/c.jpg", "sub/deep/d.jpg", "sub/deep/e.png"]:
        write(tmp_path / "data" / name)
    monkeypatch.chdir(tmp_path)
    assert discover(["data/*.jpg"]) == [InputItem(tmp_path / "data" / "a.jpg", "a.jpg")]  # absolute path
    assert keys(discover(["data/**/*.jpg"])) == ["a.jpg", "sub/c.jpg", "sub/deep/d.jpg"]
    assert keys(discover(["data/s?b/*/[d-e].*"])) == ["sub/deep/d.jpg", "sub/deep/e.png"]
    # matched files are filtered by extension, matched folders are walked
    assert keys(discover(["data/*"])) == ["a.jpg", "b.png", "sub/c.jpg", "sub/deep/d.jpg", "sub/deep/e.png"]
    assert keys(discover(["data/**"])) == keys(discover(["data"]))
    # keys stay relative to the pattern's literal folder, whatever matched
    assert keys(discover(["data/*/deep/*.png"])) == ["sub/deep/e.png"]


def test_result_is_sorted_by_key_and_deduplicated(tmp_path):
    for name in ["z.jpg", "m/b.jpg", "a.jpg", "m/a.jpg"]:
        write(tmp_path / name)
    items = discover([tmp_path / "z.jpg", tmp_path, str(tmp_path / "m" / "*.jpg"), tmp_path / "a.jpg"])
    assert keys(items) == ["a.jpg", "m/a.jpg", "m/b.jpg", "z.jpg"]
    assert len({item.path for item in items}) == 4


def test_keys_are_relative_to_the_deepest_common_folder(tmp_path):
    cat = write(tmp_path / "top" / "a" / "cat.jpg")
    write(tmp_path / "top" / "a" / "cat.png")
    dog = write(tmp_path / "top" / "b" / "dog.jpg")
    assert keys(discover([tmp_path / "top" / "a"])) == ["cat.jpg", "cat.png"]
    assert keys(discover([cat])) == ["cat.jpg"]
    both = discover([tmp_path / "top" / "a", dog])
    assert keys(both) == ["a/cat.jpg", "a/cat.png", "b/dog.jpg"]  # same stem, distinct keys
    # ".." in arguments is normalised away: keys never climb or start at the root
    odd = discover([str(tmp_path / "top" / "b" / ".." / "a"), "/" + str(tmp_path / "top" / "." / "b")])
    assert keys(odd) == keys(both)
    for key in keys(odd):
        assert not key.startswith("/") and ".." not in key.split("/")


def test_non_utf8_and_control_character_names_get_safe_keys(tmp_path):
    folder = os.fsencode(tmp_path)
    for raw in [b"caf\xe9.jpg", b"tab\tname.jpg", b"ok.jpg"]:
        Path(os.fsdecode(folder + b"/" + raw)).write_bytes(b"x")
    items = discover([tmp_path])
    assert keys(items) == ["caf%E9.jpg", "ok.jpg", "tab%09name.jpg"]
    for item in items:
        item.key.encode("utf-8")  # valid UTF-8
        assert item.path.read_bytes() == b"x"  # the path still names the real file


def test_keys_made_equal_by_sanitising_or_case_get_suffixes(tmp_path):
    folder = os.fsencode(tmp_path)
    names = [b"caf\xe9.jpg", b"caf%E9.jpg", b"caf%E9~2.jpg", b"x\x01.jpg", b"x%01.jpg", b"Cat.jpg"]
    for raw in [*names, b"cat.jpg"]:
        Path(os.fsdecode(folder + b"/" + raw)).write_bytes(raw)
    by_key = {item.key: item.path.read_bytes() for item in discover([tmp_path])}
    assert by_key == {
        "caf%E9.jpg": b"caf%E9.jpg",  # the name that needed no change keeps the plain key
        "caf%E9~2.jpg": b"caf%E9~2.jpg",
        "caf%E9~3.jpg": b"caf\xe9.jpg",  # ~2 is taken by a real file
        "x%01.jpg": b"x%01.jpg",  # wins although the raw b"x\x01.jpg" sorts first
        "x%01~2.jpg": b"x\x01.jpg",
        "Cat.jpg": b"Cat.jpg",
        "cat~2.jpg": b"cat.jpg",  # would collide on a case-insensitive output disk
    }


@given(st.lists(st.binary(min_size=1, max_size=6).filter(lambda b: b"/" not in b and b"\0" not in b),
                unique=True, max_size=8))
def test_unique_keys_are_distinct_printable_and_keep_clean_names(names):
    relative = [os.fsdecode(name) for name in names if name not in (b".", b"..")]
    safe = discovery._unique_keys(relative)
    assert len({key.casefold() for key in safe}) == len(relative)
    for raw, key in zip(relative, safe, strict=True):
        key.encode("utf-8")
        assert not {unicodedata.category(c) for c in key} & {"Cc", "Cs", "Zl", "Zp"}
        if raw.isprintable() and raw.casefold() not in {r.casefold() for r in relative if r != raw}:
            assert key == raw


def test_symlink_loops_terminate_and_real_paths_win(tmp_path):
    root = tmp_path / "root"
    write(root / "real" / "a.jpg")
    write(root / "real" / "sub" / "b.jpg")
    (root / "real" / "sub" / "up").symlink_to("..")  # loop back to real
    (root / "loop").symlink_to(".")  # loop to the root itself
    (root / "0alias").symlink_to("real")  # sorts before "real" but must not claim it
    expected = ["real/a.jpg", "real/sub/b.jpg"]
    assert keys(discover([root])) == expected
    assert keys(discover([str(root / "**" / "*.jpg")])) == expected


def test_symlinked_folder_outside_the_tree_is_followed(tmp_path):
    write(tmp_path / "elsewhere" / "x.jpg")
    write(tmp_path / "data" / "own.jpg")
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "elsewhere")
    assert keys(discover([tmp_path / "data"])) == ["linked/x.jpg", "own.jpg"]


def test_folder_named_like_an_image_is_walked(tmp_path):
    write(tmp_path / "x.jpg" / "inner.png")
    write(tmp_path / "y.jpg")
    assert keys(discover([tmp_path])) == ["x.jpg/inner.png", "y.jpg"]
    assert keys(discover([tmp_path / "x.jpg"])) == ["inner.png"]


def test_broken_links_are_listed_and_special_files_skipped(tmp_path):
    write(tmp_path / "good.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "self.jpg").symlink_to(tmp_path / "self.jpg")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing.txt")
    os.mkfifo(tmp_path / "pipe.jpg")  # reading it would block forever
    assert keys(discover([tmp_path])) == ["gone.jpg", "good.jpg", "self.jpg"]


def test_unreadable_subfolder_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    write(tmp_path / "ok" / "a.jpg")
    write(tmp_path / "locked" / "b.jpg")
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="hirescam_cli.discovery"):
        assert keys(discover([tmp_path])) == ["ok/a.jpg"]
    assert "locked" in caplog.text and "Permission denied" in caplog.text
    with pytest.raises(InputError, match=r"cannot read folder .*locked: Permission denied"):
        discover([tmp_path / "locked"])


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("missing.jpg", "no such file or folder: .*missing.jpg"),
        ("nothing/*.jpg", r"no image files match .*nothing/\*.jpg"),
        ("data/*.gif", r"no image files match .*data/\*.gif"),
        ("data/sub", "no image files found in folder .*data/sub"),
    ],
)
def test_inputs_that_yield_nothing_raise_input_error(tmp_path, monkeypatch, argument, message):
    write(tmp_path / "data" / "a.jpg")
    write(tmp_path / "data" / "sub" / "notes.txt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=message):
        discover(["data", argument])
    with pytest.raises(InputError, match="no inputs"):
        discover([])


# --------------------------------------------------------------------------------------------------
# decoding


def test_rgb_round_trip_is_exact():
    image = noise(7, 5)
    decoded = decode(encode(image, "PNG"), None)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 5, 7)
    assert decoded.permute(1, 2, 0).is_contiguous()  # channels last, as Pillow decodes
    assert (pixels(decoded) == np.asarray(image)).all()


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (4, 3), 77), (77, 77, 77)),
        (Image.new("1", (4, 3), 1), (255, 255, 255)),
        (Image.new("LA", (4, 3), (0, 0)), (255, 255, 255)),  # transparent over white
        (Image.new("LA", (4, 3), (0, 255)), (0, 0, 0)),
        (Image.new("LA", (4, 3), (0, 128)), (127, 127, 127)),
        (Image.new("RGBA", (4, 3), (200, 0, 0, 0)), (255, 255, 255)),
        (Image.new("RGBA", (4, 3), (200, 10, 20, 255)), (200, 10, 20)),
        (Image.new("RGBA", (4, 3), (0, 0, 0, 102)), (153, 153, 153)),
    ],
    ids=["L", "1", "LA-clear", "LA-opaque", "LA-half", "RGBA-clear", "RGBA-opaque", "RGBA-partial"],
)
def test_modes_convert_to_rgb(image, expected):
    decoded = pixels(decode(encode(image, "PNG"), None))
    assert decoded.shape == (3, 4, 3)
    assert (np.abs(decoded - expected) <= 1).all()


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_composited_over_white(fmt):
    image = Image.new("P", (4, 2), 1)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red (transparent), 1: blue
    image.putpixel((0, 0), 0)
    decoded = pixels(decode(encode(image, fmt, transparency=0), None))
    assert decoded[0, 0].tolist() == [255, 255, 255]
    assert (decoded.reshape(-1, 3)[1:] == [0, 0, 255]).all()


def test_cmyk_jpeg_converts_to_rgb():
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # cyan-free, full magenta+yellow: red
    decoded = pixels(decode(encode(image, "JPEG", quality=95), None))
    assert (np.abs(decoded - (255, 0, 0)) <= 2).all()


def test_16_bit_gradient_uses_the_full_range_without_clipping():
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :].repeat(3, 0)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    decoded = decode(encode(image, "PNG"), None)
    row = decoded[0, 1].numpy().astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 200
    assert (decoded[0] == decoded[1]).all() and (decoded[1] == decoded[2]).all()


def test_16_bit_data_in_a_smaller_range_keeps_its_level():
    # as image viewers show it: 4095 of 65535 is dark, not stretched to white
    image = Image.fromarray(np.array([[0, 4095]], dtype=np.uint16))
    assert decode(encode(image, "PNG"), None)[0, 0].tolist() == [0, 16]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[-100, 0, 300]], np.int32), [0, 64, 255]),  # outside 0..65535: min..max
        (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),  # float nominal 0..1
        (np.array([[-1.0, np.nan, 3.0]], np.float32), [0, 64, 255]),  # min..max, NaN as 0
        (np.array([[7.0, 7.0, 7.0]], np.float32), [0, 0, 0]),  # constant outside 0..1
    ],
)
def test_32_bit_integer_and_float_images_scale_by_value_range(values, expected):
    decoded = decode(encode(Image.fromarray(values), "TIFF"), None)
    assert decoded[:, 0].tolist() == [expected] * 3


def test_animated_gif_takes_the_first_frame():
    frames = [Image.new("RGB", (6, 4), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 3
    assert (pixels(decode(gif, None)) == (255, 0, 0)).all()


def test_animated_webp_takes_the_first_frame():
    frames = [Image.new("RGB", (6, 4), colour) for colour in [(0, 0, 255), (0, 255, 0)]]
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert (pixels(decode(webp, None)) == (0, 0, 255)).all()


def test_exif_orientation_6_rotates_clockwise():
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:5, :10] = 255  # a white block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    jpeg = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    decoded = pixels(decode(jpeg, None))
    assert decoded.shape == (40, 20, 3)  # width and height swapped
    clockwise, counter = np.rot90(stored, k=-1), np.rot90(stored, k=1)
    assert np.abs(decoded - clockwise).mean() < 3 < np.abs(decoded - counter).mean()
    assert decoded[:10, 15:].mean() > 240  # the block is now top-right


def test_unusable_data_raises_one_line_image_errors():
    jpeg, png = encode(noise(64, 48), "JPEG"), encode(noise(64, 48), "PNG")
    cases = {
        b"": "empty file",
        os.urandom(2000): "not an image (cannot identify format)",
        b"<!doctype html><html><body>not found</body></html>": "not an image (cannot identify format)",
        jpeg[: len(jpeg) // 2]: "corrupt or truncated image data: image file is truncated",
        png[: len(png) // 2]: "corrupt or truncated image data",
        encode(Image.new("RGB", (8, 8)), "EPS"): "not an image (cannot identify format)",  # no Ghostscript
    }
    for content, message in cases.items():
        with pytest.raises(ImageError) as caught:
            decode(content, None)
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_pixel_limit_is_checked_on_the_header_before_decoding():
    message = r"^200 x 100 = 20000 pixels exceeds the limit of 19999 pixels \(--max-pixels\)$"
    with pytest.raises(ImageError, match=message):
        decode(encode(noise(200, 100), "PNG"), 19999)
    assert decode(encode(noise(200, 100), "PNG"), 20000).shape == (3, 100, 200)
    # a header claiming 100000 x 100000 with a few bytes of data behind it: refused, nothing decoded
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    with pytest.raises(ImageError, match=r"^100000 x 100000 = 10000000000 pixels exceeds the limit of 89478"):
        decode(bomb, 89478485)


def test_pixel_limit_inside_a_decoder_is_enforced():
    # an ICNS whose directory promises 128 x 128 but holds a 512 x 512 PNG
    png = encode(Image.new("RGB", (512, 512)), "PNG")
    entry = b"ic07" + struct.pack(">I", 8 + len(png)) + png
    icns = b"icns" + struct.pack(">I", 8 + len(entry)) + entry
    with pytest.raises(ImageError, match=r"128 x 128 image .* limit of 20000 pixels \(--max-pixels\)"):
        decode(icns, 20000)


def test_our_limit_governs_and_pillow_globals_are_left_alone(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert decode(encode(noise(50, 50), "PNG"), None).shape == (3, 50, 50)  # 2500 > 2 * 100
    assert decode(encode(noise(50, 50), "PNG"), 2500).shape == (3, 50, 50)
    assert Image.MAX_IMAGE_PIXELS == 100
    monkeypatch.setattr(image_files.ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # someone else's setting
    jpeg = encode(noise(64, 48), "JPEG")
    with pytest.raises(ImageError, match="truncated"):
        decode(jpeg[: len(jpeg) // 2], None)
    assert image_files.ImageFile.LOAD_TRUNCATED_IMAGES is True


# --------------------------------------------------------------------------------------------------
# preprocessing


def test_resize_256_crop_224_box_on_640x480():
    preprocess = Preprocess(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    tensor, box = preprocess(torch.zeros(3, 480, 640, dtype=torch.uint8))
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 224, 224)
    assert preprocess.input_size == (224, 224)
    # 640x480 -> 341x256 (torchvision truncates 341.33); crop starts at round(58.5) = 58 and 16
    scale_x, scale_y = Fraction(640, 341), Fraction(480, 256)
    expected = (58 * scale_x, 16 * scale_y, (58 + 224) * scale_x, (16 + 224) * scale_y)
    assert box == pytest.approx([float(v) for v in expected], rel=1e-15)
    assert box[1] == 30.0 and box[3] == 450.0


def ramp_image(width: int, height: int) -> torch.Tensor:
    """A uint8 image whose red channel is the column index and green the row index."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[0] = torch.arange(width, dtype=torch.uint8)[None, :]
    image[1] = torch.arange(height, dtype=torch.uint8)[:, None]
    return image


@pytest.mark.parametrize(
    ("resize", "crop", "size"),
    [
        (100, 64, (150, 200)),  # shorter side 100 -> 100x133, odd crop offsets
        (100, (64, 81), (200, 150)),  # portrait
        ((90, 120), 64, (150, 200)),  # exact resize, aspect changed
        (None, (33, 47), (150, 200)),  # crop only
        (100, None, (150, 200)),  # resize only
        (230, 224, (150, 200)),  # upsampling
        (None, (181, 220), (150, 200)),  # crop larger than the image in both directions: padded
        (None, (100, 230), (150, 200)),  # padded in x, cropped in y
    ],
)
def test_box_registers_model_input_pixels_to_original_coordinates(resize, crop, size):
    height, width = size
    image = ramp_image(width, height)
    tensor, (x0, y0, x1, y1) = Preprocess(resize, crop, *IDENTITY)(image)
    out_h, out_w = tensor.shape[-2:]
    # centre of model pixel (i, j) in original continuous coordinates; pixel k's value is k at centre k + 0.5
    x = x0 + (torch.arange(out_w, dtype=torch.float64) + 0.5) * (x1 - x0) / out_w
    y = y0 + (torch.arange(out_h, dtype=torch.float64) + 0.5) * (y1 - y0) / out_h
    inside_x, inside_y = (x > 1.5) & (x < width - 1.5), (y > 1.5) & (y < height - 1.5)
    red, green = (tensor[c, inside_y][:, inside_x].double() * 255 for c in (0, 1))
    assert red.numel() > 100
    assert (red - (x[inside_x] - 0.5)).abs().max() <= 0.6
    assert (green - (y[inside_y, None] - 0.5)).abs().max() <= 0.6
    # where the box leaves the image, the input is padding (zeros)
    outside_x, outside_y = (x < 0) | (x > width), (y < 0) | (y > height)
    assert (tensor[:, :, outside_x] == 0).all() and (tensor[:, outside_y, :] == 0).all()
    if crop is None and resize is None:
        assert (x0, y0, x1, y1) == (0, 0, width, height)


def test_crop_only_box_indexes_exactly_the_cropped_pixels():
    image = torch.from_numpy(np.asarray(noise(61, 40)).transpose(2, 0, 1).copy())
    tensor, (x0, y0, x1, y1) = Preprocess(None, (20, 31), *IDENTITY)(image)
    assert all(float(v).is_integer() for v in (x0, y0, x1, y1))
    expected = image[:, int(y0) : int(y1), int(x0) : int(x1)].float() / 255
    assert torch.equal(tensor, expected)


def test_maps_reach_the_originals_as_the_overlays_and_peaks_do():
    """to_original: the overlays' registration through each crop box, NaN where the crop cut the picture,
    padded to the largest picture; a one-hot map peaks within a pixel of the one `locate` names."""
    images = Images(Preprocess(100, (64, 81), *IDENTITY))
    pictures = [torch.zeros(3, 150, 200, dtype=torch.uint8), torch.zeros(3, 170, 120, dtype=torch.uint8)]
    views = images.collate([PictureView(tuple(p.shape[1:]), images.preprocess(p)[1], None) for p in pictures])
    maps = torch.zeros(2, 2, 4, 5)
    maps[0, 0, 1, 3] = maps[0, 1, 2, 0] = maps[1, 0, 3, 4] = maps[1, 1, 0, 0] = 1.0
    registered, pixels = images.to_original(maps.flatten(0, 1), views, [0, 0, 1, 1])
    assert registered.shape == pixels.shape == (4, 170, 200)
    assert pixels[:2].sum() == 2 * 150 * 200 and pixels[2:].sum() == 2 * 170 * 120
    for i, row in enumerate([0, 0, 1, 1]):
        height, width = views.sizes[row]
        one = maps.flatten(0, 1)[i : i + 1, None]
        box = views.boxes[row : row + 1]
        expected, inside = register(one, box, range(height), width), covered(box, range(height), width)
        own = registered[i, :height, :width]
        assert torch.equal(own.isnan(), ~inside[0])
        assert torch.equal(own[inside[0]], expected[0, 0][inside[0]])
        assert 0 < own.isnan().sum() < own.numel()  # the crop cut the picture
    peaks = images.locate(maps, views)  # (2, 2, 2): (x, y), the pixel holding the cell's centre
    for i, (x, y) in enumerate(peaks.flatten(0, 1).long().tolist()):
        top = torch.nan_to_num(registered[i], nan=-1.0)
        ys, xs = torch.nonzero(top >= top.max() - 1e-6, as_tuple=True)  # the nearest pixel centres
        assert ((ys - y).abs().maximum((xs - x).abs())).min() <= 1


def test_normalisation_and_input_size():
    preprocess = Preprocess(None, None, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    tensor, box = preprocess(torch.full((3, 2, 3), 255, dtype=torch.uint8))
    assert tensor[:, 0, 0].tolist() == [1.0, 3.0, 0.5]
    assert box == (0.0, 0.0, 3.0, 2.0) and preprocess.input_size is None
    assert Preprocess((10, 20), None, *IDENTITY).input_size == (10, 20)
    assert Preprocess(10, (5, 6), *IDENTITY).input_size == (5, 6)
    assert Preprocess(10, None, *IDENTITY).input_size is None


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((4000, 6000), 4096, (2731, 4096)),  # 2730.67 rounds up
        ((6000, 4000), 4096, (4096, 2731)),  # portrait
        ((4096, 3000), 4096, (4096, 3000)),  # at the limit: unchanged
        ((30, 40), 4096, (30, 40)),
        ((3, 5), 4, (2, 4)),  # 2.4 rounds down
        ((1, 100_000), 4096, (1, 4096)),  # never below one pixel
        ((500, 500), 100, (100, 100)),
    ],
)
def test_overlay_size_keeps_the_aspect_up_to_the_long_side(size, max_side, expected):
    height, width = size
    assert overlay_size(height, width, max_side) == expected
    shown_h, shown_w = expected
    if max(size) > max_side:  # the short side is the nearest whole number of pixels
        assert max(shown_h, shown_w) == max_side
        short, long = sorted(size)
        assert abs(min(shown_h, shown_w) - short * max_side / long) <= 0.5 or min(shown_h, shown_w) == 1


def test_overlay_image_is_the_image_itself_or_an_antialiased_reduction():
    image = torch.from_numpy(np.asarray(noise(60, 40)).transpose(2, 0, 1).copy())
    assert overlay_image(image, 60) is image
    small = overlay_image(image, 30)
    assert small.shape == (3, 20, 30) and small.dtype == torch.uint8
    flat = torch.full((3, 40, 60), 77, dtype=torch.uint8)
    assert (overlay_image(flat, 7) == 77).all()  # an average keeps a flat colour


@pytest.mark.parametrize(
    ("resize", "crop", "mean", "std"),
    [
        (0, None, *IDENTITY),
        (None, (1, 2, 3), *IDENTITY),
        (None, None, (0, 0), (1, 1, 1)),
        (8, 8, (0, 0, 0), (1, 0, 1)),
        (256.0, None, *IDENTITY),
        (True, None, *IDENTITY),
    ],
)
def test_invalid_preprocess_is_rejected(resize, crop, mean, std):
    with pytest.raises(ValueError):
        Preprocess(resize, crop, mean, std)


# --------------------------------------------------------------------------------------------------
# dataset, collate, loader


def folder_of_cases(root: Path) -> list[InputItem]:
    """Good images of two sizes plus every kind of bad input, discovered in key order."""
    write(root / "a_good.png", encode(noise(40, 30, seed=1), "PNG"))
    write(root / "b_empty.jpg")
    write(root / "c_good.jpg", encode(noise(30, 50, seed=2), "JPEG"))
    write(root / "d_html.png", b"<html></html>")
    (root / "e_broken.jpg").symlink_to(root / "nowhere.jpg")
    write(root / "f_good.png", encode(noise(64, 64, seed=3), "PNG"))
    write(root / "g_huge.png", encode(noise(300, 300, seed=4), "PNG"))
    items = discover([root])
    items.append(InputItem(root, "h_folder.jpg"))  # a folder given as a file
    return items


def test_dataset_turns_every_bad_input_into_an_error(tmp_path):
    items = folder_of_cases(tmp_path)
    dataset = ImageDataset(items, Preprocess(48, 32, *IDENTITY), max_pixels=50_000, overlay_side=40)
    assert len(dataset) == len(items) and dataset.items[3] == items[3]
    samples = [dataset[i] for i in range(len(dataset))]
    errors = {items[s.index].key: s.error for s in samples if s.error}
    assert errors == {
        "b_empty.jpg": "empty file",
        "d_html.png": "not an image (cannot identify format)",
        "e_broken.jpg": "broken symbolic link",
        "g_huge.png": "300 x 300 = 90000 pixels exceeds the limit of 50000 pixels (--max-pixels)",
        "h_folder.jpg": "is a directory",
    }
    good = samples[0]
    assert good.sha256 == hashlib.sha256((tmp_path / "a_good.png").read_bytes()).hexdigest()
    assert good.input.shape == (3, 32, 32) and good.view.picture.shape == (3, 30, 40) and not good.skipped
    assert good.view.box == (10.0, 5.0, 30.0, 25.0)  # 40x30 -> 64x48, crop 32 at (16, 8)
    assert good.view.size == (30, 40)
    large = samples[5]  # 64 x 64: its overlay picture is scaled down, its model input is not changed
    assert large.view.size == (64, 64) and large.view.picture.shape == (3, 40, 40)
    full = ImageDataset(items, Preprocess(48, 32, *IDENTITY), max_pixels=50_000, overlay_side=64)[5]
    assert full.view.picture.shape == (3, 64, 64) and torch.equal(full.input, large.input)
    assert full.view.box == large.view.box
    assert ImageDataset(items, Preprocess(48, 32, *IDENTITY), max_pixels=50_000)[0].view.picture is None


def test_dataset_reports_permission_and_unexpected_failures(tmp_path, monkeypatch):
    item = InputItem(write(tmp_path / "a.png", encode(noise(8, 8), "PNG")), "a.png")

    def denied(_path, _max_bytes):
        raise PermissionError(13, "Permission denied")

    def broken(self, image):
        raise RuntimeError("out of memory\nallocating 9 GB")

    dataset = ImageDataset([item], Preprocess(None, None, *IDENTITY), None)
    with monkeypatch.context() as patch:
        patch.setattr(batches, "read_file", denied)
        assert dataset[0].error == "permission denied" and dataset[0].sha256 is None
    monkeypatch.setattr(Preprocess, "__call__", broken)
    assert dataset[0].error == "cannot process image: RuntimeError: out of memory allocating 9 GB"


def test_skip_is_asked_after_hashing_and_skips_decoding(tmp_path, monkeypatch):
    content = encode(noise(8, 8), "PNG")
    item = InputItem(write(tmp_path / "a.png", content), "a.png")
    asked = []

    def skip(asked_item: InputItem, sha256: str) -> bool:
        asked.append((asked_item, sha256))
        return True

    def no_decoding(*args):
        raise AssertionError("decoded a skipped image")

    monkeypatch.setattr(Images, "load", no_decoding)
    sample = ImageDataset([item], Preprocess(None, None, *IDENTITY), None, skip=skip)[0]
    sha256 = hashlib.sha256(content).hexdigest()
    assert asked == [(item, sha256)]
    assert sample == Sample(0, sha256, skipped=True)


def test_collate_separates_good_skipped_and_failed():
    view = PictureView((12, 14), (0.0, 1.0, 7.0, 5.5), torch.zeros(3, 6, 7, dtype=torch.uint8))
    good = [Sample(i, f"sha{i}", torch.full((3, 4, 5), float(i)), view) for i in (0, 3)]
    samples = [good[0], Sample(1, "sha1", skipped=True), Sample(2, error="empty file"), good[1],
               Sample(4, "sha4", error="not an image (cannot identify format)")]
    batch = collate(samples)
    assert batch.indices == [0, 3] and batch.sha256 == ["sha0", "sha3"]
    assert batch.inputs.shape == (2, 3, 4, 5) and batch.inputs[1].eq(3).all()
    views = batch.views
    assert len(views.pictures) == 2 and views.pictures[0].dtype == torch.uint8
    assert views.sizes == [(12, 14)] * 2
    assert views.boxes.dtype == torch.float64 and views.boxes.tolist() == [[0.0, 1.0, 7.0, 5.5]] * 2
    assert batch.skipped == [(1, "sha1")]
    assert batch.failed == [(2, "empty file"), (4, "not an image (cannot identify format)")]
    empty = collate([Sample(0, error="empty file")])
    assert empty.indices == [] and empty.inputs.numel() == 0 and empty.views.boxes.shape == (0, 4)


def test_collate_refuses_mixed_input_sizes():
    view = PictureView((4, 4), (0, 0, 4, 4), torch.zeros(3, 4, 4, dtype=torch.uint8))
    samples = [Sample(i, "s", torch.zeros(3, 4, 4 + i), view) for i in range(2)]
    with pytest.raises(ValueError, match=r"different sizes \(4x4, 4x5\).*crop"):
        collate(samples)


def flatten(loaded: list[Batch]) -> list:
    """Everything a run consumes from a loader, in order, for comparison."""
    return [(b.indices, b.inputs.tolist(), [i.tolist() for i in b.views.pictures], b.views.boxes.tolist(),
             b.views.sizes, b.sha256, b.skipped, b.failed) for b in loaded]


def skip_f_good(item: InputItem, sha256: str) -> bool:
    """A picklable skip rule for the worker processes."""
    return item.key == "f_good.png"


def test_loader_with_two_workers_matches_in_process_loading(tmp_path):
    items = folder_of_cases(tmp_path)
    dataset = ImageDataset(items, Preprocess(48, 32, *IDENTITY), 50_000, skip=skip_f_good, overlay_side=45)
    serial = list(make_loader(dataset, batch_size=3, workers=0))
    parallel = list(make_loader(dataset, batch_size=3, workers=2))
    assert flatten(parallel) == flatten(serial)
    assert [b.indices for b in serial] == [[0, 2], [], []]
    assert serial[0].views.sizes == [(30, 40), (50, 30)] and serial[0].views.pictures[1].shape == (3, 45, 27)
    assert [i for b in serial for i, _ in b.skipped] == [5]
    assert [i for b in serial for i, _ in b.failed] == [1, 3, 4, 6, 7]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs an accelerator")
def test_pin_memory_pins_the_batch(tmp_path):
    items = folder_of_cases(tmp_path)
    dataset = ImageDataset(items, Preprocess(48, 32, *IDENTITY), 50_000, overlay_side=64)
    batch = next(iter(make_loader(dataset, batch_size=3, workers=0, pin_memory=True)))
    assert batch.inputs.is_pinned() and all(image.is_pinned() for image in batch.views.pictures)
