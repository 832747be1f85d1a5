"""Absolute position encodings: learned tables read by position and fixed sinusoids (a constant table or
computed in the graph).

Like `RopeSite`, each description keeps references to the `onnx_ir` values and nodes it was found on, so
the passes in `posrewrite/passes/onnx/absolute/` act on exactly those.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from posrewrite.sites.base import EncodingSite

__all__ = ["LearnedAbsoluteSite", "SinusoidalSite"]


@dataclasses.dataclass(frozen=True)
class LearnedAbsoluteSite(EncodingSite):
    """A learned position table [offset + max_positions, dim] read by position (GPT-2, OPT, BERT, BART...).

    `offset` is the row that position 0 reads (OPT and BART 2, RoBERTa padding_idx + 1); rows below it
    (padding rows) are kept as they are by every rewrite.
    """

    kind: ClassVar[str] = "learned_absolute"

    rows: int  # rows of the table, offset rows included
    dim: int
    offset: int
    positions: str  # "range" | "mask_cumsum" | "constant" (a sliced arange buffer, BERT) | "input"
    dtype: str
    table: ir.Value  # the initializer
    reads: tuple[ir.Node, ...]  # Gather (or Slice) nodes reading the table by position
    indices: tuple[ir.Value, ...]  # their position operands (Gather) or None-free Slice inputs
    position_buffer: ir.Value | None = None  # "constant": the arange initializer the positions are sliced from
    notes: tuple[str, ...] = ()

    @property
    def max_positions(self) -> int:
        return self.rows - self.offset

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "max_positions": self.max_positions,
            "dim": self.dim,
            "offset": self.offset,
            "rows": self.rows,
            "positions": self.positions,
            "dtype": self.dtype,
            "table": self.table.name,
            "reads": [n.name for n in self.reads],
            "notes": list(self.notes),
        }


@dataclasses.dataclass(frozen=True)
class SinusoidalSite(EncodingSite):
    """Fixed sin/cos position encodings (Vaswani et al.), as a constant table or computed in the graph.

    `layout` "interleaved" puts sin at even and cos at odd channels, "concat" puts all sines first
    (fairseq, Marian, M2M100, Whisper). `frequency_rule` says how frequencies fall with the channel index
    i: "vaswani" base^(-2i/dim), "fairseq" base^(-i/(dim/2 - 1)), "custom" anything else (kept as found).
    """

    kind: ClassVar[str] = "sinusoidal"

    max_positions: int | None  # rows (offset included) of a constant table, None when computed
    dim: int
    base: float | None
    layout: str
    frequency_rule: str
    frequencies: np.ndarray  # float64 [dim/2]
    offset: int  # row read by position 0
    source: str  # "constant" | "computed"
    positions: str
    dtype: str
    table: ir.Value | None = None
    reads: tuple[ir.Node, ...] = ()  # constant: Gather/Slice nodes reading the table
    position_buffer: ir.Value | None = None
    positions_value: ir.Value | None = None  # computed: positions entering the product
    sin: ir.Value | None = None  # computed: the Sin/Cos outputs
    cos: ir.Value | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "max_positions": self.max_positions,
            "dim": self.dim,
            "base": None if self.base is None else float(self.base),
            "layout": self.layout,
            "frequency_rule": self.frequency_rule,
            "offset": self.offset,
            "source": self.source,
            "positions": self.positions,
            "dtype": self.dtype,
            "table": getattr(self.table, "name", None),
            "notes": list(self.notes),
        }
