"""Reads a T5 relative attention bias found by the score-bias classifier (`detect_other.score_biases`):
a Gather from a [num_buckets, num_heads] table by buckets computed with a Log. The buckets are evaluated on
a probe long enough to see them saturate and fitted to T5's rule (`math.absolute.fit_t5_buckets`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from posrewrite.math.absolute import fit_t5_buckets
from posrewrite.passes.onnx._graph import dtype_name
from posrewrite.passes.onnx.detect_other import BiasGroup, DetectionContext, cone_ops, make_probe
from posrewrite.sites.base import Refusal
from posrewrite.sites.t5 import T5BiasSite

__all__ = ["t5_site", "T5_PROBE_LENGTH"]

T5_PROBE_LENGTH = 512  # long enough to see T5 buckets saturate (max_distance 128 by default)


def t5_site(ctx: DetectionContext, group: BiasGroup) -> T5BiasSite | Refusal | None:
    """The T5 site of a bucket-table Gather added to attention scores, a refusal when the buckets do not
    follow T5's rule, or None when they are not computed with a Log (no T5 bucketing)."""
    gather: ir.Node = group.leaf
    table, buckets = gather.inputs[0], gather.inputs[1]
    ops, _, _ = cone_ops(buckets)
    if "Log" not in ops:
        return None
    nb, heads = (int(d) for d in table.shape)
    vals = make_probe(ctx.model, T5_PROBE_LENGTH)(buckets)
    if vals is None or vals.ndim < 2 or vals.shape[-1] != vals.shape[-2]:
        return Refusal("t5_relative_bias", gather.name or table.name, "bucket computation could not be evaluated")
    n = vals.shape[-1]
    rel = np.arange(n)[None, :] - np.arange(n)[:, None]
    fit = fit_t5_buckets(rel, vals.reshape(-1, n, n)[0], nb)
    if fit is None:
        return Refusal("t5_relative_bias", gather.name or table.name, "buckets do not follow T5's rule")
    notes = ["distances past max_distance share the last bucket: runs at any length"]
    if not fit["saturated"]:
        notes.append(f"max_distance is at least {fit['max_distance']} (not reached on a {n}-token probe)")
    return T5BiasSite(
        num_buckets=nb,
        max_distance=fit["max_distance"],
        bidirectional=fit["bidirectional"],
        num_heads=heads,
        dtype=dtype_name(table),
        table=table,
        gather=gather,
        buckets=buckets,
        notes=tuple(notes),
    )
