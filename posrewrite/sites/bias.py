"""A bias added to attention scores, described by what it computes (`posrewrite.math.bias`): its family
(ALiBi's line, KERPLE log / power, Sandwich, T5 buckets, or a learned network of the distance), the fitted
parameters per head, the mask folded into it, and whether an export baked it as a constant table.

Like `AlibiSite`, the description keeps references to the `onnx_ir` values and nodes it was found on, so the
rewrites in `posrewrite/passes/onnx/bias/` act on exactly those.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import onnx_ir as ir

from posrewrite.math.bias import MaskRule
from posrewrite.sites.base import EncodingSite

__all__ = ["ScoreBiasSite", "LEARNED_NETWORK", "BiasParam"]

#: a fitted parameter: a scalar (dim, base, num_buckets, bidirectional), per-head values, or a bucket table
BiasParam = float | int | bool | list[float] | list[list[float | None]]

LEARNED_NETWORK = "learned_network"  # the family of a bias computed by a network from the distance


@dataclasses.dataclass(frozen=True)
class ScoreBiasSite(EncodingSite):
    """b_h(i, j) added to the attention scores.

    `family`: one of `math.bias.FAMILIES`, or "learned_network" (a network of i - j: not rewritable).
    `form`: "relative" (a function of i - j; `symmetric` when of |i - j|, `two_sided` when keys after the
    query are seen) or "key_only" (linear in the key position j, plus a constant per query: Bloom's form).
    `source`: "computed" (from the runtime sequence) or "constant" (baked by the export at `max_positions`).
    """

    kind: ClassVar[str] = "score_bias"

    family: str
    form: str
    symmetric: bool
    two_sided: bool
    params: dict[str, BiasParam]
    residual: float
    tolerance: float
    num_heads: int
    mask: MaskRule
    source: str
    max_positions: int | None
    static_inputs: bool
    dtype: str
    bias: ir.Value  # the bias as it is added to the scores
    add_nodes: tuple[ir.Node, ...]
    scores: tuple[ir.Value, ...]
    bias_shape: tuple[int, ...]  # the probed shape of the bias (leading dims: 1s and heads)
    nodes: tuple[ir.Node, ...] = ()  # the nodes that compute the bias (a Cos of Sandwich is no RoPE)
    standard_slopes: bool | None = None  # linear: the paper's geometric slopes
    rewritable: bool = True
    reason: str | None = None  # why not rewritable
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "family": self.family,
            "form": self.form,
            "symmetric": self.symmetric,
            "two_sided": self.two_sided,
            "num_heads": self.num_heads,
            "params": self.params,
            "residual": self.residual,
            "tolerance": self.tolerance,
            "standard_slopes": self.standard_slopes,
            "mask": self.mask.to_dict(),  # value: a number, or "-inf"
            "source": self.source,
            "max_positions": self.max_positions,
            "static_inputs": self.static_inputs,
            "dtype": self.dtype,
            "rewritable": self.rewritable,
            "reason": self.reason,
            "bias_adds": len(self.add_nodes),  # where the bias is added to attention scores
            "bias": self.bias.name,
            "notes": list(self.notes),
        }
