"""A small real run with its report, shared by the report tests: the demo model on generated images,
one of them named like an HTML injection, one broken file."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from hirescam_cli.cli import main
from hirescam_cli.demo.samples import write_samples
from hirescam_cli.report import chunks, write_report
from hirescam_cli.report.chunks import STATUSES, read_cards

MALICIOUS = "<img src=x onerror=alert(1)>.png"
PREFIX = "window.HIRESCAM_REPORT = JSON.parse("


def cli(*args: object) -> int:
    """Run the CLI in-process; returns its exit code."""
    old = sys.argv
    sys.argv = ["hirescam", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as e:
        return e.code or 0
    finally:
        sys.argv = old


def explain_with_report(root: Path, count: int = 5) -> Path:
    """`hirescam explain --report` over `count` demo images, the malicious name and a broken file."""
    images = root / "images"
    write_samples(images, root / "masks", count=count)
    shutil.copy(images / "sample_01.png", images / MALICIOUS)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out = root / "out"
    assert cli("explain", images, "-o", out, "--workers", "0", "--report", "-q") == 1  # broken.png failed
    return out


def many_inputs(base: Path, out: Path, count: int, seed: int = 0) -> Path:
    """OUT with `count` inputs of unique keys, copies of `base`'s explained ones (pictures hard-linked)
    with varied numbers, so that sorting reorders them (Pearson r: negative ones, ties, missing ones);
    every 50th input failed."""
    rng = np.random.default_rng(seed)
    records = [json.loads(line) for line in (base / "results.jsonl").read_text().splitlines()]
    summaries = [json.loads((base / r["summary"]).read_text()) for r in records if r["status"] == "ok"]
    lines = []
    for n in range(count):
        key = f"many/img_{n:04d}.png"
        if n % 50 == 7:
            lines.append({"input": f"/in/{key}", "status": "error", "error": f"corrupt header {n}"})
            continue
        summary = json.loads(json.dumps(summaries[n % len(summaries)]))
        (out / key).mkdir(parents=True)
        for target in summary["targets"]:
            target["probability"] = float(rng.uniform(0.5, 1.0))
            pearson = None if n % 13 == 0 else round(float(rng.uniform(-0.5, 1.0)), 1)  # ties, missing ones
            target["agreement"] = {"pearson": pearson, "top20_iou": float(rng.random())}
            for entry in target["maps"].values():
                name = entry["png"].rsplit("/", 1)[1]
                os.link(base / entry["png"], out / key / name)
                entry["png"] = f"{key}/{name}"
        summary["key"] = key
        (out / key / "summary.json").write_text(json.dumps(summary))
        lines.append({"input": summary["input"], "status": "ok", "summary": f"{key}/summary.json"})
    (out / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    shutil.copy(base / "run.json", out / "run.json")
    return out


_shared: list[Path] = []


def shared_run(tmp_path_factory) -> Path:
    """One `explain_with_report` per test session, for tests that only read it."""
    if not _shared:
        _shared.append(explain_with_report(tmp_path_factory.mktemp("report")))
    return _shared[0]


def report_data(out: Path) -> dict:
    """The data report.js works from: index.js, and as "images" every input's card record (from the
    chunks' cards files) with i: its position and s: its status."""
    text = (out / "report" / "index.js").read_text(encoding="utf-8")
    assert text.startswith(PREFIX)
    data = json.loads(json.loads(text.removeprefix(PREFIX).rstrip().removesuffix(");")))
    records = []
    for digest, count in data["chunks"]:
        chunk = read_cards(out / "report" / "cards" / f"{digest}.js")
        assert len(chunk) == count
        records += chunk
    assert len(records) == len(data["rows"]) == len(data["status"])
    data["images"] = [{**r, "i": i, "s": STATUSES[data["status"][i]]} for i, r in enumerate(records)]
    return data


def reported_in_small_chunks(out: Path) -> Path:
    """OUT reported once in chunks of about 8 inputs (CHUNK_MEAN patched), so that a page spans several."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunks, "CHUNK_MEAN", 8)
        write_report(out)
    return out
