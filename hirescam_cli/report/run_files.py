"""Read a finished (or interrupted) run through its own files: run.json, results.jsonl, summaries."""

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import UsageError
from ..sinks.folders import find_summaries


class ReportError(UsageError):
    """OUT holds no run to report on (a usage error)."""


@dataclass
class Entry:
    """One input of the run, in input order."""

    index: int
    name: str  # its key under OUT, or the input as shown when it has none (a failed input)
    status: str  # ok | skipped | error
    input: str
    error: str | None = None
    summary: dict[str, Any] | None = None


@dataclass
class Run:
    """What a report shows: the run's facts, its inputs, and what was odd about its files."""

    root: Path
    info: dict[str, Any]  # run.json, or {} when the run never wrote it
    entries: list[Entry]
    notes: list[str] = field(default_factory=list)


def read_run(out: Path) -> Run:
    """The run in OUT; ReportError when OUT holds none."""
    root = Path(out).absolute()
    if not root.is_dir():
        raise ReportError(f"{out} is not a folder")
    notes: list[str] = []
    info = _read_json(root / "run.json", notes, "run.json")
    if info is not None and not isinstance(info, dict):
        notes.append("run.json is not a JSON object")
        info = None
    records = _read_results(root / "results.jsonl", notes)
    if records is None:
        records = _summaries_on_disk(root)
        if info is None and not records:
            raise ReportError(f"{out} holds no run: no run.json, results.jsonl or summaries")
        notes.append(f"results.jsonl is missing (the run did not finish): {len(records)} summaries on disk")
    entries = [_entry(root, index, record) for index, record in enumerate(records)]
    return Run(root, info or {}, entries, notes)


def _read_json(path: Path, notes: list[str], what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        notes.append(f"{what} is unreadable: {_one_line(e)}")
        return None


def _read_results(path: Path, notes: list[str]) -> list[dict[str, Any]] | None:
    """results.jsonl's records; a damaged line becomes an error record saying so."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    except OSError as e:
        notes.append(f"results.jsonl is unreadable: {_one_line(e)}")
        return None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "status" not in record:
                raise ValueError("not a result record")
        except ValueError as e:
            record = {"input": f"results.jsonl line {number}", "status": "error", "error": _one_line(e)}
        records.append(record)
    return records


def _summaries_on_disk(root: Path) -> list[dict[str, Any]]:
    """Records for every summary the sink left under OUT, sorted by key (a run killed before its ledger)."""
    return [
        {"input": path.rsplit("/", 1)[0], "status": "ok", "summary": path} for path in find_summaries(root)
    ]


def _entry(root: Path, index: int, record: dict[str, Any]) -> Entry:
    status = record.get("status")
    shown = str(record.get("input", "?"))
    if status not in ("ok", "skipped"):
        return Entry(index, shown, "error", shown, error=str(record.get("error") or "unknown error"))
    relative = str(record.get("summary", ""))
    key = relative.removesuffix("/summary.json")
    parts = PurePosixPath(relative).parts
    if not parts or parts[0] == "/" or ".." in parts:
        return Entry(index, key or shown, "error", shown, error="results.jsonl names no summary inside OUT")
    path = root / relative
    try:
        summary = json.loads(path.read_bytes())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return Entry(index, key, "error", shown, error=f"{relative} is missing")
    except (OSError, ValueError) as e:
        return Entry(index, key, "error", shown, error=f"{relative} is unreadable: {_one_line(e)}")
    return Entry(index, str(summary.get("key", key)), status, shown, summary=summary)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
