"""Descriptions of the positional encodings that are not RoPE: ALiBi, learned absolute tables, sinusoidal
tables and the T5 relative bias.

Like `RopeSite`, each description keeps references to the `onnx_ir` values and nodes it was found on, so
the passes in `posrewrite/passes/onnx/extend_tables.py` and `fp32_alibi.py` act on exactly those.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from posrewrite.sites.base import EncodingSite


def _name(value: ir.Value | None) -> str | None:
    return None if value is None else value.name


@dataclasses.dataclass(frozen=True)
class AlibiSite(EncodingSite):
    """ALiBi: a per-head linear bias slope_h * distance added to the attention scores.

    `source` is "computed" when slopes multiply distances inside the graph (Bloom, Falcon: distances from
    the attention-mask cumsum; others from a Range), "constant" when the export baked the whole bias as a
    table of the training length (MPT: [H, 1, L], sliced to the key length), which fails past L.
    """

    kind: ClassVar[str] = "alibi"

    num_heads: int
    slopes: np.ndarray  # float64 [num_heads], as found in the graph
    source: str  # "computed" | "constant"
    distances: str  # "mask_cumsum" | "range" | "table" | "input" | "unknown": how positions are formed
    form: str  # "absolute" (slope * key position), "relative" (slope * (j - i)), "anchored" (table, last key 0)
    position_dtype: str  # dtype of the distances entering the product ("int64" when a table is baked)
    compute_dtype: str  # dtype of the slope x distance product
    dtype: str  # dtype of the bias where it is added to the scores
    standard_slopes: bool  # equal to the paper's slopes for num_heads (alibi_bias_max 8)
    max_positions: int | None  # columns of a baked table, None when computed
    bias: ir.Value  # the bias as it leaves the encoding (before broadcasting to the scores)
    add_nodes: tuple[ir.Node, ...]  # the Adds of the bias to attention scores
    scores: tuple[ir.Value, ...]  # the score inputs of those Adds
    slopes_value: ir.Value | None = None  # computed: the slopes operand of the product
    distances_value: ir.Value | None = None  # computed: the distances operand (before any cast)
    product: ir.Node | None = None  # computed: the Mul of slopes and distances
    table: ir.Value | None = None  # constant: the baked bias initializer
    table_axis: int | None = None  # constant: the key axis of the table
    slices: tuple[ir.Node, ...] = ()  # constant: Slice nodes cutting the table to the runtime length
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_heads": self.num_heads,
            "slopes": [float(s) for s in self.slopes],
            "standard_slopes": self.standard_slopes,
            "source": self.source,
            "distances": self.distances,
            "form": self.form,
            "position_dtype": self.position_dtype,
            "compute_dtype": self.compute_dtype,
            "dtype": self.dtype,
            "max_positions": self.max_positions,
            "sites": len(self.add_nodes),
            "bias": self.bias.name,
            "table": _name(self.table),
            "slopes_value": _name(self.slopes_value),
            "notes": list(self.notes),
        }


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
            "table": _name(self.table),
            "notes": list(self.notes),
        }


@dataclasses.dataclass(frozen=True)
class T5BiasSite(EncodingSite):
    """T5 relative attention bias: distances j - i bucketed (exact below num_buckets/2 per direction, then
    log-spaced up to max_distance) and looked up in a learned [num_buckets, num_heads] table."""

    kind: ClassVar[str] = "t5_relative_bias"

    num_buckets: int
    max_distance: int
    bidirectional: bool
    num_heads: int
    dtype: str
    table: ir.Value
    gather: ir.Node
    buckets: ir.Value
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_buckets": self.num_buckets,
            "max_distance": self.max_distance,
            "bidirectional": self.bidirectional,
            "num_heads": self.num_heads,
            "dtype": self.dtype,
            "table": self.table.name,
            "notes": list(self.notes),
        }


__all__ = ["AlibiSite", "LearnedAbsoluteSite", "SinusoidalSite", "T5BiasSite"]
