"""The gallery's data in chunks, brought up to date incrementally, in memory flat in the number of inputs.

Besides index.html and thumbs/, OUT/report/ holds:
  index.js       per input what sorting and filtering need (its index row and status), the chunks in
                 order and the page's facts: the one data file the page loads first;
  cards/D.js     the card records of one chunk of consecutive inputs, which the page loads when it
                 shows one of them (script files, so that they load from file:// and any static host);
  chunks/M.json  a chunk's manifest, what its summaries contributed: the files its cards were built
                 from (summaries, pictures) with a digest of their sizes and mtimes, the index rows,
                 which inputs failed and tallies;
  manifest.json  the chunks in order, the tables their records refer to (methods, labels), and the
                 results.jsonl they were made from: its size and mtime, its statuses.
The files under cards/ and chunks/ are named by a digest of their contents. A chunk ends after an
input whose identity hashes to a boundary (or at CHUNK_MAX inputs), so an input added or removed
changes its own chunk only. A report reads a summary again only when a file its card was built from
changed, rewrites only the chunks holding such inputs, and reads results.jsonl only when it changed
(matching its lines to the last report's inputs in ledger order, which is key order).
"""

import collections
import hashlib
import json
import os
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .cards import Sources, card_record, index_row, thumbnails_of
from .run_files import Ledger, Line
from .site import js_string, write_atomic
from .thumbnails import QUALITY, THUMB_SIDE, VIEW_SIDE, Thumbnails

VERSION = 2  # of these files: another version is rebuilt from scratch (the thumbnails are kept)
CHUNK_MEAN = 64  # inputs per chunk on average
CHUNK_MAX = 256
FLUSH_JOBS = 2048  # thumbnails planned before they are made and the chunks waiting for them written,
FLUSH_CHUNKS = 64  # or chunks waiting
PAGE_SIZE = 48  # cards per page: the DOM never holds more
FAILURES_LISTED = 1000  # failed inputs listed in index.html itself (the gallery filters all of them)
LETTERS = {"ok": "o", "skipped": "s", "error": "e"}  # statuses, one letter per input in index.js
STATUSES = {letter: status for status, letter in LETTERS.items()}
CARDS_CALL = "window.HIRESCAM_CARDS("
MANIFEST_KEYS = {"ledger", "statuses", "regular", "methods", "labels", "chunks"}  # besides version, context


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=10).hexdigest()


def _stamps_digest(stamps: list[int]) -> str:
    return _digest(array("q", stamps).tobytes())


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _stamps(paths: list[str], root_fd: int) -> list[int]:
    """Size and mtime (ns) of each file or folder (relative to OUT or absolute), flat; -1s where missing."""
    flat: list[int] = []
    stat = os.stat
    for path in paths:
        try:
            s = stat(path, dir_fd=root_fd)
        except (OSError, ValueError):
            flat += (-1, -1)
            continue
        flat += (s.st_size, s.st_mtime_ns)
    return flat


def read_cards(path: Path) -> list[dict[str, Any]]:
    """The records of a cards file."""
    text = path.read_text(encoding="utf-8")
    literal = text[text.index("JSON.parse(") + len("JSON.parse(") : text.rindex("))")]
    return json.loads(json.loads(literal))


class OldChunk:
    """A chunk as the last report left it: its manifest, and its items, rows and cards when needed."""

    def __init__(self, folder: Path, cards: str, manifest: str):
        self.folder, self.cards_name, self.manifest_name = folder, cards, manifest
        self.header = json.loads((folder / "chunks" / f"{manifest}.json").read_bytes())
        self.has_cards = (folder / "cards" / f"{cards}.js").is_file()

    def unchanged(self, root_fd: int) -> bool:
        """Whether every file its cards were built from is as it was (and its cards are there)."""
        return (
            self.has_cards and _stamps_digest(_stamps(self.header["deps"], root_fd)) == self.header["stamp"]
        )

    def items(self, letters: str = "") -> list["OldItem"]:
        """Its inputs, with their ledger's status letters when known (else "ok")."""
        deps, at, items = self.header["deps"], 0, []
        for offset, (identity, error, count, digest) in enumerate(json.loads(self.header["items"])):
            if error is not None:  # failed in the ledger
                line = Line("error", shown=identity, error=error)
            else:
                line = Line(STATUSES[letters[offset]] if letters else "ok", identity)
            items.append(OldItem(self, offset, line, offset in self.errors, deps[at : at + count], digest))
            at += count
        return items

    def status(self, letters: str) -> str:
        """Its inputs' statuses, from their ledger's: "e" where a summary could not be read."""
        return "".join("e" if offset in self.errors else letter for offset, letter in enumerate(letters))

    @cached_property
    def rows(self) -> list[list[Any]]:
        return json.loads("[" + self.header["rows"] + "]")

    @cached_property
    def cards(self) -> list[dict[str, Any]]:
        return read_cards(self.folder / "cards" / f"{self.cards_name}.js")

    @cached_property
    def errors(self) -> dict[int, list[str]]:
        return {offset: [name, reason] for offset, name, reason in self.header["errors"]}


@dataclass
class OldItem:
    """One input as the last report showed it."""

    chunk: OldChunk
    offset: int
    line: Line
    failed: bool  # in the ledger, or its summary could not be read
    deps: list[str]
    stamp: str  # digest of the deps' sizes and mtimes


@dataclass
class Item:
    """One input as this report shows it: built now (card) or kept from the last report (old)."""

    line: Line
    status: str  # its letter: the ledger's, or "e" when its summary could not be read
    deps: list[str]
    stamps: list[int]
    row: list[Any]
    card: dict[str, Any] | None = None
    old: OldItem | None = None

    def record(self) -> dict[str, Any]:
        assert self.old is not None or self.card is not None
        return self.card if self.card is not None else self.old.chunk.cards[self.old.offset]

    def error(self) -> list[str] | None:
        """[name, reason] of a failed input."""
        if self.status != "e":
            return None
        if self.card is not None:
            return [self.card["n"], self.card["e"]]
        return self.old.chunk.errors[self.old.offset]


@dataclass
class Pending:
    """A chunk whose cards wait for their thumbnails."""

    items: list[Item]
    header: dict[str, Any]
    entry: list[Any]  # its line in manifest.json's chunks, filled in when written


class StaleManifest(Exception):
    """The last report's files are damaged: read the ledger instead."""


class Merge:
    """The last report's inputs matched to the ledger's lines, both in ledger order."""

    def __init__(self, olds: Iterator[OldItem], drop):
        self.olds, self.drop = olds, drop
        self.head = next(olds, None)

    def _take(self) -> OldItem:
        taken, self.head = self.head, next(self.olds, None)
        return taken

    def match(self, line: Line) -> OldItem | None:
        """The last report's version of this input, if any; the inputs it passed over are dropped."""
        if line.status == "error":
            return self._take() if self.head is not None and self.head.line == line else None
        key = line.key
        while self.head is not None and (self.head.line.status == "error" or self.head.line.key < key):
            self.drop(self._take(), ())
        if self.head is not None and self.head.line.summary == line.summary:
            return self._take()
        return None

    def finish(self) -> None:
        while self.head is not None:
            self.drop(self._take(), ())


@dataclass
class Totals:
    """What index.html shows of the whole gallery."""

    inputs: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LETTERS, 0))
    labels: collections.Counter = field(default_factory=collections.Counter)  # label id -> inputs
    unexplained: int = 0
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (index, name, reason)
    failures_total: int = 0
    first: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)  # (index, status, record)
    first_summary: str | None = None  # of the first input that has one


class Chunks:
    """OUT/report's chunks brought up to date with the run: `update`, then `finish`, then `prune`."""

    def __init__(self, folder: Path, ledger: Ledger, configured: list[str], workers: int):
        self.folder, self.ledger = folder, ledger
        self.context = {"thumbs": [THUMB_SIDE, VIEW_SIDE, QUALITY], "methods": configured}
        self.old = self._read_manifest()
        self.methods: list[str] = list(self.old["methods"] if self.old else configured)
        self.labels: list[str] = list(self.old["labels"] if self.old else [])
        self.label_ids = {label: i for i, label in enumerate(self.labels)}
        self.thumbs = Thumbnails(folder / "thumbs", workers)
        self.table: list[list[Any]] = []  # [cards, manifest, count] per chunk
        self.letters: list[str] = []  # per chunk, the ledger's statuses of its inputs
        self.open: list[Item] = []  # the chunk being filled
        self.pending: list[Pending] = []
        self.unused: set[str] = set()  # thumbnails of the last report no card uses now
        self.sweep = self.old is None and bool(self.thumbs.listing())  # unknown thumbnails: check them all
        self.regular = True  # the ledger's keys increase: no two cards share a thumbnail
        self.changed = False  # a card was built or dropped: the thumbnails in use may differ
        self.totals = Totals()

    def __enter__(self) -> "Chunks":
        self.root_fd = os.open(self.ledger.root, os.O_RDONLY | os.O_DIRECTORY)  # deps are relative to OUT
        try:
            self.index = IndexWriter(self.folder / "index.js")
        except BaseException:
            os.close(self.root_fd)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.index.close()
        self.thumbs.__exit__()
        os.close(self.root_fd)

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            old = json.loads((self.folder / "manifest.json").read_bytes())
        except (OSError, ValueError):
            return None
        current = (
            isinstance(old, dict)
            and old.get("version") == VERSION
            and old.get("context") == self.context
            and old.keys() >= MANIFEST_KEYS
        )
        return old if current and (self.folder / "thumbs").is_dir() else None

    def _old_chunks(self, strict: bool) -> Iterator[OldChunk]:
        for cards, manifest, _count in self.old["chunks"] if self.old else ():
            try:
                yield OldChunk(self.folder, cards, manifest)
            except (OSError, ValueError, KeyError):
                if strict:  # its inputs are known only to the ledger
                    raise StaleManifest from None
                self.sweep = True  # its inputs are built again

    # ---- the pass over every input
    def update(self, read_ledger: bool = False) -> None:
        """Bring every chunk up to date, in input order. Unless `read_ledger`, an unchanged results.jsonl
        is not read: the inputs are the last report's (StaleManifest when its files are damaged)."""
        old = self.old
        if (
            not read_ledger
            and old is not None
            and self.ledger.stamp is not None
            and self.ledger.stamp == old["ledger"]
        ):
            self.regular, at = old["regular"], 0
            for chunk in self._old_chunks(strict=True):  # the same inputs as last time: check their files
                letters = old["statuses"][at : at + chunk.header["count"]]
                at += len(letters)
                if chunk.unchanged(self.root_fd):
                    self._keep(chunk, letters)
                else:
                    for item in chunk.items(letters):
                        self._add(self._refresh(item.line, item))
        else:
            merge = Merge(
                (item for chunk in self._old_chunks(strict=False) for item in chunk.items()), self._drop
            )
            self.regular = old is None or old["regular"]  # a merge of two ledgers in key order is exact
            previous = None
            for line in self.ledger.lines:
                if line.status != "error":
                    self.regular = self.regular and (previous is None or previous < line.key)
                    previous = line.key
                self._add(self._refresh(line, merge.match(line)))
            merge.finish()
        self._close()
        self._flush()

    def _refresh(self, line: Line, old: OldItem | None) -> Item:
        """The input's item: the last report's when none of its files changed, else built again."""
        if old is not None and old.chunk.has_cards:
            stamps = _stamps(old.deps, self.root_fd)
            if _stamps_digest(stamps) == old.stamp:
                status = "e" if old.failed else LETTERS[line.status]
                return Item(line, status, old.deps, stamps, old.chunk.rows[old.offset], old=old)
        item, names = self._build(line)
        if old is not None:
            self._drop(old, names)
        return item

    def _build(self, line: Line) -> tuple[Item, list[str]]:
        sources = Sources(line.summary, self.ledger.root, self.root_fd, self.thumbs, self.methods)
        status = LETTERS[line.status]
        if line.status == "error":
            record: dict[str, Any] = {"n": line.shown, "e": line.error}
        else:
            summary, reason = sources.summary(line.summary)
            if summary is None:
                record, status = {"n": line.key or line.shown, "e": reason}, "e"
            else:
                record = card_record(summary, str(summary.get("key", line.key)), sources)
        row = index_row(record, self._label_id)
        return Item(line, status, sources.deps, sources.stamps, row, card=record), sources.names

    def _label_id(self, label: str) -> int:
        if label not in self.label_ids:
            self.label_ids[label] = len(self.labels)
            self.labels.append(label)
        return self.label_ids[label]

    def _drop(self, old: OldItem, keep) -> None:
        """The last report's version of an input is gone: so are its thumbnails that are not in `keep`."""
        self.changed = True
        if not old.chunk.has_cards:
            self.sweep = True
            return
        self.unused.update(set(thumbnails_of(old.chunk.cards[old.offset])) - set(keep))

    # ---- chunks
    def _add(self, item: Item) -> None:
        if self.totals.first_summary is None and item.line.status != "error" and item.status != "e":
            self.totals.first_summary = item.line.summary
        self.open.append(item)
        if zlib.crc32(item.line.identity.encode()) % CHUNK_MEAN == 0 or len(self.open) >= CHUNK_MAX:
            self._close()

    def _keep(self, chunk: OldChunk, letters: str) -> None:
        """A chunk whose inputs are the last report's: its files stay as they are (`letters`: their
        ledger's statuses)."""
        if self.totals.first_summary is None:
            self.totals.first_summary = next(
                (old.line.summary for old in chunk.items(letters) if not old.failed), None
            )
        self._tally(chunk.header, letters, chunk.status(letters), lambda offset: chunk.cards[offset])
        self.table.append([chunk.cards_name, chunk.manifest_name, len(letters)])

    def _close(self) -> None:
        """The open chunk is complete: its rows go to the index now, its cards once their thumbnails exist."""
        items, self.open = self.open, []
        if not items:
            return
        letters = "".join(LETTERS[item.line.status] for item in items)
        status = "".join(item.status for item in items)
        chunk = items[0].old and items[0].old.chunk
        if (  # the inputs of one chunk of the last report, each as it was
            all(
                item.card is None and item.old.chunk is chunk and item.old.offset == k
                for k, item in enumerate(items)
            )
            and chunk.header["count"] == len(items)
        ):
            self._keep(chunk, letters)
            return
        self.changed = True
        rows = [item.row for item in items]
        header = {
            "cards": None,
            "count": len(items),
            "deps": [dep for item in items for dep in item.deps],
            "stamp": _stamps_digest([s for item in items for s in item.stamps]),
            "rows": _dumps(rows)[1:-1],
            "labels": sorted(collections.Counter(i for row in rows for i in row[1]).items()),
            "none": sum(1 for row, letter in zip(rows, status, strict=True) if letter != "e" and not row[1]),
            "errors": [[k, *item.error()] for k, item in enumerate(items) if item.status == "e"],
            "items": _dumps(
                [[i.line.identity, i.line.error, len(i.deps), _stamps_digest(i.stamps)] for i in items]
            ),
        }
        self._tally(header, letters, status, lambda offset: items[offset].record())
        entry = [None, None, len(items)]
        self.table.append(entry)
        self.pending.append(Pending(items, header, entry))
        if not self.thumbs.jobs or len(self.thumbs.jobs) >= FLUSH_JOBS or len(self.pending) >= FLUSH_CHUNKS:
            self._flush()

    def _tally(self, header: dict[str, Any], letters: str, status: str, record) -> None:
        """Count a chunk's inputs in the totals and pass its rows and statuses to the index
        (`letters`: the ledger's statuses, `status`: the page's)."""
        totals, start = self.totals, self.totals.inputs
        self.letters.append(letters)
        self.index.add(header["rows"], status)
        totals.inputs += len(status)
        for name, letter in LETTERS.items():
            totals.counts[name] += status.count(letter)
        totals.labels.update(dict(header["labels"]))
        totals.unexplained += header["none"]
        totals.failures_total += len(header["errors"])
        for offset, name, reason in header["errors"]:
            if len(totals.failures) < FAILURES_LISTED:
                totals.failures.append((start + offset, name, reason))
        for offset in range(min(len(status), PAGE_SIZE - len(totals.first))):
            totals.first.append((start + offset, STATUSES[status[offset]], record(offset)))

    def _flush(self) -> None:
        """Make the planned thumbnails, then write the cards and manifests that waited for them."""
        if self.thumbs.jobs:
            self.thumbs.make()
        failed = self.thumbs.failed
        for chunk in self.pending:
            records = []
            for item in chunk.items:
                if item.card is not None and failed:
                    _forget(item.card, failed)
                records.append(item.record())
            text = _dumps(records)
            name = _digest(text.encode())
            path = self.folder / "cards" / f"{name}.js"
            if not path.exists():
                write_atomic(path, f'{CARDS_CALL}"{name}", JSON.parse({js_string(text)}));\n'.encode())
            chunk.header["cards"] = name
            chunk.entry[:2] = [name, self._write_manifest(chunk.header)]
        self.pending = []

    def _write_manifest(self, header: dict[str, Any]) -> str:
        text = _dumps(header).encode()
        name = _digest(text)
        path = self.folder / "chunks" / f"{name}.json"
        if not path.exists():
            write_atomic(path, text)
        return name

    # ---- the end
    def finish(self, facts: dict[str, Any]) -> None:
        """Write index.js (every row, then the chunks and `facts`) and manifest.json."""
        self.index.finish({"chunks": [[cards, count] for cards, _, count in self.table], **facts})
        manifest = {
            "version": VERSION,
            "context": self.context,
            "ledger": self.ledger.stamp,
            "statuses": "".join(self.letters),
            "regular": self.regular,
            "methods": self.methods,
            "labels": self.labels,
            "chunks": self.table,
        }
        (self.folder / "thumbs").mkdir(exist_ok=True)  # the manifest holds only with its thumbnails
        write_atomic(self.folder / "manifest.json", _dumps(manifest).encode())

    def prune(self) -> None:
        """Remove the files no chunk uses any more (and data.js, the single data file of older reports)."""
        for sub, used in (
            ("cards", {c for c, _, _ in self.table}),
            ("chunks", {m for _, m, _ in self.table}),
        ):
            try:
                names = os.listdir(self.folder / sub)
            except OSError:
                continue
            for name in names:
                if name.rsplit(".", 1)[0] not in used:
                    (self.folder / sub / name).unlink(missing_ok=True)
        (self.folder / "data.js").unlink(missing_ok=True)
        if self.sweep or (self.changed and not self.regular):  # unchanged: the same thumbnails in use
            used = set()
            for cards, _, _ in self.table:
                for record in read_cards(self.folder / "cards" / f"{cards}.js"):
                    used.update(thumbnails_of(record))
            self.thumbs.remove(self.thumbs.listing() - used)
        else:
            self.thumbs.remove(self.unused)


def _forget(record: Any, failed: set[str]) -> Any:
    """The record without the thumbnails that could not be made (their sources are unreadable)."""
    if isinstance(record, dict):
        for key, value in record.items():
            record[key] = None if isinstance(value, str) and value in failed else _forget(value, failed)
    elif isinstance(record, list):
        for k, value in enumerate(record):
            record[k] = None if isinstance(value, str) and value in failed else _forget(value, failed)
    return record


class IndexWriter:
    """index.js, written as the chunks go by: `window.HIRESCAM_REPORT = JSON.parse("{rows: [...], ...}")`."""

    def __init__(self, path: Path):
        self.path = path
        self.temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.temp, "w", encoding="utf-8")  # noqa: SIM115 (closed by close or finish)
        self.file.write('window.HIRESCAM_REPORT = JSON.parse("' + js_string('{"rows":[')[1:-1])
        self.rows = 0
        self.status: list[str] = []

    def add(self, rows: str, status: str) -> None:
        """A chunk's rows (a JSON fragment) and its inputs' status letters."""
        if status:
            self.file.write(js_string(("," if self.rows else "") + rows)[1:-1])
            self.rows += len(status)
            self.status.append(status)

    def finish(self, facts: dict[str, Any]) -> None:
        tail = "]," + _dumps({"status": "".join(self.status), **facts})[1:]
        self.file.write(js_string(tail)[1:-1] + '");\n')
        self.file.close()
        os.replace(self.temp, self.path)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
            self.temp.unlink(missing_ok=True)
