"""ALiBi: a per-head linear bias added to the attention scores, computed in the graph or baked as a table.

Like `RopeSite`, the description keeps references to the `onnx_ir` values and nodes it was found on, so the
passes in `posrewrite/passes/onnx/alibi/` act on exactly those.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from posrewrite.sites.base import EncodingSite

__all__ = ["AlibiSite"]


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
            "bias_adds": len(self.add_nodes),  # where the bias is added to attention scores
            "bias": self.bias.name,
            "table": getattr(self.table, "name", None),
            "slopes_value": getattr(self.slopes_value, "name", None),
            "notes": list(self.notes),
        }
