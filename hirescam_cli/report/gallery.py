"""`hirescam report OUT`: the run's files -> OUT/report/index.html, its data, thumbnails and assets.

The first page of cards is in the HTML (readable without JavaScript). index.js holds what sorting and
filtering need of every input, and the cards come in chunks the page loads when it shows them
(script files: file:// pages cannot fetch JSON); report.js sorts, filters and pages. A report
rewrites only what changed since the last one (see chunks.py). Every link is relative, so the OUT
folder can move or be served by any static host.
"""

import json
import os
from pathlib import Path
from typing import Any

from ..outputs import OutputError, describe
from .chunks import PAGE_SIZE, Chunks, StaleManifest, Totals
from .run_files import Ledger, read_ledger, read_summary
from .site import STATIC, environment, method_name, write_atomic

ASSETS = ("report.css", "report.js")


def write_report(out: Path, workers: int | None = None) -> Path:
    """Write (or bring up to date) OUT/report/ for the run in OUT; returns the path of index.html.

    Only files under OUT/report are written, each atomically; summaries are read and thumbnails made
    only for new or changed inputs (in `workers` processes, default: the usable cores), and what no
    card uses any more is removed.
    """
    ledger = read_ledger(out)
    folder = ledger.root / "report"
    workers = workers or len(os.sched_getaffinity(0))
    configured = list(ledger.info.get("config", {}).get("explain", {}).get("methods") or [])
    try:
        try:
            return _write(folder, ledger, configured, workers, read_ledger=False)
        except StaleManifest:
            return _write(folder, read_ledger(out), configured, workers, read_ledger=True)
    except OSError as e:
        raise OutputError(f"cannot write the report under {folder}: {describe(e)}") from None


def _write(folder: Path, ledger: Ledger, configured: list[str], workers: int, read_ledger: bool) -> Path:
    with Chunks(folder, ledger, configured, workers) as chunks:
        chunks.update(read_ledger)
        totals = chunks.totals
        first = _first_summary(ledger, totals)
        page = page_data(ledger, first, chunks.methods, chunks.labels, totals)
        keys = ("title", "methods", "labels", "page_size", "counts", "classes", "unexplained")
        chunks.finish({k: page[k] for k in keys})
        for name in ASSETS:
            asset, path = (STATIC / name).read_bytes(), folder / "assets" / name
            if not path.is_file() or path.read_bytes() != asset:
                write_atomic(path, asset)
        html = (
            environment()
            .get_template("index.html.j2")
            .render(page=page, facts=run_facts(ledger, first, totals))
        )
        write_atomic(folder / "index.html", html.encode())
        chunks.prune()
    return folder / "index.html"


SUMMARY_FACTS = ("model", "target_layer", "layout", "guarantee")  # in run.json, else in every summary


def _first_summary(ledger: Ledger, totals: Totals) -> dict[str, Any]:
    """The first input's summary, when run.json lacks facts that it holds (a run that did not finish)."""
    if totals.first_summary is None or all(ledger.info.get(fact) is not None for fact in SUMMARY_FACTS):
        return {}
    return read_summary(ledger.root, totals.first_summary)[0] or {}


def page_data(
    ledger: Ledger, first: dict[str, Any], methods: list[str], labels: list[str], totals: Totals
) -> dict[str, Any]:
    """What index.html is built from (index.js holds the facts report.js needs)."""
    classes = [(labels[i], count) for i, count in totals.labels.items() if count]
    return {
        "title": str(ledger.info.get("model") or first.get("model") or "run"),
        "methods": [[m, method_name(m)] for m in methods],
        "labels": labels,
        "page_size": PAGE_SIZE,
        "inputs": totals.inputs,
        "counts": totals.counts,
        "classes": sorted(classes, key=lambda kv: (-kv[1], kv[0])),
        "unexplained": totals.unexplained,
        "first": [{**record, "i": i, "s": status} for i, status, record in totals.first],
    }


def run_facts(ledger: Ledger, first: dict[str, Any], totals: Totals) -> dict[str, Any]:
    """The header: (label, text) facts, the effective config as JSON, and notes about the run's files."""
    info = ledger.info
    facts = [
        ("Model", info.get("model") or first.get("model")),
        ("Target layer", info.get("target_layer") or first.get("target_layer")),
    ]
    layout = info.get("layout") or first.get("layout")
    if isinstance(layout, dict):
        text = str(layout.get("kind", "?"))
        if layout.get("grid"):
            text += ", grid " + " \N{MULTIPLICATION SIGN} ".join(map(str, layout["grid"]))
        if layout.get("prefix_tokens"):
            text += f", {layout['prefix_tokens']} prefix tokens"
        facts.append(("Layout", text))
    guarantee = (
        info["guarantee"]
        if "guarantee" in info
        else next((t.get("guarantee") for t in first.get("targets", [])), None)
    )
    facts.append(("Guarantee", _guarantee(guarantee)))
    if "identical_by_construction" in info and info["identical_by_construction"] is not None:
        same = info["identical_by_construction"]
        facts.append(("HiResCAM = Grad-CAM", "yes, by construction" if same else "no"))
    facts.append(("Device", info.get("device")))
    counts = info.get("counts")
    if isinstance(counts, dict):
        parts = [f"{counts.get(k, 0)} {k}" for k in ("ok", "skipped", "error")]
        if counts.get("not_reached"):
            parts.append(f"{counts['not_reached']} not reached")
        facts.append(("Inputs", f"{counts.get('inputs', totals.inputs)}: " + ", ".join(parts)))
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
        "notes": ledger.notes,
        "failures": totals.failures,
        "failures_total": totals.failures_total,
    }


def _guarantee(value: Any) -> str:
    if value is True:
        return "holds: the head is affine, so HiResCAM sums to logit - bias"
    if value is False:
        return "does not hold: the head after the layer is not affine"
    return "unknown (no image was explained)"
