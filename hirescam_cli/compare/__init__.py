"""`hirescam compare BASE NEW`: did the new model explain the same inputs differently? Torch-free.

    sides.py       read both runs (the report's reader), check they compare, match inputs by key and sha256
    agreement.py   per input: prediction changes, maps on a common footing (the modality's geometry)
    comparison.py  the rows and aggregates together, and compare.json
    gates.py       the CI gates, one line each
    markdown.py    the summary on stdout (and $GITHUB_STEP_SUMMARY)
The page, DIR/compare.html, is report/compare_page.py's.
"""

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import EXIT_GATE, EXIT_OK, OutputError, UsageError
from ..lock import OutLock
from ..outputs import describe
from .comparison import Comparison, compare_sides, to_json
from .gates import Gates
from .markdown import markdown
from .sides import check_comparable, open_side

__all__ = ["Comparison", "Gates", "run_compare"]


def _check_folders(base: Path, new: Path, out: Path | None) -> None:
    for label, folder in (("BASE", base), ("NEW", new)):
        if not folder.is_dir():
            raise UsageError(f"{label} {folder} is not a folder: give the OUT of a `hirescam explain` run")
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out} is a file, not a folder: give the folder compare.json goes to")
    if out.resolve() in (base.resolve(), new.resolve()):
        raise UsageError(f"-o {out} is BASE or NEW itself: give the comparison a folder of its own")


@contextlib.contextmanager
def _locked(folders: list[Path], wait: bool, say: Callable[[str], None]):
    """Hold the OUT lock of each folder (once each, in a fixed order: two compares never deadlock)."""
    locks = [OutLock(folder) for folder in sorted({f.resolve() for f in folders})]
    try:
        for lock in locks:
            lock.acquire(wait, waiting=say)
        yield
    finally:
        for lock in locks:
            lock.release()


def run_compare(
    base_out: Path,
    new_out: Path,
    out: Path | None,
    gates: Gates,
    wait: bool = False,
    say: Callable[[str], None] | None = None,
) -> int:
    """Compare two runs: the Markdown summary on stdout (appended to $GITHUB_STEP_SUMMARY when set), with
    `out` compare.json and compare.html there, a line per failed gate on stderr; returns the exit code."""
    say = say or (lambda message: print(f"hirescam: {message}", file=sys.stderr, flush=True))
    _check_folders(base_out, new_out, out)
    with _locked([base_out, new_out], wait, say):  # never read a run that is still writing
        base, new = open_side("BASE", base_out), open_side("NEW", new_out)
        notes = check_comparable(base, new)
        gates.check_methods(base.methods)
        comparison = compare_sides(base, new, notes)
        results = gates.check(comparison.rows)
        if out is not None:
            _write(out, comparison, results, gates)
    for note in comparison.notes:
        say(f"note: {note}")
    summary = markdown(comparison, results)
    sys.stdout.write(summary)
    sys.stdout.flush()
    _step_summary(summary, say)
    failed = [g for g in results if not g["passed"]]
    for gate in failed:
        say(f"gate failed: {gate['line']}")
    return EXIT_GATE if failed else EXIT_OK


def _write(out: Path, comparison: Comparison, results: list[dict], gates: Gates) -> None:
    """DIR/compare.json and DIR/compare.html (with its assets and thumbnails), each written atomically."""
    from ..report.compare_page import write_compare_page
    from ..report.site import write_atomic

    thresholds = {
        name: getattr(gates, name) for name in ("min_agreement", "max_changed", "min_agreement_each")
    }
    document = to_json(comparison, results, thresholds)
    path = out.absolute() / "compare.json"
    try:
        text = json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        write_atomic(path, (text + "\n").encode())  # compact: a row per input, read by machines (jq)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {describe(e)}") from None
    write_compare_page(out, comparison, document)


def _step_summary(summary: str, say: Callable[[str], None]) -> None:
    """Append the summary to the CI job's step summary ($GITHUB_STEP_SUMMARY) when there is one; a file
    that cannot be written is said, not fatal (the gates decide the exit code)."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as file:
            file.write(summary)
    except OSError as e:
        say(f"warning: cannot append the summary to $GITHUB_STEP_SUMMARY ({path}): {describe(e)}")
