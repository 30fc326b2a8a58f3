"""Read a finished (or interrupted) run through its own files: run.json, results.jsonl, summaries.

The ledger is read as a stream of lines (memory stays flat in the number of inputs); a summary is
read only when the gallery needs its card again (see chunks.py).
"""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import UsageError
from ..sinks.folders import find_summaries

SUMMARY_SUFFIX = "/summary.json"


class ReportError(UsageError):
    """OUT holds no run to report on (a usage error)."""


@dataclass(frozen=True)
class Line:
    """One input as the run's ledger lists it, in input order."""

    status: str  # ok | skipped | error
    summary: str = ""  # its summary, relative to OUT (ok and skipped)
    shown: str = ""  # the input as the ledger shows it (what names a failed input)
    error: str | None = None  # why it failed (error)

    @property
    def identity(self) -> str:
        """What names this input from one report to the next: its summary, or a failed input as shown."""
        return self.shown if self.status == "error" else self.summary

    @property
    def key(self) -> str:
        """Its key under OUT, in the order of the ledger (the summary path without its file name)."""
        return self.summary.removesuffix(SUMMARY_SUFFIX)


@dataclass
class Ledger:
    """What a report is made of: the run's facts, its inputs (one pass), and what was odd about its files."""

    root: Path
    info: dict[str, Any]  # run.json, or {} when the run never wrote it
    lines: Iterator[Line]
    stamp: list[int] | None  # size and mtime of results.jsonl (None: the lines come from the summaries)
    notes: list[str] = field(default_factory=list)


def read_ledger(out: Path) -> Ledger:
    """The run in OUT; ReportError when OUT holds none."""
    root = Path(out).absolute()
    if not root.is_dir():
        raise ReportError(f"{out} is not a folder")
    notes: list[str] = []
    info = _read_json(root / "run.json", notes, "run.json")
    if info is not None and not isinstance(info, dict):
        notes.append("run.json is not a JSON object")
        info = None
    path = root / "results.jsonl"
    try:
        stat = path.stat()
        path.open("rb").close()  # readable: the lines are read when they are needed
        return Ledger(root, info or {}, _read_results(path), [stat.st_size, stat.st_mtime_ns], notes)
    except FileNotFoundError:
        pass
    except OSError as e:
        notes.append(f"results.jsonl is unreadable: {_one_line(e)}")
    summaries = find_summaries(root)
    if info is None and not summaries:
        raise ReportError(f"{out} holds no run: no run.json, results.jsonl or summaries")
    notes.append(f"results.jsonl is missing (the run did not finish): {len(summaries)} summaries on disk")
    return Ledger(root, info or {}, (Line("ok", path) for path in summaries), None, notes)


@dataclass
class Entry:
    """One input of a run with its summary read (what `hirescam compare` works on), in input order."""

    index: int
    name: str  # its key under OUT, or the input as shown when it has none (a failed input)
    status: str  # ok | skipped | error
    input: str
    error: str | None = None
    summary: dict[str, Any] | None = None


@dataclass
class Run:
    """A whole run in memory: its facts, every input with its summary, and what was odd about its files."""

    root: Path
    info: dict[str, Any]
    entries: list[Entry]
    notes: list[str]


def read_run(out: Path) -> Run:
    """The run in OUT with every summary read; ReportError when OUT holds none."""
    ledger = read_ledger(out)
    entries = []
    for index, line in enumerate(ledger.lines):
        if line.status == "error":
            entries.append(Entry(index, line.shown, "error", line.shown, error=line.error))
            continue
        summary, error = read_summary(ledger.root, line.summary)
        if summary is None:
            entries.append(Entry(index, line.key or line.shown, "error", line.shown, error=error))
        else:
            name = str(summary.get("key", line.key))
            entries.append(Entry(index, name, line.status, line.shown, summary=summary))
    return Run(ledger.root, ledger.info, entries, ledger.notes)


def _read_json(path: Path, notes: list[str], what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        notes.append(f"{what} is unreadable: {_one_line(e)}")
        return None


def _read_results(path: Path) -> Iterator[Line]:
    """results.jsonl's lines; a damaged one becomes a failed input saying so."""
    with path.open("rb") as file:
        for number, raw in enumerate(file, 1):
            text = raw.decode("utf-8", errors="replace")
            if not text.strip():
                continue
            try:
                record = json.loads(text)
                if not isinstance(record, dict) or "status" not in record:
                    raise ValueError("not a result record")
            except ValueError as e:
                yield Line("error", shown=f"results.jsonl line {number}", error=_one_line(e))
                continue
            yield _line(record)


def _line(record: dict[str, Any]) -> Line:
    shown = str(record.get("input", "?"))
    status = record.get("status")
    if status not in ("ok", "skipped"):
        return Line("error", shown=shown, error=str(record.get("error") or "unknown error"))
    return Line(status, summary=str(record.get("summary", "")), shown=shown)


def read_summary(root: Path, relative: str) -> tuple[dict[str, Any] | None, str | None]:
    """A summary named by the ledger (relative to OUT) and None, or None and why it cannot be read."""
    parts = PurePosixPath(relative).parts
    if not parts or parts[0] == "/" or ".." in parts:
        return None, "results.jsonl names no summary inside OUT"
    try:
        summary = json.loads((root / relative).read_bytes())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return None, f"{relative} is missing"
    except (OSError, ValueError) as e:
        return None, f"{relative} is unreadable: {_one_line(e)}"
    return summary, None


def stamp(path: str, root_fd: int) -> tuple[int, int]:
    """Size and modification time (ns) of a file given relative to OUT (or absolute); -1s when absent."""
    try:
        stat = os.stat(path, dir_fd=root_fd)
    except (OSError, ValueError):
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
