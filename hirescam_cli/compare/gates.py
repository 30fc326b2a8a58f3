"""The gates a CI job sets on a comparison: each either passes or fails with one line saying why."""

import statistics
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

GATED_METHOD = "hirescam"  # the agreement gates read HiResCAM's maps


@dataclass(frozen=True)
class Gates:
    """Thresholds (None: not gated). Agreement is an input's lowest HiResCAM Pearson r over its classes
    explained on both sides; changed is the share of compared inputs whose top-1 class changed."""

    min_agreement: float | None = None  # the median agreement over inputs must reach it
    max_changed: float | None = None  # the share of inputs whose top-1 class changed must not exceed it
    min_agreement_each: float | None = None  # every input's agreement must reach it

    def check_methods(self, methods: list[str]) -> None:
        """Refuse agreement gates on runs without HiResCAM maps (UsageError)."""
        asked = [
            f"--{n.replace('_', '-')}"
            for n in ("min_agreement", "min_agreement_each")
            if getattr(self, n) is not None
        ]
        if asked and GATED_METHOD not in methods:
            raise UsageError(
                f"{' and '.join(asked)} gate HiResCAM's maps, and the runs explain {', '.join(methods)}: "
                "explain both with hirescam among --methods"
            )

    def check(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each gate set: {gate, threshold, value, passed, line}, in the order of the flags' help."""
        results = []
        agreements = [row["agreement"] for row in rows if row["agreement"] is not None]
        if self.min_agreement is not None:
            value = statistics.median(agreements) if agreements else None
            line = (
                f"the median HiResCAM r is {value:.4f} over {len(agreements)} inputs"
                if value is not None
                else "no input has HiResCAM maps on both sides to compare"
            )
            results.append(
                _result(
                    "--min-agreement",
                    self.min_agreement,
                    value,
                    value is not None and value >= self.min_agreement,
                    line,
                )
            )
        if self.max_changed is not None:
            changed = sum(row["top1_changed"] for row in rows)
            value = changed / len(rows) if rows else None
            line = f"the top-1 class changed for {changed} of {len(rows)} inputs ({value:.4f})"
            results.append(
                _result(
                    "--max-changed",
                    self.max_changed,
                    value,
                    value is not None and value <= self.max_changed,
                    line,
                )
            )
        if self.min_agreement_each is not None:
            gated = [row for row in rows if row["classes"]]
            below = [
                row for row in gated if row["agreement"] is None or row["agreement"] < self.min_agreement_each
            ]
            worst = min(
                gated, key=lambda r: (r["agreement"] is not None, r["agreement"] or 0.0), default=None
            )
            value = None if worst is None else worst["agreement"]
            if not gated:
                line = "no input has a class explained on both sides"
            elif below:
                shown = "no maps to compare" if value is None else f"r {value:.4f}"
                line = f"{len(below)} of {len(gated)} inputs are below it (lowest: {worst['key']}, {shown})"
            else:
                line = f"every one of {len(gated)} inputs reaches it (lowest: {worst['key']}, r {value:.4f})"
            results.append(
                _result(
                    "--min-agreement-each", self.min_agreement_each, value, bool(gated) and not below, line
                )
            )
        return results


def _result(gate: str, threshold: float, value: float | None, passed: bool, line: str) -> dict[str, Any]:
    return {
        "gate": gate,
        "threshold": threshold,
        "value": None if value is None else float(f"{value:.7g}"),
        "passed": bool(passed),
        "line": f"{gate} {threshold:g}: {line}",
    }
