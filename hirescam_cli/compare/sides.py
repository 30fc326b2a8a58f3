"""The two runs of a comparison, BASE and NEW: read through the report's reader (run.json, results.jsonl,
the summaries), checked to be comparable, and their inputs matched by key and sha256."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..report.run_files import Entry, read_run

RUN_SCHEMA = "hirescam-cli/run/1"  # what pipeline.py writes to run.json
SUMMARY_SCHEMA = "hirescam-cli/summary/1"  # what summary.py's SCHEMA names


@dataclass
class Side:
    """One run as compare reads it."""

    label: str  # BASE or NEW
    path: str  # OUT as given
    root: Path
    info: dict[str, Any]  # run.json ({} when the run never wrote it)
    methods: list[str]
    kind: str  # the modality, `[input] kind`
    by_key: dict[str, Entry]  # the inputs with a summary, by key, in input order
    failed: list[Entry]
    notes: list[str] = field(default_factory=list)

    def fact(self, name: str) -> Any:
        """A fact of the run: from run.json, else from its first summary."""
        if self.info.get(name) is not None:
            return self.info[name]
        return next((e.summary.get(name) for e in self.by_key.values() if e.summary.get(name)), None)


def open_side(label: str, out: Path) -> Side:
    """Read one side; UsageError (one line) when it is no run compare can read."""
    run = read_run(out)  # ReportError (a UsageError) when OUT holds no run
    info = run.info
    schema = info.get("schema")
    if info and schema != RUN_SCHEMA:
        raise UsageError(
            f"{label} {out}: run.json has schema {schema!r}, not {RUN_SCHEMA!r}: compare runs written by "
            "this hirescam-cli's schema (rerun `hirescam explain` with it)"
        )
    by_key = {e.name: e for e in run.entries if e.summary is not None}
    for entry in by_key.values():
        if entry.summary.get("schema") != SUMMARY_SCHEMA:
            raise UsageError(
                f"{label} {out}: {entry.name}/summary.json has schema {entry.summary.get('schema')!r}, not "
                f"{SUMMARY_SCHEMA!r}: compare runs written by this hirescam-cli's schema"
            )
    config = info.get("config") or {}
    methods = (config.get("explain") or {}).get("methods")
    if not methods:  # no run.json: the methods its summaries hold
        methods = list(
            dict.fromkeys(m for e in by_key.values() for t in e.summary["targets"] for m in t["maps"])
        )
    kind = (config.get("input") or {}).get("kind") or "images"
    failed = [e for e in run.entries if e.summary is None]
    notes = [f"{label}: {note}" for note in run.notes]
    return Side(label, str(out), run.root, info, list(methods), kind, by_key, failed, notes)


def check_comparable(base: Side, new: Side) -> list[str]:
    """Refuse two runs that cannot be compared (UsageError, one line); notes on what differs but compares."""
    if base.kind != new.kind:
        raise UsageError(
            f"BASE explains {base.kind} and NEW {new.kind}: compare runs of the same kind of input"
        )
    if set(base.methods) != set(new.methods):
        names = [", ".join(side.methods) or "no method" for side in (base, new)]
        raise UsageError(
            f"BASE explains {names[0]} and NEW {names[1]}: compare runs of the same methods "
            "(`hirescam explain --methods ...`)"
        )
    notes = base.notes + new.notes
    versions = base.info.get("version"), new.info.get("version")
    if None not in versions and versions[0] != versions[1]:
        notes.append(
            f"BASE was written by hirescam-cli {versions[0]} and NEW by {versions[1]}: what changed between "
            "the versions shows in the comparison too"
        )
    return notes


@dataclass
class Matching:
    """The inputs of both sides: pairs to compare (same key, same sha256, in BASE's input order) and the
    others, listed."""

    pairs: list[tuple[Entry, Entry]]
    only_base: list[str]
    only_new: list[str]
    bytes_differ: list[str]
    failed: list[dict[str, str]]  # {"side", "input", "error"}


def match(base: Side, new: Side) -> Matching:
    """Match the inputs of two sides by key and sha256."""
    pairs, bytes_differ = [], []
    for key, entry in base.by_key.items():
        other = new.by_key.get(key)
        if other is None:
            continue
        if entry.summary.get("sha256") != other.summary.get("sha256"):
            bytes_differ.append(key)
        else:
            pairs.append((entry, other))
    failed = [
        {"side": s.label, "input": e.name, "error": e.error or "failed"}
        for s in (base, new)
        for e in s.failed
    ]
    return Matching(
        pairs,
        _only(base, new),
        _only(new, base),
        bytes_differ,
        failed,
    )


def _only(side: Side, other: Side) -> list[str]:
    """Keys with a summary on `side` only, less those that failed on `other` (listed as failures)."""
    failed = {e.name for e in other.failed} | {e.input for e in other.failed}
    return [
        key
        for key, entry in side.by_key.items()
        if key not in other.by_key and not {key, entry.input, entry.summary.get("input")} & failed
    ]
