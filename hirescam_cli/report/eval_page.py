"""OUT/eval.html: the eval report as one self-contained page (metrics, per-class tables, mean curves).

It renders whatever methods and metrics eval.json holds:
    methods:   {method: {metric: {mean, low, high, n}}}
    metrics:   {metric: {label, better: "higher" | "lower", space, reference}}   (optional; each key too)
    per_class: {label: {method: {metric: {mean, low, high, n}}}}    (optional)
    curves:    {method: {deletion: [...], insertion: [...]}}        (optional; fractions 0..1, evenly spaced)
    images, model, target_layer, problems
"""

import base64
import io
import math
from pathlib import Path
from typing import Any

from markupsafe import Markup

from ..outputs import OutputError, describe
from .site import STATIC, environment, fixed, method_name, write_atomic

KNOWN_METRICS = {  # the labels and directions of today's localisation metrics, when eval.json does not say
    "pointing_game": ("pointing game", "higher"),
    "relevance_mass_accuracy": ("relevance mass accuracy", "higher"),
    "relevance_rank_accuracy": ("relevance rank accuracy", "higher"),
    "roc_auc": ("ROC AUC against the mask", "higher"),
    "deletion_auc": ("deletion AUC", "lower"),
    "insertion_auc": ("insertion AUC", "higher"),
}
SPACES = {
    "original": "the original inputs",
    "input": "the model input",
    "layer grid": "the target layer's grid",
}


def write_eval_page(out: Path, report: dict[str, Any]) -> Path:
    """Write OUT/eval.html for an eval report (the dict written to eval.json); returns its path."""
    path = Path(out).absolute() / "eval.html"
    page = eval_page_data(report)
    html = (
        environment()
        .get_template("eval.html.j2")
        .render(
            page=page,
            css=Markup((STATIC / "report.css").read_text()),
            plot=curves_plot(report.get("curves") or {}),
        )
    )
    try:
        write_atomic(path, html.encode())
    except OSError as e:
        raise OutputError(f"cannot write {path}: {describe(e)}") from None
    return path


def metric_columns(report: dict[str, Any], tables: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Every metric in the report, in first-seen order, with its label, better direction, and (where
    eval.json says) the published notion it is and where it was computed."""
    declared = report.get("metrics") or {}
    keys = dict.fromkeys(declared)
    for table in tables:
        for metrics in table.values():
            keys.update(dict.fromkeys(metrics))
    columns = []
    for key in keys:
        label, better = KNOWN_METRICS.get(key, (key, ""))
        info = declared.get(key) or {}
        space = str(info.get("space", ""))
        columns.append(
            {
                "key": key,
                "label": str(info.get("label", label)),
                "better": info.get("better", better),
                "reference": str(info.get("reference", "")),
                "space": SPACES.get(space, space),
            }
        )
    return columns


def table_rows(table: dict[str, Any], columns: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Rows of one table: per method, a cell per column with its text and whether it is the best mean."""
    best = {}
    for column in columns:
        means = [_mean(metrics.get(column["key"])) for metrics in table.values()]
        finite = [m for m in means if m is not None]
        if finite and column["better"] in ("higher", "lower") and len(finite) > 1:
            best[column["key"]] = (max if column["better"] == "higher" else min)(finite)
    rows = []
    for method, metrics in table.items():
        cells = []
        for column in columns:
            value = metrics.get(column["key"]) or {}
            mean = _mean(value)
            text = fixed(mean, 3)
            if mean is not None and _finite(value.get("low")) and _finite(value.get("high")):
                text += f" [{fixed(value['low'], 3)}, {fixed(value['high'], 3)}]"
            cells.append(
                {
                    "text": text,
                    "n": value.get("n"),
                    "best": mean is not None and mean == best.get(column["key"]),
                }
            )
        rows.append({"method": method_name(method), "cells": cells})
    return rows


def eval_page_data(report: dict[str, Any]) -> dict[str, Any]:
    """Everything eval.html shows, as plain values."""
    methods = report.get("methods") or {}
    per_class = report.get("per_class") or {}
    columns = metric_columns(report, [methods, *per_class.values()])
    return {
        "images": report.get("images"),
        "model": report.get("model"),
        "target_layer": report.get("target_layer"),
        "columns": columns,
        "rows": table_rows(methods, columns),
        "per_class": [(label, table_rows(table, columns)) for label, table in per_class.items()],
        "curves": [
            (
                method_name(m),
                [
                    (kind, ", ".join(fixed(v, 3) for v in c.get(kind, [])))
                    for kind in ("deletion", "insertion")
                ],
            )
            for m, c in (report.get("curves") or {}).items()
        ],
        "problems": [str(p) for p in report.get("problems") or []],
    }


def curves_plot(curves: dict[str, dict[str, list[float]]]) -> str | None:
    """The mean deletion and insertion curves of every method side by side, as a PNG data URL."""
    if not any(c.get("deletion") or c.get("insertion") for c in curves.values()):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    titles = {"deletion": "Deletion (lower is better)", "insertion": "Insertion (higher is better)"}
    for axis, kind in zip(figure.subplots(1, 2, sharey=True), ("deletion", "insertion"), strict=True):
        for method, curve in curves.items():
            values = curve.get(kind) or []
            if values:
                fractions = [i / max(1, len(values) - 1) for i in range(len(values))]
                axis.plot(fractions, values, label=method_name(method), linewidth=1.6)
        axis.set(
            title=titles[kind],
            xlabel="fraction of pixels " + ("removed" if kind == "deletion" else "revealed"),
        )
        axis.grid(alpha=0.3)
    figure.axes[0].set_ylabel("mean class probability")
    figure.axes[1].legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _mean(value: Any) -> float | None:
    mean = (value or {}).get("mean") if isinstance(value, dict) else None
    return float(mean) if _finite(mean) else None
