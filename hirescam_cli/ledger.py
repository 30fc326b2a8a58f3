"""The run's ledgers, whatever the sink: results.jsonl (a line per input, in input order, merged from every
process's share) and the counts the last line and run.json give."""

import contextlib
import heapq
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .discovery import InputItem
from .outputs import OutputDir


def done(item: InputItem, summary: str, no_target: bool = False) -> dict:
    """The record of an input explained now; `summary` is where its summary is, relative to OUT."""
    record = {"input": item.shown, "status": "ok", "summary": summary}
    return {**record, "no_target": True} if no_target else record


def skipped(item: InputItem, summary: str) -> dict:
    return {"input": item.shown, "status": "skipped", "summary": summary}


def failed(item: InputItem, error: str) -> dict:
    return {"input": item.shown, "status": "error", "error": error}


def new_counts() -> dict[str, int]:
    """Inputs by status, and how many of the explained ones had no class above the threshold."""
    return {"ok": 0, "skipped": 0, "error": 0, "no_target": 0}


def count(counts: dict[str, int], record: dict[str, Any]) -> None:
    counts[record["status"]] += 1
    counts["no_target"] += bool(record.get("no_target"))


class ResultsLog:
    """One process's share of results.jsonl: records in input order, each line led by its input index.

    ``finish`` renames the share to `part`; ``merge_results`` makes results.jsonl of the shares.
    """

    def __init__(self, out: OutputDir):
        self._partial = out.tmp / "results.part"
        self._file = open(self._partial, "w", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self.counts = new_counts()

    def add(self, index: int, record: dict[str, Any]) -> None:
        count(self.counts, record)
        self._file.write(f"{index}\t{json.dumps(record, ensure_ascii=False)}\n")

    def finish(self, part: Path) -> None:
        """Flush and move the share to `part`."""
        self._file.close()
        os.replace(self._partial, part)


def merge_results(out: OutputDir, parts: list[Path]) -> dict[str, int]:
    """Merge the processes' shares into OUT/results.jsonl in input order (atomically); returns the counts."""
    counts = new_counts()
    partial = out.tmp / "results.jsonl.partial"
    with contextlib.ExitStack() as stack:
        shares = [_indexed(stack.enter_context(open(part, encoding="utf-8"))) for part in parts]
        merged = stack.enter_context(open(partial, "w", encoding="utf-8"))
        for _index, record in heapq.merge(*shares):
            count(counts, json.loads(record))
            merged.write(record)
    os.replace(partial, out.root / "results.jsonl")
    return counts


def _indexed(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """A share's lines as (input index, record line)."""
    for line in lines:
        index, _, record = line.partition("\t")
        yield int(index), record
