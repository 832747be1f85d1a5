"""Reads an ALiBi bias found by the score-bias classifier (`detect_other.score_biases`).

Computed: slopes (constant, one per head, in (0, 1]) multiply distances; the probe input (see
`detect_other.py`) tells key positions 0, 1, 2... ("absolute") from j - i ("relative") however an exporter
spelled them. Baked: a constant [heads, ..., keys] table fitted per head by a line (`math.alibi`), 0 at the
last key ("anchored") or at the first ("absolute").
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from posrewrite.math.alibi import fit_linear_bias, is_standard_slopes
from posrewrite.passes.onnx._graph import dtype_name, trace_through
from posrewrite.passes.onnx.detect_other import (
    BiasGroup,
    DetectionContext,
    position_source,
    slopes_side,
)
from posrewrite.sites.alibi import AlibiSite
from posrewrite.sites.base import Refusal

__all__ = ["alibi_site"]


def alibi_site(ctx: DetectionContext, group: BiasGroup) -> AlibiSite | Refusal | None:
    """The ALiBi site of a slopes x distances product or a constant bias table added to attention scores,
    a refusal when it does not fit, or None when a constant is no position bias at all."""
    bias_dtype = dtype_name(group.biases[0])
    common = dict(add_nodes=tuple(group.adds), scores=tuple(group.scores), bias=group.biases[0], dtype=bias_dtype)
    if group.kind == "product":
        return _computed(ctx, group.leaf, common)
    return _baked(group.leaf, tuple(group.slices), common)


def _computed(ctx: DetectionContext, mul: ir.Node, common: dict) -> AlibiSite | Refusal:
    k = slopes_side(ctx.const, mul)
    slopes_value, dist_in = mul.inputs[k], mul.inputs[1 - k]
    slopes = ctx.const(slopes_value).astype(np.float64).reshape(-1)
    dist, _ = trace_through(dist_in, ("Cast",))
    vals = ctx.probe(dist)
    form, distances = _distance_form(vals), position_source(dist)[0]
    if form is None:
        return Refusal(
            "alibi",
            mul.name or dist.name,
            "slopes multiply a tensor that is neither key positions nor j - i on the probe input",
        )
    notes = ["distances are formed from the runtime sequence: ALiBi extrapolates past the training length as is"]
    if dtype_name(mul.outputs[0]) in ("bfloat16", "float16"):
        notes.append(f"distances and bias computed in {dtype_name(mul.outputs[0])}: see check / --fp32-positions")
    return AlibiSite(
        num_heads=slopes.size,
        slopes=slopes,
        source="computed",
        distances=distances,
        form=form,
        position_dtype=dtype_name(dist_in),
        compute_dtype=dtype_name(mul.outputs[0]),
        standard_slopes=is_standard_slopes(slopes),
        max_positions=None,
        slopes_value=slopes_value,
        distances_value=dist,
        product=mul,
        notes=tuple(notes),
        **common,
    )


def _baked(table: ir.Value, slices: tuple[ir.Node, ...], common: dict) -> AlibiSite | Refusal | None:
    arr = table.const_value.numpy().astype(np.float64)
    if arr.ndim < 2 or arr.shape[-1] < 2:
        return None
    heads = int(np.prod(arr.shape[:-1]))
    if sum(1 for d in arr.shape[:-1] if d != 1) > 1 or heads < 2:
        return Refusal("alibi", table.name, f"constant bias {list(arr.shape)} is not [heads, ..., keys]")
    fit = fit_linear_bias(arr.reshape(heads, arr.shape[-1]))
    if fit is None:
        return Refusal("alibi", table.name, "constant bias added to scores is not linear along the keys")
    slopes, intercepts = fit
    if not np.all(slopes > 0):
        return Refusal("alibi", table.name, "constant bias does not decrease with distance")
    last = intercepts + slopes * (arr.shape[-1] - 1)
    if np.allclose(last, 0, atol=1e-6):
        form = "anchored"
    elif np.allclose(intercepts, 0, atol=1e-6):
        form = "absolute"
    else:
        return Refusal("alibi", table.name, "constant bias is neither 0 at the last key nor at the first")
    L = int(arr.shape[-1])
    notes = [f"bias baked as a constant of {L} keys: fails past {L} tokens; --max-positions regenerates it"]
    return AlibiSite(
        num_heads=heads,
        slopes=slopes,
        source="constant",
        distances="table",
        form=form,
        position_dtype="int64",
        compute_dtype=dtype_name(table),
        standard_slopes=is_standard_slopes(slopes, rtol=1e-4),
        max_positions=L,
        table=table,
        table_axis=len(arr.shape) - 1,
        slices=slices,
        notes=tuple(notes),
        **common,
    )


def _distance_form(vals: np.ndarray | None) -> str | None:
    """ "absolute" when the last axis holds key positions 0, 1, 2...; "relative" when [.., i, j] holds
    j - i (or -|i - j|)."""
    if vals is None or vals.ndim == 0:
        return None
    v = np.asarray(vals, dtype=np.float64)
    n = v.shape[-1]
    if n < 3:
        return None
    j = np.arange(n, dtype=np.float64)
    rows = v.reshape(-1, n)
    if np.all(rows == j[None, :]):
        return "absolute"
    if v.ndim >= 2 and v.shape[-2] == n:
        mats = v.reshape(-1, n, n)
        rel = j[None, :] - j[:, None]
        if np.all(mats == rel) or np.all(mats == -np.abs(rel)) or np.all(mats == -rel):
            return "relative"
    return None
