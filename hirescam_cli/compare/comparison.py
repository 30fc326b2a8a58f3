"""A comparison of two runs as a whole: the matched inputs' rows, the aggregates, and compare.json."""

from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..errors import UsageError
from ..modalities import geometry
from .agreement import aggregates, compare_input
from .sides import Matching, Side, match

SCHEMA = "hirescam-cli/compare/1"
LISTED = 10_000  # inputs listed by name per kind of unmatched input in compare.json (all are counted)


@dataclass
class Comparison:
    """BASE and NEW, what matched, a row per compared input (BASE's input order) and the aggregates."""

    base: Side
    new: Side
    methods: list[str]
    matching: Matching
    rows: list[dict[str, Any]]
    aggregates: dict[str, Any]
    footing: str
    notes: list[str]

    @property
    def agreement_method(self) -> str:
        """The method an input's `agreement` is read from: HiResCAM when the runs have it."""
        return "hirescam" if "hirescam" in self.methods else self.methods[0]


def compare_sides(base: Side, new: Side, notes: list[str]) -> Comparison:
    """Match and compare two comparable sides; UsageError when they have no input in common."""
    matching = match(base, new)
    if not matching.pairs:
        differ = (
            f", {len(matching.bytes_differ)} with the same key but other bytes"
            if matching.bytes_differ
            else ""
        )
        raise UsageError(
            f"BASE and NEW have no input in common (same key and sha256): {len(base.by_key)} and "
            f"{len(new.by_key)} explained inputs{differ}; explain the same inputs on both sides"
        )
    methods = list(base.methods)
    kind = geometry(base.kind)
    rows = [compare_input(base, new, pair, kind, methods) for pair in matching.pairs]
    totals = aggregates(base, new, matching, rows, methods)
    return Comparison(base, new, methods, matching, rows, totals, kind.FOOTING, notes)


def least_agreeing_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with no agreement to measure first (no common class or no maps), then by ascending agreement,
    then in input order: the order the page and the summary list inputs in."""
    return sorted(rows, key=lambda r: (r["agreement"] is not None, r["agreement"] or 0.0, r["index"]))


def _side_json(side: Side) -> dict[str, Any]:
    layout = side.fact("layout") or {}
    return {
        "out": str(side.root),
        "model": side.fact("model"),
        "target_layer": side.fact("target_layer"),
        "grid": layout.get("grid"),
        "guarantee": side.info.get("guarantee"),
        "version": side.info.get("version"),
        "random_weights": side.info.get("random_weights"),
        "methods": side.methods,
        "kind": side.kind,
    }


def to_json(comparison: Comparison, gates: list[dict[str, Any]], thresholds: dict[str, Any]) -> dict:
    """compare.json (docs/compare.md describes every field)."""
    matching = comparison.matching
    return {
        "schema": SCHEMA,
        "version": __version__,
        "base": _side_json(comparison.base),
        "new": _side_json(comparison.new),
        "methods": comparison.methods,
        "agreement_method": comparison.agreement_method,
        "footing": comparison.footing,
        "thresholds": thresholds,
        "gates": gates,
        "passed": all(g["passed"] for g in gates),
        "aggregates": comparison.aggregates,
        "notes": comparison.notes,
        "not_compared": {
            "only_base": matching.only_base[:LISTED],
            "only_new": matching.only_new[:LISTED],
            "bytes_differ": matching.bytes_differ[:LISTED],
            "failed": matching.failed[:LISTED],
        },
        "inputs": comparison.rows,
    }
