"""`hirescam report OUT`: the run's files -> OUT/report/index.html, its data, thumbnails and assets.

The first page of cards is in the HTML (readable without JavaScript); every image's record goes to
data.js, loaded by a script tag (file:// pages cannot fetch JSON), from which report.js sorts, filters
and pages. Every link is relative, so the OUT folder can move or be served by any static host.
"""

import collections
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..formats import picture_of
from ..outputs import OutputError, describe
from .run_files import Entry, Run, read_run
from .site import STATIC, environment, fixed, method_name, write_atomic
from .thumbnails import THUMB_SIDE, VIEW_SIDE, Thumbnails

PAGE_SIZE = 48  # cards per page: the DOM never holds more
FAILURES_LISTED = 1000  # failed inputs listed in the HTML itself (all of them are in data.js)
ASSETS = ("report.css", "report.js")


def write_report(out: Path, workers: int | None = None) -> Path:
    """Write (or bring up to date) OUT/report/ for the run in OUT; returns the path of index.html.

    Only files under OUT/report are written, each atomically; thumbnails are made only for new or
    changed pictures (in `workers` processes, default: the usable cores) and unused ones removed.
    """
    run = read_run(out)
    folder = run.root / "report"
    try:
        thumbs = Thumbnails(folder / "thumbs")
        methods = run_methods(run)
        images = [image_record(run.root, entry, methods, thumbs) for entry in run.entries]
        thumbs.make(workers or len(os.sched_getaffinity(0)))
        for record in images:
            _forget_missing(record, thumbs)
        page = page_data(run, methods, images)
        for name in ASSETS:
            write_atomic(folder / "assets" / name, (STATIC / name).read_bytes())
        write_atomic(folder / "data.js", data_script(page))
        html = environment().get_template("index.html.j2").render(page=page, facts=run_facts(run))
        write_atomic(folder / "index.html", html.encode())
        thumbs.prune()
    except OSError as e:
        raise OutputError(f"cannot write the report under {folder}: {describe(e)}") from None
    return folder / "index.html"


def run_methods(run: Run) -> list[str]:
    """The methods of the run, in its configured order (then any others its summaries name)."""
    configured = run.info.get("config", {}).get("explain", {}).get("methods") or []
    found = dict.fromkeys(configured)
    for entry in run.entries:
        for target in (entry.summary or {}).get("targets", []):
            found.update(dict.fromkeys(target.get("maps", {})))
    return list(found)


def link(relative: str) -> str:
    """A URL, relative to OUT/report/, of a file given relative to OUT (every character escaped)."""
    return "../" + quote(relative, safe="/")


def image_record(root: Path, entry: Entry, methods: list[str], thumbs: Thumbnails) -> dict[str, Any]:
    """One image as the page shows it (short keys: data.js holds one per input).

    i: input order, n: name, s: status, e: error, w/h: size, o/v: original thumbnail/view,
    z: why no class is explained (when t is empty), t: targets, each c: class, l: label,
    p: probability, g: completeness gap, r: Pearson r and u: top-20% IoU of HiResCAM vs Grad-CAM,
    f: HiResCAM's prefix-token sum, x: identical by construction, m: per method [thumbnail,
    full-size link] (null where the method is absent).
    """
    record: dict[str, Any] = {"i": entry.index, "n": entry.name, "s": entry.status}
    if entry.summary is None:
        record["e"] = entry.error
        return record
    summary = entry.summary
    record["w"], record["h"] = summary.get("width"), summary.get("height")
    source = str(summary.get("input", ""))
    original = thumbs.add(Path(source), (THUMB_SIDE, VIEW_SIDE), "input:" + source, original=True)
    record["o"], record["v"] = original or (None, None)
    record["t"] = [_target(root, target, methods, thumbs) for target in summary.get("targets", [])]
    if not record["t"]:
        record["z"] = _why_none(summary)
    return record


def _why_none(summary: dict[str, Any]) -> str:
    """Why an image has no explained class: none passed the threshold (naming the best), or none was asked."""
    none = summary.get("no_target")
    if not isinstance(none, dict):
        return "no class explained"
    best = f"{none.get('best_label', none.get('best_class'))}, p {fixed(none.get('best_probability'), 3)}"
    return f"no class above the threshold {none.get('threshold')} (best: {best})"


def _target(root: Path, target: dict[str, Any], methods: list[str], thumbs: Thumbnails) -> dict[str, Any]:
    agreement = target.get("agreement") or {}
    out = {
        "c": target.get("class"),
        "l": str(target.get("label", target.get("class"))),
        "p": target.get("probability"),
        "g": target.get("completeness_gap"),
        "r": agreement.get("pearson"),
        "u": agreement.get("top20_iou"),
    }
    if "hirescam_prefix_sum" in target:
        out["f"] = target["hirescam_prefix_sum"]
    if "identical_by_construction" in target:
        out["x"] = bool(target["identical_by_construction"])
    maps = target.get("maps", {})
    out["m"] = []
    for method in methods:
        picture = picture_of(maps.get(method) or {})
        if picture is None:
            out["m"].append(None)
            continue
        names = thumbs.add(root / picture, (THUMB_SIDE,), "png:" + picture)
        out["m"].append([names[0] if names else None, link(picture)])
    return out


def _forget_missing(record: dict[str, Any], thumbs: Thumbnails) -> None:
    """Drop the names of pictures that could not be made (unreadable or vanished sources)."""
    if record.get("o") and not thumbs.has(record["o"]):
        record["o"] = record["v"] = None
    for target in record.get("t", []):
        for cell in target["m"]:
            if cell is not None and not thumbs.has(cell[0]):
                cell[0] = None


def page_data(run: Run, methods: list[str], images: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the page is built from (data.js holds it whole; the HTML its first page)."""
    counts = collections.Counter(record["s"] for record in images)
    labels = collections.Counter(t["l"] for record in images for t in record.get("t", ()))
    unexplained = sum(1 for r in images if r["s"] != "error" and not r.get("t"))
    return {
        "title": str(run.info.get("model") or _first(run, "model") or "run"),
        "methods": [[m, method_name(m)] for m in methods],
        "page_size": PAGE_SIZE,
        "counts": {status: counts.get(status, 0) for status in ("ok", "skipped", "error")},
        "classes": sorted(labels.items(), key=lambda kv: (-kv[1], kv[0])),
        "unexplained": unexplained,
        "images": images,
    }


def data_script(page: dict[str, Any]) -> bytes:
    """data.js: the page's data as JSON in a string literal (V8 parses that several times faster than
    the same object literal), with the characters that could end a script or a line escaped."""
    text = json.dumps(page, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)
    literal = json.dumps(text, ensure_ascii=False)
    for char in "<>&\u2028\u2029":
        literal = literal.replace(char, f"\\u{ord(char):04x}")
    return f"window.HIRESCAM_REPORT = JSON.parse({literal});\n".encode()


def _first(run: Run, field: str) -> Any:
    return next((e.summary.get(field) for e in run.entries if e.summary and e.summary.get(field)), None)


def run_facts(run: Run) -> dict[str, Any]:
    """The header: (label, text) facts, the effective config as JSON, and notes about the run's files."""
    info = run.info
    facts = [
        ("Model", info.get("model") or _first(run, "model")),
        ("Target layer", info.get("target_layer") or _first(run, "target_layer")),
    ]
    layout = info.get("layout") or _first(run, "layout")
    if isinstance(layout, dict):
        text = str(layout.get("kind", "?"))
        if layout.get("grid"):
            text += ", grid " + " \N{MULTIPLICATION SIGN} ".join(map(str, layout["grid"]))
        if layout.get("prefix_tokens"):
            text += f", {layout['prefix_tokens']} prefix tokens"
        facts.append(("Layout", text))
    facts.append(("Guarantee", _guarantee(info.get("guarantee", _guarantee_of_summaries(run)))))
    if "identical_by_construction" in info and info["identical_by_construction"] is not None:
        same = info["identical_by_construction"]
        facts.append(("HiResCAM = Grad-CAM", "yes, by construction" if same else "no"))
    facts.append(("Device", info.get("device")))
    counts = info.get("counts")
    if isinstance(counts, dict):
        parts = [f"{counts.get(k, 0)} {k}" for k in ("ok", "skipped", "error")]
        if counts.get("not_reached"):
            parts.append(f"{counts['not_reached']} not reached")
        facts.append(("Inputs", f"{counts.get('inputs', len(run.entries))}: " + ", ".join(parts)))
    timings = info.get("timings") or {}
    if timings:
        text = f"started {timings.get('started', '?')}, {timings.get('seconds', '?')} s"
        if timings.get("images_per_second"):
            text += f", {timings['images_per_second']} images/s"
        facts.append(("Time", text))
    if info.get("interrupted"):
        facts.append(("Interrupted", "yes: the run stopped early"))
    resources = info.get("resources")
    if isinstance(resources, dict):
        facts.append(("Resources", ", ".join(f"{k} {v}" for k, v in resources.items())))
    ranks = info.get("ranks")
    if ranks:
        facts.append(("Ranks", str(len(ranks))))
    if info.get("version"):
        versions = info.get("versions") or {}
        names = [f"hirescam-cli {info['version']}", *(f"{k} {v}" for k, v in versions.items())]
        facts.append(("Versions", ", ".join(names)))
    if info.get("config_file"):
        facts.append(("Config file", info["config_file"]))
    extra = {k: info[k] for k in ("config", "preprocess", "ranks") if k in info}
    return {
        "facts": [(label, str(value)) for label, value in facts if value is not None],
        "config": json.dumps(extra, indent=2, ensure_ascii=False) if extra else None,
        "notes": run.notes,
        "failures": [e for e in run.entries if e.status == "error"][:FAILURES_LISTED],
        "failures_total": sum(1 for e in run.entries if e.status == "error"),
    }


def _guarantee_of_summaries(run: Run) -> bool | None:
    for entry in run.entries:
        for target in (entry.summary or {}).get("targets", []):
            return target.get("guarantee")
    return None


def _guarantee(value: Any) -> str:
    if value is True:
        return "holds: the head is affine, so HiResCAM sums to logit - bias"
    if value is False:
        return "does not hold: the head after the layer is not affine"
    return "unknown (no image was explained)"
