"""DIR/compare.html: the comparison of two runs as a static page, least agreeing inputs first.

The first page of cards is in the HTML (readable without JavaScript); every input's record goes to
compare-files/data.js, loaded by a script tag (file:// pages cannot fetch JSON), from which compare.js
sorts, filters and pages. Thumbnails of the originals and of both runs' overlays are made once under
compare-files/thumbs (kept while their pictures are unchanged); full-size links point at the runs' own
PNGs, relative to DIR, so DIR opens from file:// beside BASE and NEW, or from any static host.
"""

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..compare.comparison import least_agreeing_first
from ..outputs import OutputError, describe
from .site import STATIC, environment, method_name, write_atomic
from .thumbnails import THUMB_SIDE, VIEW_SIDE, Thumbnails

PAGE_SIZE = 48  # cards per page: the DOM never holds more
LISTED = 1000  # inputs not compared listed by name in the HTML, per kind (compare.json lists more)
FILES = "compare-files"  # beside compare.html: assets, data.js, thumbs/
ASSETS = ("report.css", "compare.css", "compare.js")


def write_compare_page(out: Path, comparison, document: dict[str, Any], workers: int | None = None) -> Path:
    """Write (or bring up to date) DIR/compare.html for a comparison (its compare.json `document`); returns
    its path. Only files under DIR are written, each atomically."""
    folder = Path(out).absolute()
    files = folder / FILES
    try:
        thumbs = Thumbnails(files / "thumbs")
        links = {side.label: side.root for side in (comparison.base, comparison.new)}
        methods = comparison.methods
        primary = methods.index(comparison.agreement_method)
        records = [card_record(row, comparison, folder, thumbs, links, primary) for row in comparison.rows]
        thumbs.make(workers or len(os.sched_getaffinity(0)))
        for record in records:
            _forget_missing(record, thumbs)
        order = [row["index"] for row in least_agreeing_first(comparison.rows)]
        position = {row["index"]: n for n, row in enumerate(comparison.rows)}
        page = {
            "methods": [[m, method_name(m)] for m in methods],
            "primary": primary,
            "page_size": PAGE_SIZE,
            "files": FILES,
            "labels": _labels(records),
            "records": records,
        }
        for name in ASSETS:
            write_atomic(files / name, (STATIC / name).read_bytes())
        write_atomic(files / "data.js", data_script(page))
        first = [records[position[i]] for i in order[:PAGE_SIZE]]
        html = (
            environment()
            .get_template("compare.html.j2")
            .render(page=page, first=first, header=header(document), files=FILES)
        )
        write_atomic(folder / "compare.html", html.encode())
        thumbs.prune()
    except OSError as e:
        raise OutputError(f"cannot write the comparison page under {folder}: {describe(e)}") from None
    return folder / "compare.html"


def link(path: Path, folder: Path) -> str:
    """A URL of a file relative to the page's folder (every character escaped)."""
    return quote(Path(os.path.relpath(path, folder)).as_posix(), safe="/")


def card_record(
    row: dict[str, Any], comparison, folder: Path, thumbs: Thumbnails, links, primary: int
) -> dict:
    """One input as the page shows it (short keys: data.js holds one per input).

    i: BASE's input order, n: key, c: top-1 changed, f: top-5 changed, a: agreement (lowest r of the
    agreement method over the classes explained on both sides), b / w: [label, probability] of BASE's /
    NEW's top-1, o / v: original thumbnail / view, d: the largest |probability change|, k: the largest
    peak distance of the agreement method, t: classes explained on both sides, each l: label, pb / pn:
    probability, gb / gn: completeness gap, m: per method [r, IoU, peak distance, BASE thumbnail, BASE link,
    NEW thumbnail, NEW link] (null where the method is absent), x: classes explained on one side only,
    z: why something was not compared.
    """
    base = comparison.base.by_key[row["key"]].summary
    record: dict[str, Any] = {
        "i": row["index"],
        "n": row["key"],
        "c": row["top1_changed"],
        "f": row["top5_changed"],
    }
    record["a"] = row["agreement"]
    record["b"], record["w"] = (
        [_label(s["top1"]), s["top1"].get("probability")] for s in (row["base"], row["new"])
    )
    source = str(base.get("input", ""))
    original = thumbs.add(Path(source), (THUMB_SIDE, VIEW_SIDE), "input:" + source, original=True)
    record["o"], record["v"] = original or (None, None)
    targets = []
    for c in row["classes"]:
        cells = []
        for method in comparison.methods:
            cell = c["maps"].get(method)
            if cell is None:
                cells.append(None)
                continue
            pictures = []
            for label, png in (("BASE", cell["base_png"]), ("NEW", cell["new_png"])):
                path = links[label] / png if png else None
                names = thumbs.add(path, (THUMB_SIDE,), f"png:{path}") if path else None
                pictures += [names[0] if names else None, link(path, folder) if path else None]
            cells.append([cell["pearson"], cell["top20_iou"], cell["peak_distance"], *pictures])
        targets.append(
            {
                "l": str(c["label"]),
                "pb": c["base"]["probability"],
                "pn": c["new"]["probability"],
                "gb": c["base"]["completeness_gap"],
                "gn": c["new"]["completeness_gap"],
                "m": cells,
            }
        )
    record["t"] = targets
    changes = [abs(c["probability_change"]) for c in row["classes"] if c["probability_change"] is not None]
    record["d"] = max(changes, default=None)
    peaks = [t["m"][primary][2] for t in targets if t["m"][primary] and t["m"][primary][2] is not None]
    record["k"] = max(peaks, default=None)
    one_side = [f"{c['label']} explained in BASE only" for c in row["only_base_classes"]] + [
        f"{c['label']} explained in NEW only" for c in row["only_new_classes"]
    ]
    if one_side:
        record["x"] = "; ".join(one_side)
    if row["problems"]:
        record["z"] = "; ".join(row["problems"])
    return record


def _label(top: dict[str, Any]) -> str:
    return str(top.get("label") if top.get("label") is not None else top.get("class"))


def _forget_missing(record: dict[str, Any], thumbs: Thumbnails) -> None:
    """Drop the names of pictures that could not be made (unreadable or vanished sources)."""
    if record.get("o") and not thumbs.has(record["o"]):
        record["o"] = record["v"] = None
    for target in record["t"]:
        for cell in target["m"]:
            for at in (3, 5):
                if cell is not None and cell[at] is not None and not thumbs.has(cell[at]):
                    cell[at] = None


def _labels(records: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """BASE's top-1 labels with how many inputs have each, most first (the class filter)."""
    counts: dict[str, int] = {}
    for record in records:
        label = str(record["b"][0])
        counts[label] = counts.get(label, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def header(document: dict[str, Any]) -> dict[str, Any]:
    """The page's header: both runs side by side, the gates, the totals per method, and what was not
    compared, from compare.json."""
    sides = document["base"], document["new"]
    grid = lambda s: " \N{MULTIPLICATION SIGN} ".join(map(str, s.get("grid") or [])) or None  # noqa: E731
    facts = [
        ("Folder", [s["out"] for s in sides]),
        ("Model", [s["model"] for s in sides]),
        ("Target layer", [s["target_layer"] for s in sides]),
        ("Grid", [grid(s) for s in sides]),
        ("Guarantee", [{True: "holds", False: "does not hold"}.get(s["guarantee"]) for s in sides]),
        ("hirescam-cli", [s["version"] for s in sides]),
    ]
    totals = document["aggregates"]
    listed = {kind: names[:LISTED] for kind, names in document["not_compared"].items()}
    return {
        "facts": [
            (label, [str(v) if v is not None else "\N{EN DASH}" for v in values]) for label, values in facts
        ],
        "gates": document["gates"],
        "passed": document["passed"],
        "totals": totals,
        "methods": [(method_name(m), numbers) for m, numbers in totals["methods"].items()],
        "notes": document["notes"],
        "not_compared": listed,
        "not_compared_total": sum(
            totals["inputs"][k] for k in ("only_base", "only_new", "bytes_differ", "failed")
        ),
        "footing": document["footing"],
        "agreement_method": method_name(document["agreement_method"]),
    }


def data_script(page: dict[str, Any]) -> bytes:
    """data.js: the page's data as JSON in a string literal, with the characters that could end a script
    or a line escaped."""
    text = json.dumps(page, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)
    literal = json.dumps(text, ensure_ascii=False)
    for char in "<>&\u2028\u2029":
        literal = literal.replace(char, f"\\u{ord(char):04x}")
    return f"window.HIRESCAM_COMPARE = JSON.parse({literal});\n".encode()
