"""The validation report: its rows (one per check) and notes, and the order of rows from worst to best."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["ValidationReport", "describe_failure", "worse"]


@dataclasses.dataclass
class ValidationReport:
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    scope: str = "full"  # "bounded": model-level checks ran on a cut (posrewrite.cut), see docs/validation.md

    @property
    def ok(self) -> bool:
        """Every row holds."""
        return all(r["ok"] for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "scope": self.scope, "rows": self.rows, "notes": self.notes,
                "seconds": round(self.seconds, 3)}


def describe_failure(report: ValidationReport) -> str:
    """One line for the first failed row: what was compared, the error and its bound, or the message."""
    row = next(r for r in report.rows if not r["ok"])
    where = f"site {row['site']}" + (f" ({row['rotation']})" if row.get("rotation") else "")
    where += f" at {row['length']} tokens" if row.get("length") is not None else ""
    what = row.get("compared", "")
    if row.get("max_abs_error") is not None and row.get("tolerance") is not None:
        detail = f"max |error| {row['max_abs_error']:.3g} > tolerance {row['tolerance']:.3g}"
    else:
        detail = row.get("message", "failed")
    text = f"{where}: {what}: {detail}" if what else f"{where}: {detail}"
    return " ".join(text.split())


def worse(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["ok"] != b["ok"]:
        return not a["ok"]
    if a["max_abs_error"] is None or b["max_abs_error"] is None:
        return a["max_abs_error"] is None
    return a["max_abs_error"] / (a["tolerance"] or 1.0) > b["max_abs_error"] / (b["tolerance"] or 1.0)
