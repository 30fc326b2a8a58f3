"""The numbers of a comparison: per matched input, the prediction change and, per class explained on both
sides and per method, how far the two maps agree on a common footing (the modality's geometry); then the
aggregates over inputs. Torch-free: the maps come from the summaries (or the --save-raw arrays)."""

import base64
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from ..formats import picture_of
from ..report.run_files import Entry
from .sides import Matching, Side

TOP_FRACTION = 0.2  # the "top region" of a map for IoU
GRID_POSITIONS = 1024  # what summary.py keeps (a torch-free copy: compare never imports torch)


def _g(value: float | None) -> float | None:
    """A float at float32's precision for stable JSON; NaN and None become None."""
    return None if value is None or not math.isfinite(value) else float(f"{value:.7g}")


def normalized(values: np.ndarray) -> np.ndarray:
    """ReLU then min-max to [0, 1], as the pictures show a map; a map with no positive part is all 0."""
    positive = np.maximum(values, 0.0)
    low, high = positive.min(), positive.max()
    return (positive - low) / (high - low) if high > low else np.zeros_like(positive)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two samples; where a map is constant: 1 when both are (equal pictures), else 0.
    Element-wise sums, not BLAS: a threaded dot product of this size only waits for its threads."""
    a, b = a - a.mean(), b - b.mean()
    norms = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if norms == 0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return min(1.0, max(-1.0, float((a * b).sum()) / norms))


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """The k positions of the highest values, ties taken in sample order (a stable sort's first k)."""
    kth = np.partition(values, values.size - k)[values.size - k]
    region = values > kth
    region[np.flatnonzero(values == kth)[: k - int(region.sum())]] = True
    return region


def top_region_iou(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """IoU of the `fraction` of samples where each map is highest (ties in sample order)."""
    k = max(1, math.ceil(fraction * a.size))
    ta, tb = _top(a, k), _top(b, k)
    return float((ta & tb).sum() / (ta | tb).sum())


def grid_map(root: Path, summary: dict[str, Any], entry: dict[str, Any]) -> np.ndarray | str:
    """A method's map (`entry`, of `summary`) over its grid, from the summary's `grid`, else its --save-raw
    array; or why there is none."""
    grid = entry.get("grid")
    if isinstance(grid, dict):
        try:
            values = np.frombuffer(base64.b64decode(grid["float16"], validate=True), "<f2")
            return values.astype(np.float64).reshape(grid["shape"]) * float(grid["scale"])
        except (KeyError, TypeError, ValueError) as e:
            return f"its summary's grid map is unreadable ({e})"
    if entry.get("raw"):
        try:
            return np.load(root / entry["raw"], allow_pickle=False).astype(np.float64)
        except (OSError, ValueError) as e:
            return f"its raw map {entry['raw']} is unreadable ({' '.join(str(e).split())})"
    grid = (summary.get("layout") or {}).get("grid") or []
    if math.prod(grid) > GRID_POSITIONS:
        return (
            f"its grid of {math.prod(grid):,} positions is too large for a summary: explain with --save-raw"
        )
    return "its summary was written before summaries kept maps: rerun `hirescam explain` with --overwrite"


def _prediction(summary: dict[str, Any]) -> dict[str, Any]:
    predictions = summary.get("predictions") or []
    top = predictions[0] if predictions else {}
    return {
        "top1": {k: top.get(k) for k in ("class", "label", "probability")},
        "top5": [p.get("class") for p in predictions[:5]],
    }


def _probability(summary: dict[str, Any], cls: int) -> float | None:
    """A class's probability on one side: from its targets, else its top-5 predictions (else unknown)."""
    for item in (*summary.get("targets", ()), *summary.get("predictions", ())):
        if item.get("class") == cls:
            return item.get("probability")
    return None


def _side_of(target: dict[str, Any]) -> dict[str, Any]:
    return {k: target.get(k) for k in ("probability", "logit", "completeness_gap", "guarantee")}


def compare_input(base: Side, new: Side, pair: tuple[Entry, Entry], geometry, methods: list[str]) -> dict:
    """The row of one matched input (docs/compare.md lists its fields); `geometry` is the modality's."""
    entry, other = pair
    bs, ns = entry.summary, other.summary
    b_targets = {t["class"]: t for t in bs.get("targets", [])}
    n_targets = {t["class"]: t for t in ns.get("targets", [])}
    row: dict[str, Any] = {"index": entry.index, "key": entry.name, "input": entry.input}
    row["base"], row["new"] = _prediction(bs), _prediction(ns)
    row["top1_changed"] = row["base"]["top1"]["class"] != row["new"]["top1"]["class"]
    row["top5_changed"] = set(row["base"]["top5"]) != set(row["new"]["top5"])
    common = [c for c in b_targets if c in n_targets]
    problems, where = [], None
    if not common:
        problems.append("no class is explained on both sides")
    else:
        try:
            where = geometry.footing(bs, ns)
            if where is None:
                problems.append(
                    "the two runs' maps cover no common part of the input (their crops do not meet)"
                )
        except ValueError as e:
            problems.append(f"no common footing: {e}")
    sides = (base.root, bs), (new.root, ns)
    row["classes"] = [
        _class_record(b_targets[c], n_targets[c], sides, where, geometry, methods) for c in common
    ]
    row["only_base_classes"] = [
        {"class": c, "label": t.get("label"), "new_probability": _probability(ns, c)}
        for c, t in b_targets.items()
        if c not in n_targets
    ]
    row["only_new_classes"] = [
        {"class": c, "label": t.get("label"), "base_probability": _probability(bs, c)}
        for c, t in n_targets.items()
        if c not in b_targets
    ]
    found = {m["problem"] for c in row["classes"] for m in c["maps"].values() if "problem" in m}
    row["problems"] = problems + sorted(found)
    row["agreement"] = input_agreement(row, "hirescam" if "hirescam" in methods else methods[0])
    return row


def _class_record(bt: dict, nt: dict, sides, where, geometry, methods: list[str]) -> dict[str, Any]:
    """One class explained on both sides: both sides' numbers, and per method how far the maps agree."""
    (b_root, bs), (n_root, ns) = sides
    record = {"class": bt["class"], "label": bt.get("label", str(bt["class"]))}
    record["base"], record["new"] = _side_of(bt), _side_of(nt)
    pb, pn = bt.get("probability"), nt.get("probability")
    record["probability_change"] = _g(pn - pb) if None not in (pb, pn) else None
    record["maps"] = {}
    for method in methods:
        bm, nm = bt.get("maps", {}).get(method), nt.get("maps", {}).get(method)
        if bm is None or nm is None:
            continue
        cell = {"pearson": None, "top20_iou": None, "peak_distance": None}
        if bm.get("peak") and nm.get("peak"):
            cell["peak_distance"] = _g(geometry.peak_distance(bs, bm["peak"], ns, nm["peak"]))
        if where is not None:
            maps = grid_map(b_root, bs, bm), grid_map(n_root, ns, nm)
            missing = [
                f"{side}: {m}" for side, m in zip(("BASE", "NEW"), maps, strict=True) if isinstance(m, str)
            ]
            if missing:
                cell["problem"] = "; ".join(missing)
            else:
                # the pictures: normalised on the grid, then registered (as the overlays are drawn)
                pictures = [where.sample(side, normalized(values)) for side, values in enumerate(maps)]
                cell["pearson"] = _g(pearson(*pictures))
                raw = [where.sample(side, values) for side, values in enumerate(maps)]
                cell["top20_iou"] = _g(top_region_iou(*raw))
        cell |= {"base_png": picture_of(bm), "new_png": picture_of(nm)}
        record["maps"][method] = cell
    return record


def input_agreement(row: dict[str, Any], method: str) -> float | None:
    """An input's agreement: the lowest Pearson r of `method` over its classes explained on both sides
    (None when none has two maps to compare)."""
    values = [c["maps"][method]["pearson"] for c in row["classes"] if method in c["maps"]]
    return None if not values or None in values else min(values)


def stats(values: list[float | None]) -> dict[str, Any]:
    """median, mean, min, max and n of the values that are numbers."""
    numbers = [v for v in values if v is not None]
    if not numbers:
        return {"median": None, "mean": None, "min": None, "max": None, "n": 0}
    return {
        "median": _g(statistics.median(numbers)),
        "mean": _g(statistics.fmean(numbers)),
        "min": _g(min(numbers)),
        "max": _g(max(numbers)),
        "n": len(numbers),
    }


def aggregates(base: Side, new: Side, matching: Matching, rows: list[dict], methods: list[str]) -> dict:
    """The comparison's totals: inputs, prediction changes, each method's agreement over (input, class)."""
    compared = len(rows)

    def share(count: int) -> dict[str, Any]:
        return {"count": count, "fraction": _g(count / compared) if compared else None}

    classes = [c for row in rows for c in row["classes"]]
    changes = [abs(c["probability_change"]) for c in classes if c["probability_change"] is not None]
    return {
        "inputs": {
            "base": len(base.by_key) + len(base.failed),
            "new": len(new.by_key) + len(new.failed),
            "compared": compared,
            "only_base": len(matching.only_base),
            "only_new": len(matching.only_new),
            "bytes_differ": len(matching.bytes_differ),
            "failed": len(matching.failed),
        },
        "top1_changed": share(sum(row["top1_changed"] for row in rows)),
        "top5_changed": share(sum(row["top5_changed"] for row in rows)),
        "no_common_class": sum(not row["classes"] for row in rows),
        "classes_compared": len(classes),
        "agreement": {
            **stats([row["agreement"] for row in rows]),
            "not_measured": sum(bool(row["classes"]) and row["agreement"] is None for row in rows),
        },
        "probability_change": {
            "mean_abs": _g(statistics.fmean(changes)) if changes else None,
            "max_abs": _g(max(changes)) if changes else None,
            "n": len(changes),
        },
        "methods": {
            method: {
                metric: stats([c["maps"][method][metric] for c in classes if method in c["maps"]])
                for metric in ("pearson", "top20_iou", "peak_distance")
            }
            for method in methods
        },
    }
