"""A generated corpus of hostile inputs, run end to end: every input ends as outputs or as one clear error,
and no output ever lands outside OUT."""

import io
import json
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import config, rgb, run

from hirescam_cli import batches
from hirescam_cli.discovery import discover
from hirescam_cli.modalities.image_files import decode
from hirescam_cli.modalities.images import overlay_size

TESTS = Path(__file__).parent
MAX_PIXELS = 1_000_000


@pytest.fixture(autouse=True)
def importable_tiny_models(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@dataclass(frozen=True)
class Expect:
    """How one input must end: ok at a displayed (width, height), or an error naming every one of `words`."""

    size: tuple[int, int] | None = None
    words: tuple[str, ...] = ()


def encoded(image: Image.Image, format: str, **kwargs) -> bytes:
    """An image saved to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def build_corpus(root: Path) -> dict[Path, Expect]:
    """Write the bad-input corpus under root; returns {input path: expected outcome}."""
    expect: dict[Path, Expect] = {}

    def put(name: str, data: bytes, outcome: Expect) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expect[path] = outcome

    def good(name: str, image: Image.Image, format: str = "PNG", **kwargs) -> None:
        put(name, encoded(image, format, **kwargs), Expect(image.size))

    for i in range(3):
        good(f"good{i}.png", rgb(30 + i, 20, seed=i))
    good("good3.jpg", rgb(25, 35, seed=3), "JPEG")
    put("empty.png", b"", Expect(words=("empty",)))
    put("truncated.jpg", encoded(rgb(64, 48, 10), "JPEG")[:2000], Expect(words=("truncated",)))
    put("truncated.png", encoded(rgb(64, 48, 11), "PNG")[:4000], Expect(words=("truncated",)))
    noise = np.random.default_rng(12).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    put("random.jpg", noise, Expect(words=("not an image",)))
    page = b"<!DOCTYPE html>\n<html><head><title>404</title></head><body>Not found</body></html>\n"
    put("page.png", page, Expect(words=("not an image",)))
    limit = f"exceeds the limit of {MAX_PIXELS} pixels"
    put("bomb.png", encoded(Image.new("L", (2000, 2000)), "PNG"), Expect(words=(limit,)))
    good("one_pixel.png", rgb(1, 1, 13))
    good("strip.png", rgb(10000, 10, 14))
    good("deep16.png", Image.fromarray(np.linspace(0, 65535, 23 * 17).astype(np.uint16).reshape(17, 23)))
    good("cmyk.jpg", rgb(26, 22, 15).convert("CMYK"), "JPEG")
    good("palette_alpha.png", rgb(24, 18, 16).convert("P"), transparency=0)
    frames = [rgb(21, 19, 17 + i).convert("P") for i in range(3)]
    good("animated.gif", frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 36 x 20 stored, 20 x 36 shown
    put("rotated.jpg", encoded(rgb(36, 20, 20), "JPEG", exif=exif.tobytes()), Expect((20, 36)))
    put("locked.png", encoded(rgb(16, 16, 21), "PNG"), Expect(words=("permission denied",)))
    os.symlink("nowhere.jpg", root / "dangling.jpg")
    expect[root / "dangling.jpg"] = Expect(words=("broken symbolic link",))
    good("loop_a/in_a.png", rgb(17, 18, 22))
    good("loop_b/in_b.png", rgb(18, 17, 23))
    os.symlink("../loop_b", root / "loop_a" / "to_b")
    os.symlink("../loop_a", root / "loop_b" / "to_a")
    good("folder.jpg/inner.png", rgb(22, 19, 25))
    return expect


def records(out: Path) -> list[dict]:
    """The lines of results.jsonl."""
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def by_input(out: Path) -> dict[Path, dict]:
    """results.jsonl as {input path: record}; every input appears once."""
    lines = records(out)
    result = {Path(r["input"]): r for r in lines}
    assert len(result) == len(lines), "an input is listed twice"
    return result


def outputs(out: Path, record: dict) -> tuple[dict, dict[str, bytes]]:
    """An ok record's summary and the bytes of its PNGs by path relative to OUT."""
    summary = json.loads((out / record["summary"]).read_text(encoding="utf-8"))
    pngs = [entry["png"] for target in summary["targets"] for entry in target["maps"].values()]
    return summary, {png: (out / png).read_bytes() for png in pngs}


def test_bad_input_corpus_ends_as_outputs_or_clear_errors(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus"
    expect = build_corpus(corpus)
    locked, read_file = corpus / "locked.png", batches.read_file

    def denied_for_locked(path: Path, max_bytes: int | None) -> bytes:
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return read_file(path, max_bytes)

    monkeypatch.setattr(batches, "read_file", denied_for_locked)  # workers = 0: reads happen in-process
    flags = ["-c", config(tmp_path), "--max-pixels", MAX_PIXELS, "--methods", "hirescam,gradcam"]
    out = tmp_path / "out"
    code, _, err = run(["explain", corpus, "-o", out, *flags], capsys)

    assert code == 1, err
    assert "Traceback" not in err
    results = by_input(out)
    assert set(results) == set(expect)
    for path, outcome in expect.items():
        record = results[path]
        if outcome.size is None:
            assert record["status"] == "error", (path, record)
            reason = record["error"]
            assert "\n" not in reason and all(w in reason.lower() for w in outcome.words), (path, reason)
            continue
        assert record["status"] == "ok", (path, record)
        summary, pngs = outputs(out, record)
        assert (summary["width"], summary["height"]) == outcome.size, path
        shown = overlay_size(outcome.size[1], outcome.size[0], 4096)[::-1]  # the 10000 x 10 strip: 4096 x 4
        assert (summary["overlay"]["width"], summary["overlay"]["height"]) == shown, path
        assert len(pngs) == 2
        for png in pngs.values():
            with Image.open(io.BytesIO(png)) as image:
                assert image.size == shown, path
    failed = sum(outcome.size is None for outcome in expect.values())
    counts = json.loads((out / "run.json").read_text())["counts"]
    assert (counts["ok"], counts["error"]) == (len(expect) - failed, failed)
    assert not (out / ".tmp").exists()

    # the good images come out exactly as they do in a run of the good images alone
    goods = [path for path in expect if path.name.startswith("good")]
    alone = tmp_path / "alone"
    assert run(["explain", *goods, "-o", alone, *flags, "-q"], capsys)[0] == 0
    alone_results = by_input(alone)
    for path in goods:
        assert outputs(alone, alone_results[path]) == outputs(out, results[path]), path


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_a_permission_error(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rgb(20, 20).save(images / "ok.png")
    rgb(20, 20, 1).save(images / "locked.png")
    (images / "locked.png").chmod(0)
    try:
        code, _, err = run(["explain", images, "-o", tmp_path / "out", "-c", config(tmp_path)], capsys)
    finally:
        (images / "locked.png").chmod(0o644)
    assert code == 1 and "Traceback" not in err
    results = by_input(tmp_path / "out")
    assert results[images / "ok.png"]["status"] == "ok"
    assert results[images / "locked.png"]["error"] == "permission denied"


def test_non_utf8_file_names(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    with open(os.path.join(os.fsencode(images), b"caf\xe9.png"), "wb") as f:
        f.write(encoded(rgb(19, 23), "PNG"))
    with open(os.path.join(os.fsencode(images), b"vide\xff.png"), "wb"):
        pass
    out = tmp_path / "out"
    code, _, err = run(["explain", images, "-o", out, "-c", config(tmp_path)], capsys)
    assert code == 1 and "Traceback" not in err
    outcomes = sorted((r["status"], r.get("error")) for r in records(out))
    assert outcomes == [("error", "empty file"), ("ok", None)]
    summary = json.loads((out / "caf%E9.png" / "summary.json").read_text(encoding="utf-8"))
    assert (summary["width"], summary["height"]) == (19, 23)
    assert not (out / ".tmp").exists()


def test_decode_never_gives_a_read_only_array():
    """torch.from_numpy warns on (and cannot safely share) a read-only array."""
    for width, height in ((1, 1), (3, 2)):
        array = decode(encoded(rgb(width, height), "PNG"), None)
        assert array.flags.writeable and array.shape == (3, height, width)
        assert array.transpose(1, 2, 0).flags.c_contiguous  # a view of (H, W, 3) memory


# ---------------------------------------------------------------------------------------------------
# outputs stay inside OUT


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime) of every entry under root, symlinks not followed."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            state[path] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return state


ODD_NAMES = [
    "..evil.png",  # hidden in a walk; given as an argument below
    "x.png",
    "sub/y.png",
    "new\nline.png",
    "new%0Aline.png",  # what the newline is escaped to
    "tab\there.png",
    "back\\slash.png",
    "co:lon.png",
    "-dash.png",
    "ünïcødé 画像.png",
    "Cat.png",
    "cat.png",
]


def test_outputs_never_leave_out(tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "in"
    for i, name in enumerate(ODD_NAMES):
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        rgb(20, 16, i).save(inputs / name, format="PNG")
    for folder, name in (("elsewhere", "target.png"), ("other", "z.png")):
        (tmp_path / folder).mkdir()
        rgb(18, 18, 50).save(tmp_path / folder / name)
    os.symlink(tmp_path / "elsewhere" / "target.png", inputs / "outside.png")  # absolute, pointing out
    cfg = config(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    args = ["in", "in/..evil.png", "in/sub/../x.png", "in/sub/../../other/z.png"]
    code, _, err = run(["explain", *args, "-o", "out", "-c", cfg, "-q"], capsys)

    assert code == 0, err
    after = snapshot(tmp_path)
    assert set(before) <= set(after), "something was deleted"
    changed = [path for path, state in after.items() if before.get(path) != state]
    assert changed and all(Path(path).is_relative_to(out) for path in changed), changed
    real_out = out.resolve()
    for folder, dirs, files in os.walk(out):
        for name in dirs + files:
            path = Path(folder, name)
            assert not path.is_symlink() and path.resolve().is_relative_to(real_out), path
    lines = records(out)
    assert len(lines) == len(ODD_NAMES) + 2 and {r["status"] for r in lines} == {"ok"}
    keys = []
    for record in lines:
        summary, pngs = outputs(out, record)
        keys.append(summary["key"])
        for relative in [record["summary"], *pngs]:
            assert not Path(relative).is_absolute() and ".." not in Path(relative).parts, relative
            assert (out / relative).resolve().is_relative_to(real_out), relative
        assert all(ch.isprintable() for ch in summary["key"]), summary["key"]
    assert len({key.casefold() for key in keys}) == len(keys), keys


def test_keys_are_unique_on_normalisation_insensitive_disks(tmp_path):
    for i, name in enumerate(("caf\u00e9.png", "cafe\u0301.png")):
        rgb(16, 16, i).save(tmp_path / name)
    keys = [item.key for item in discover([tmp_path])]
    assert len({unicodedata.normalize("NFC", key).casefold() for key in keys}) == 2, keys


def test_input_names_cannot_take_the_ledgers_names(tmp_path, capsys):
    images = tmp_path / "images"
    for i, name in enumerate(("results.jsonl/a.png", "run.json/b.png", "c.png")):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        rgb(16, 16, i).save(images / name)
    out = tmp_path / "out"
    code, _, err = run(["explain", images, "-o", out, "-c", config(tmp_path), "-q"], capsys)
    assert code == 0, err
    assert (out / "results.jsonl").is_file() and (out / "run.json").is_file()
    assert [r["status"] for r in records(out)] == ["ok"] * 3


def test_out_inside_the_input_folder_is_not_an_input(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        rgb(16, 16, i).save(images / f"{i}.png")
    args = ["explain", images, "-o", images / "out", "-c", config(tmp_path), "-q"]
    assert run(args, capsys)[0] == 0
    assert run(args, capsys)[0] == 0
    assert [r["status"] for r in records(images / "out")] == ["skipped", "skipped"]


def test_symlink_inside_out_is_not_followed(tmp_path, capsys):
    images, away, out = tmp_path / "images", tmp_path / "away", tmp_path / "out"
    (images / "sub").mkdir(parents=True)
    rgb(16, 16).save(images / "sub" / "x.png")
    rgb(16, 16, 1).save(images / "top.png")
    away.mkdir()
    out.mkdir()
    os.symlink(away, out / "sub")
    code, _, err = run(["explain", images, "-o", out, "-c", config(tmp_path), "-q"], capsys)
    assert code in (1, 3) and "Traceback" not in err
    assert list(away.iterdir()) == []
    assert (out / "results.jsonl").is_file() and not (out / ".tmp").exists()


@pytest.mark.parametrize("path", ["/proc", "/proc/self/environ", "/sys/kernel", "/dev/zero", "/dev"])
def test_the_kernels_virtual_files_are_refused_as_inputs(tmp_path, capsys, path):
    code, _, err = run(["explain", path, "-o", tmp_path / "out"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "a virtual file system of the kernel" in err
    assert not (tmp_path / "out").exists()


def test_a_named_pipe_is_refused_as_an_argument_and_an_error_line_when_listed(tmp_path, capsys):
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)  # opening it to read would wait for a writer forever
    code, _, err = run(["explain", pipe, "-o", tmp_path / "out"], capsys)
    assert code == 2 and "is a named pipe, not an image file" in err
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16)).save(good)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{good}\n{pipe}\n")
    args = ["explain", "--inputs-from", listing, "-o", tmp_path / "out", "-c", config(tmp_path)]
    code, _, err = run(args, capsys)
    assert code == 1, err
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "error"]
    assert records[1]["error"] == "not a regular file but a named pipe"
