"""The gallery's cards: a kind of card per kind of summary, each turned into a record once.

A record is what the page shows of one input (short keys: the cards files hold one per input). Every
kind has k: its kind, n: the input's name and t: its explained classes, each with l: label,
p: probability, g: completeness gap, r: Pearson r and u: top-20% IoU of HiResCAM vs Grad-CAM (what
the index sorts and filters by), plus whatever the kind shows. A failed input's record is n and
e: why it failed. A kind is an entry of CARD_KINDS (see docs/extending.md): which summaries it
shows, how a summary becomes a record (its pictures through `Sources.picture`, so that a report
knows what to check next time), and which thumbnails a record uses; its markup is
templates/cards/<kind>.html.j2 and the kind's entry in report.js's KINDS.
"""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..formats import picture_of
from .run_files import read_summary, stamp
from .site import fixed
from .thumbnails import THUMB_SIDE, VIEW_SIDE, Thumbnails


@dataclass
class Sources:
    """What building one card read: the files (relative to OUT, or absolute) with their sizes and
    mtimes, in the order read, and the thumbnails it uses (each belongs to this card alone: its name
    is a hash of the card's owner, the picture, its size and mtime).

    A run swaps an input's folder in whole (and puts a file in it only by a rename), so the folder's
    mtime stands for the run's pictures directly in it: they are not listed, the folder ("FOLDER/") is,
    before the summary. The originals are the user's files: always listed."""

    owner: str  # the summary the card shows
    root: Path
    root_fd: int
    thumbs: Thumbnails
    methods: list[str]  # the gallery's methods, in the order of each target's m; new ones are appended
    deps: list[str] = field(default_factory=list)
    stamps: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    folder: str = ""  # the summary's folder, relative to OUT

    def _stamp(self, path: str, listed: bool = True) -> tuple[int, int]:
        size_mtime = stamp(path, self.root_fd)  # before reading: a later change is seen next time
        if listed:
            self.deps.append(path)
            self.stamps += size_mtime
        return size_mtime

    def summary(self, relative: str) -> tuple[dict[str, Any] | None, str | None]:
        """The summary and None, or None and why it cannot be read."""
        self.folder = relative.rpartition("/")[0]
        if self.folder:  # stamped first: a file renamed into it or the folder swapped after this is seen
            self._stamp(self.folder + "/")
        self._stamp(relative)
        return read_summary(self.root, relative)

    def picture(self, path: str, identity: str, sides: tuple[int, ...], original: bool) -> list[str] | None:
        """Thumbnail names (relative to thumbs/) of a picture at each longest side, made if missing;
        None when it cannot be read. `original`: an input file in any format, not a run's PNG."""
        in_folder = not original and bool(self.folder) and path.rpartition("/")[0] == self.folder
        size_mtime = self._stamp(path, listed=not in_folder)
        if size_mtime[0] < 0:
            return None
        names = Thumbnails.names(f"{self.owner}\0{identity}", size_mtime, sides)
        self.thumbs.add(os.path.join(self.root, path), names, sides, original)
        self.names += names
        return names

    def method(self, name: str) -> int:
        """The position of a method in each target's m."""
        if name not in self.methods:
            self.methods.append(name)
        return self.methods.index(name)


def link(relative: str) -> str:
    """A URL, relative to OUT/report/, of a file given relative to OUT (every character escaped)."""
    return "../" + quote(relative, safe="/")


def number(value: Any) -> float | None:
    """A finite number, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def image_card(summary: dict[str, Any], sources: Sources) -> dict[str, Any]:
    """A picture's card: w/h: its size, o/v: thumbnails of the original (grid, viewer), z: why no class
    is explained (when t is empty); per target also c: class, f: HiResCAM's prefix-token sum,
    x: identical by construction, m: per method [thumbnail, full-size link] (null where absent)."""
    record: dict[str, Any] = {"w": summary.get("width"), "h": summary.get("height")}
    source = str(summary.get("input", ""))
    original = sources.picture(source, "input:" + source, (THUMB_SIDE, VIEW_SIDE), original=True)
    record["o"], record["v"] = original or (None, None)
    record["t"] = [_target(target, sources) for target in summary.get("targets", [])]
    if not record["t"]:
        record["z"] = _why_none(summary)
    return record


def volume_card(summary: dict[str, Any], sources: Sources) -> dict[str, Any]:
    """A volume's card: the image card without a picture of the original (its maps' pictures show the
    scan), d: its grid, spacing and orientation; each map's cell also links its NIfTI file (third)."""
    record: dict[str, Any] = {"d": scan_text(summary)}
    record["t"] = [_target(target, sources, ("nifti",)) for target in summary.get("targets", [])]
    if not record["t"]:
        record["z"] = _why_none(summary)
    return record


def is_volume(summary: dict[str, Any]) -> bool:
    """A volume's summary: one with its voxel grid and spacing."""
    return isinstance(summary.get("shape"), list) and isinstance(summary.get("spacing"), list)


def scan_text(summary: dict[str, Any]) -> str:
    """A volume's voxel grid, spacing and orientation ("56 x 48 x 36 voxels of 3 x 3.5 x 4.5 mm, LPS")."""
    times = " \N{MULTIPLICATION SIGN} "
    spacing = times.join(f"{s:g}" if number(s) is not None else "?" for s in summary["spacing"])
    text = f"{times.join(map(str, summary['shape']))} voxels of {spacing} mm"
    return text + (f", {summary['orientation']}" if summary.get("orientation") else "")


def _target(target: dict[str, Any], sources: Sources, files: tuple[str, ...] = ()) -> dict[str, Any]:
    """A target's numbers and its maps' cells: [thumbnail, full-size link, then a link (or null) to each
    of the map's `files` (summary fields of its entry)]."""
    agreement = target.get("agreement") or {}
    out = {
        "c": target.get("class"),
        "l": str(target.get("label", target.get("class"))),
        "p": number(target.get("probability")),
        "g": number(target.get("completeness_gap")),
        "r": number(agreement.get("pearson")),
        "u": number(agreement.get("top20_iou")),
    }
    if "hirescam_prefix_sum" in target:
        out["f"] = number(target["hirescam_prefix_sum"])
    if "identical_by_construction" in target:
        out["x"] = bool(target["identical_by_construction"])
    cells: list[Any] = []
    for method, entry in (target.get("maps") or {}).items():
        at = sources.method(method)
        png = picture_of(entry or {})
        if png is None:
            continue
        cells += [None] * (at + 1 - len(cells))
        names = sources.picture(str(png), "png:" + str(png), (THUMB_SIDE,), original=False)
        extra = [link(str(entry[name])) if entry.get(name) else None for name in files]
        cells[at] = [names[0] if names else None, link(str(png)), *extra]
    out["m"] = cells
    return out


def _why_none(summary: dict[str, Any]) -> str:
    """Why an input has no explained class: none passed the threshold (naming the best), or none was asked."""
    none = summary.get("no_target")
    if not isinstance(none, dict):
        return "no class explained"
    best = f"{none.get('best_label', none.get('best_class'))}, p {fixed(none.get('best_probability'), 3)}"
    return f"no class above the threshold {none.get('threshold')} (best: {best})"


def volume_thumbnails(record: dict[str, Any]) -> list[str]:
    return [cell[0] for target in record.get("t", []) for cell in target["m"] if cell and cell[0]]


def image_thumbnails(record: dict[str, Any]) -> list[str]:
    names = [record.get("o"), record.get("v")]
    names += [cell[0] for target in record.get("t", []) for cell in target["m"] if cell]
    return [name for name in names if name]


@dataclass(frozen=True)
class CardKind:
    """How one kind of summary becomes a card."""

    accepts: Callable[[dict[str, Any]], bool]  # does this kind show this summary?
    record: Callable[[dict[str, Any], Sources], dict[str, Any]]  # the record (without k and n)
    thumbnails: Callable[[dict[str, Any]], list[str]]  # the thumbnail names a record uses


CARD_KINDS: dict[str, CardKind] = {  # the first kind that accepts a summary shows it
    "volume": CardKind(is_volume, volume_card, volume_thumbnails),
    "image": CardKind(lambda summary: True, image_card, image_thumbnails),
}


def card_record(summary: dict[str, Any], name: str, sources: Sources) -> dict[str, Any]:
    """The record of an input's card, by the first kind that accepts its summary."""
    kind = next(kind for kind, card in CARD_KINDS.items() if card.accepts(summary))
    return {"k": kind, "n": name, **CARD_KINDS[kind].record(summary, sources)}


def thumbnails_of(record: dict[str, Any]) -> list[str]:
    """The thumbnails a record uses (none for a failed input's)."""
    card = CARD_KINDS.get(record.get("k", ""))
    return card.thumbnails(record) if card else []


def index_row(record: dict[str, Any], label_id: Callable[[str], int]) -> list[Any]:
    """What sorting and filtering need of a record: [name, label ids, highest and lowest probability,
    lowest Pearson r, lowest IoU, largest |completeness gap|] (null where no target has the number)."""
    targets = record.get("t", [])

    def over(name: str, pick: Callable[[list[float]], float]) -> float | None:
        values = [t[name] for t in targets if t.get(name) is not None]
        return pick(values) if values else None

    ids = sorted({label_id(t["l"]) for t in targets})
    gap = over("g", lambda values: max(abs(v) for v in values))
    return [record["n"], ids, over("p", max), over("p", min), over("r", min), over("u", min), gap]
