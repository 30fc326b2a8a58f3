"""A small real run with its report, shared by the report tests: the demo model on generated images,
one of them named like an HTML injection, one broken file."""

import json
import shutil
import sys
from pathlib import Path

from hirescam_cli.cli import main
from hirescam_cli.demo.samples import write_samples

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


_shared: list[Path] = []


def shared_run(tmp_path_factory) -> Path:
    """One `explain_with_report` per test session, for tests that only read it."""
    if not _shared:
        _shared.append(explain_with_report(tmp_path_factory.mktemp("report")))
    return _shared[0]


def report_data(out: Path) -> dict:
    """The data report.js works from (data.js without its assignment)."""
    text = (out / "report" / "data.js").read_text(encoding="utf-8")
    assert text.startswith(PREFIX)
    return json.loads(json.loads(text.removeprefix(PREFIX).rstrip().removesuffix(");")))
