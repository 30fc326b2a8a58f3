"""Runs shared by the compare tests: tiny_net and a copy of it with perturbed head weights, explained on the
same generated images (of several sizes, so crops differ; one named like an HTML injection, one broken),
and their comparison."""

import json
from pathlib import Path

import numpy as np
from PIL import Image
from report_runs import MALICIOUS, cli

CONFIG = """
[model]
factory = "tiny_models:{factory}"
[preprocess]
resize = {side}
crop = {side}
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]
[explain]
batch_size = 4
workers = 0
"""
SIZES = [(16, 16), (24, 16), (16, 20), (31, 17)]


def write_images(folder: Path, count: int, seed: int = 0, scale: int = 1) -> Path:
    """`count` smooth random pictures of a few sizes (times `scale`), the malicious name among them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n in range(count):
        width, height = (side * scale for side in SIZES[n % len(SIZES)])
        small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        picture = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        picture.save(folder / (MALICIOUS if n == 1 else f"img_{n:02d}.png"))
    return folder


def explain(images: Path, out: Path, factory: str, side: int = 16, *flags: object) -> Path:
    """`hirescam explain` of `images` into `out` with a tiny model (inputs `side` x `side`)."""
    config = out.parent / f"{out.name}.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(CONFIG.format(factory=factory, side=side))
    code = cli("explain", images, "-o", out, "-c", config, "-q", *flags)
    assert code in (0, 1), code
    return out


def summaries(out: Path) -> dict[str, dict]:
    """Every summary of a run, by key."""
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {
        r["summary"].removesuffix("/summary.json"): json.loads((out / r["summary"]).read_text())
        for r in records
        if r["status"] == "ok"
    }


_shared: dict[str, Path] = {}


def shared_pair(tmp_path_factory) -> dict[str, Path]:
    """BASE (tiny_net), NEW (perturbed_net), both with --save-raw, and their comparison in DIR: once per
    test session, for tests that only read them."""
    if not _shared:
        root = tmp_path_factory.mktemp("compare")
        images = write_images(root / "images", 14)
        (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        base = explain(images, root / "base", "tiny_net", 16, "--save-raw")
        new = explain(images, root / "new", "perturbed_net", 16, "--save-raw")
        assert cli("compare", base, new, "-o", root / "cmp") == 0
        _shared.update(base=base, new=new, dir=root / "cmp")
    return _shared
