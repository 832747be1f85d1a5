"""The validation report: its rows (one typed `Check` per check) and notes, and the order of rows from worst to best.

A row is one of five kinds (a tagged union: the class is the tag), each with the fields it really has:

- `ModelCheck`: the original and the rewritten model (or their cuts) on the same inputs, or the fused model one
  position past its caches (site "model", "model inside the window", "past cache");
- `RunCheck`: the rewritten model (or its cut) runs at a length and gives no NaN or +inf (site "model");
- `RotationCount`: the q/k rotations found in the rewritten model against those of the original (site "rotations");
- `RotationCheck`: the worst rotation of one site (or of the GroupQueryAttention nodes, site "0") at one length
  against the numpy rotation, with how many rotations it stands for;
- `GridCheck`: a 2-D RoPE's angles re-fitted in the rewritten model against the planned ones (site: the plan's
  index).

`to_dict` writes what ``--json`` shows: the keys every row has (site, length, max_abs_error, tolerance, ok) and
the optional ones it holds, in the order each kind has always written them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

__all__ = [
    "Check",
    "GridCheck",
    "ModelCheck",
    "RotationCheck",
    "RotationCount",
    "RunCheck",
    "ValidationReport",
    "describe_failure",
    "worse",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Check:
    """One row of a validation report. ``compared`` says what was compared with what, ``max_abs_error`` and
    ``tolerance`` the error and its bound (None where the check is not a comparison of numbers),
    ``tolerance_from`` where the bound comes from, ``message`` a remark or why the check failed or was skipped."""

    #: the JSON keys in the order ``--json`` writes them (the optional ones only when set)
    KEYS: ClassVar[tuple[str, ...]] = ("site", "length", "max_abs_error", "tolerance", "ok", "compared",
                                       "tolerance_from", "message")
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"compared", "tolerance_from", "message"})

    site: str | int
    length: int | None
    ok: bool
    max_abs_error: float | None = None
    tolerance: float | None = None
    compared: str | None = None
    tolerance_from: str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.KEYS if k not in self.OPTIONAL or getattr(self, k) is not None}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelCheck(Check):
    """The original and the rewritten model (or their cuts) compared on the same inputs, every floating output
    within `output_tolerance` (the worst output relative to its bound is shown); or the probe one position past
    fused caches, which onnxruntime must reject."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunCheck(Check):
    """The rewritten model (or its cut) runs at ``length`` positions and gives no NaN or +inf."""

    KEYS: ClassVar[tuple[str, ...]] = ("site", "length", "max_abs_error", "tolerance", "ok", "message", "compared")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RotationCount(Check):
    """Every q/k rotation of the original's RoPE sites is found in the rewritten model (``message``: the later
    layers' rotations left to ``--validate full``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RotationCheck(Check):
    """A rotation of the rewritten model (``rotation``: its output value or node) against the numpy rotation of
    its own pre-rotation q/k; in a report, the worst of ``rotations_checked`` rotations of one site at one
    length."""

    KEYS: ClassVar[tuple[str, ...]] = ("site", "rotation", "length", "max_abs_error", "tolerance", "ok", "compared",
                                       "tolerance_from", "message", "rotations_checked")
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"compared", "tolerance_from", "message", "rotations_checked"})

    rotation: str
    rotations_checked: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class GridCheck(Check):
    """A 2-D RoPE plan against the rewritten model: the angle slopes re-fitted by probing vs the original's times
    the planned ratios, and the planned attention factor (``site``: the plan's index)."""

    KEYS: ClassVar[tuple[str, ...]] = ("site", "length", "tolerance", "max_abs_error", "compared", "ok", "message")
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"message"})


@dataclasses.dataclass
class ValidationReport:
    rows: list[Check] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    scope: str = "full"  # "bounded": model-level checks ran on a cut (posrewrite.cut), see docs/validation.md

    @property
    def ok(self) -> bool:
        """Every row holds."""
        return all(r.ok for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "scope": self.scope, "rows": [r.to_dict() for r in self.rows], "notes": self.notes,
                "seconds": round(self.seconds, 3)}


def describe_failure(report: ValidationReport) -> str:
    """One line for the first failed row: what was compared, the error and its bound, or the message."""
    row = next(r for r in report.rows if not r.ok)
    rotation = getattr(row, "rotation", None)
    where = f"site {row.site}" + (f" ({rotation})" if rotation else "")
    where += f" at {row.length} tokens" if row.length is not None else ""
    what = row.compared if row.compared is not None else ""
    if row.max_abs_error is not None and row.tolerance is not None:
        detail = f"max |error| {row.max_abs_error:.3g} > tolerance {row.tolerance:.3g}"
    else:
        detail = row.message if row.message is not None else "failed"
    text = f"{where}: {what}: {detail}" if what else f"{where}: {detail}"
    return " ".join(text.split())


def worse(a: Check, b: Check) -> bool:
    """``a`` is a worse result than ``b``: failed where ``b`` holds, else no error where ``b`` has one, else a
    larger error relative to its tolerance."""
    if a.ok != b.ok:
        return not a.ok
    if a.max_abs_error is None or b.max_abs_error is None:
        return a.max_abs_error is None
    return a.max_abs_error / (a.tolerance or 1.0) > b.max_abs_error / (b.tolerance or 1.0)
