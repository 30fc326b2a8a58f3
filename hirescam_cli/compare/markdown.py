"""The comparison as Markdown: what stdout shows and a CI job's step summary ($GITHUB_STEP_SUMMARY) gets."""

import re
from typing import Any

from ..report.site import fixed, method_name
from .comparison import Comparison, least_agreeing_first

DASH = "\N{EN DASH}"
LEAST_AGREEING = 10  # inputs listed in the summary, least agreeing first

_SPECIAL = re.compile(r"([\\`*_\[\]|~])")  # what can start Markdown inside a table cell


def text(value: Any) -> str:
    """Any text from the runs, safe in a Markdown table cell: one line, Markdown and HTML escaped."""
    line = " ".join(str(value).split())
    line = line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _SPECIAL.sub(r"\\\1", line)


def code(value: Any) -> str:
    """A name from the runs (a key, a label, a model) as a Markdown code span: shown literally, one line,
    safe in a table cell."""
    line = " ".join(str(value).split()).replace("|", "\\|")
    if not line:
        return DASH
    fence = "`" * (max(map(len, re.findall("`+", line)), default=0) + 1)
    pad = " " if line[0] == "`" or line[-1] == "`" else ""
    return f"{fence}{pad}{line}{pad}{fence}"


def _percent(fraction: float | None) -> str:
    return "\N{EN DASH}" if fraction is None else f"{100 * fraction:.1f}%"


def _prediction(side: dict[str, Any]) -> str:
    top = side["top1"]
    return f"{code(top.get('label', top.get('class')))} ({fixed(top.get('probability'), 3)})"


def _grid(side) -> str:
    grid = (side.fact("layout") or {}).get("grid") or []
    return " \N{MULTIPLICATION SIGN} ".join(map(str, grid)) or DASH


def markdown(comparison: Comparison, gates: list[dict[str, Any]]) -> str:
    """The summary: verdict, the two runs, prediction changes, agreement per method, the gates, and the
    least agreeing inputs."""
    base, new, totals = comparison.base, comparison.new, comparison.aggregates
    failed = [g for g in gates if not g["passed"]]
    verdict = f"**{len(failed)} of {len(gates)} gates failed**" if failed else "**all gates passed**"
    lines = [f"## HiResCAM compare: {verdict if gates else 'no gate set'}", ""]
    lines += ["| | BASE | NEW |", "|---|---|---|"]
    for label, value in (
        ("folder", lambda s: code(s.path)),
        ("model", lambda s: code(s.fact("model") or "")),
        ("target layer", lambda s: code(s.fact("target_layer") or "")),
        ("grid", _grid),
        ("hirescam-cli", lambda s: text(s.info.get("version") or DASH)),
    ):
        lines.append(f"| {label} | {value(base)} | {value(new)} |")
    inputs = totals["inputs"]
    others = [
        f"{inputs[k]} {what}"
        for k, what in (
            ("only_base", "only in BASE"),
            ("only_new", "only in NEW"),
            ("bytes_differ", "with other bytes"),
            ("failed", "failed on a side"),
        )
        if inputs[k]
    ]
    top1, top5 = totals["top1_changed"], totals["top5_changed"]
    change, agreement = totals["probability_change"], totals["agreement"]
    name = method_name(comparison.agreement_method)
    lines += [
        "",
        f"**{inputs['compared']} inputs compared**"
        + (f" (not compared: {', '.join(others)})" if others else "")
        + f". Top-1 class changed: **{top1['count']}** ({_percent(top1['fraction'])}); "
        f"top-5 set changed: {top5['count']} ({_percent(top5['fraction'])}); "
        f"mean \\|Δp\\| of the classes explained on both sides: {fixed(change['mean_abs'], 3)}. "
        f"Agreement ({name} r, an input's lowest over its classes explained on both sides): "
        f"median **{fixed(agreement['median'], 3)}**, lowest {fixed(agreement['min'], 3)}, "
        f"over {agreement['n']} inputs"
        + (f" ({agreement['not_measured']} without maps to compare)" if agreement["not_measured"] else "")
        + (
            f"; {totals['no_common_class']} with no class explained on both sides"
            if totals["no_common_class"]
            else ""
        )
        + ".",
        "",
        "| method | median r | lowest r | median top-20% IoU | median peak distance (px) | classes |",
        "|---|---|---|---|---|---|",
    ]
    for method, numbers in totals["methods"].items():
        r, iou, peak = numbers["pearson"], numbers["top20_iou"], numbers["peak_distance"]
        lines.append(
            f"| {method_name(method)} | {fixed(r['median'], 3)} | {fixed(r['min'], 3)} | "
            f"{fixed(iou['median'], 3)} | {fixed(peak['median'], 1)} | {r['n']} |"
        )
    if gates:
        lines += ["", "| gate | threshold | value | result |", "|---|---|---|---|"]
        for g in gates:
            value = DASH if g["value"] is None else f"{g['value']:.4f}"
            result = "pass" if g["passed"] else "**FAIL**"
            lines.append(f"| `{g['gate']}` | {g['threshold']:g} | {value} | {result} |")
    lines += [
        "",
        f"Least agreeing inputs ({name} r, lowest over the classes explained on both sides):",
        "",
        f"| input | top-1 BASE → NEW | {name} r | top-20% IoU | peak distance (px) |",
        "|---|---|---|---|---|",
    ]
    for row in least_agreeing_first(comparison.rows)[:LEAST_AGREEING]:
        cells = [c["maps"].get(comparison.agreement_method) or {} for c in row["classes"]]
        iou = min((c["top20_iou"] for c in cells if c.get("top20_iou") is not None), default=None)
        peak = max((c["peak_distance"] for c in cells if c.get("peak_distance") is not None), default=None)
        r = fixed(row["agreement"], 3) if row["agreement"] is not None else text("; ".join(row["problems"]))
        after = _prediction(row["new"])
        if row["top1_changed"]:
            after = f"**{after}**"
        lines.append(
            f"| {code(row['key'])} | {_prediction(row['base'])} → {after} | {r or DASH} | {fixed(iou, 2)} | "
            f"{fixed(peak, 1)} |"
        )
    lines += [f"\nNote: {text(note)}" for note in comparison.notes]
    return "\n".join(lines) + "\n"
