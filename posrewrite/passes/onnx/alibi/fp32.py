"""fp32-safe ALiBi: distances and bias computed in float32, cast only where the bias meets the scores.

Two rewrites, chosen per site:
- promote: the scores are float32 but the product was formed in half precision (Falcon builds ALiBi in
  bfloat16, exact only up to 256 positions): slopes and distances enter the product in float32 and the
  chain up to its cast to float32 carries float32.
- relative: the scores are half precision. A bias m * j (Bloom) or a baked table in half precision holds
  values up to m * L, whose ulp at 8192 tokens is 1-4 in float16, so near tokens are wrong. The bias is
  rebuilt as m * (j - i) in float32 (exact integers j - i; one rounding of the product) and cast at the
  Add: near distances are then as exact as the bias dtype allows. Softmax cannot tell the two forms apart
  (they differ by a constant per query row).
`alibi_precision` is the analysis `check` prints, like the RoPE one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from posrewrite.math.alibi import near_bias_error
from posrewrite.math.precision import colliding_positions, exact_position_count, machine_epsilon
from posrewrite.passes.onnx._build import NodeWriter, remove_made_dead, unread_nodes
from posrewrite.passes.onnx._graph import VIEW_OPS
from posrewrite.passes.onnx._infra import PipelineContext, ReportingPass
from posrewrite.sites.alibi import AlibiSite
from posrewrite.sites.base import EncodingSite

__all__ = ["Fp32AlibiPass", "alibi_precision", "is_fp32_safe", "make_alibi_fp32", "NEAR_WINDOW"]

NEAR_WINDOW = 256  # distances whose bias `check` requires to be exact
_HALF = ("float16", "bfloat16")
_WIDE = ("float32", "float64")
_INT64_MAX = np.iinfo(np.int64).max


def is_fp32_safe(site: AlibiSite) -> bool:
    """Structural: positions exact (integers or float32), product in float32, and the bias either kept in
    float32 up to the scores or in the relative form (near distances small, hence exact)."""
    positions_ok = site.position_dtype not in _HALF
    product_ok = site.compute_dtype in _WIDE
    bias_ok = site.dtype in _WIDE or site.form == "relative"
    return positions_ok and product_ok and bias_ok


def alibi_precision(site: AlibiSite, max_length: int) -> dict[str, Any]:
    """Precision of an ALiBi site at `max_length` tokens, keyed like the RoPE analysis.

    `max_angle_error` is here the largest bias error over the NEAR_WINDOW nearest distances of the last
    query (what softmax sees: b(i, j) - b(i, i) against -m (i - j)); `near_exact_fraction` the fraction of
    those (heads x distances) that are exact. Safe when every position is exact and the bias error is at
    most max(1e-3, 2^-23 x largest bias), float32's own error bound.
    """
    n = int(max_length)
    pos = site.position_dtype if site.position_dtype != "unknown" else "float32"
    compute = site.compute_dtype if site.compute_dtype != "unknown" else "float32"
    out = site.dtype if site.dtype != "unknown" else compute
    form = "relative" if site.form in ("relative", "anchored") else "absolute"
    err = near_bias_error(
        site.slopes, n, position_dtype=pos, compute_dtype=compute, dtype=out, form=form, window=NEAR_WINDOW
    )
    exact = exact_position_count(n, pos)
    tol = max(1e-3, machine_epsilon("float32") * float(np.max(site.slopes)) * max(n - 1, 0))
    return {
        "kind": "alibi",
        "position_dtype": pos,
        "angle_dtype": out,
        "compute_dtype": compute,
        "form": site.form,
        "exact_position_fraction": exact / n if n else 1.0,
        "colliding_positions": colliding_positions(n, pos),
        "max_angle_error": err["max_error"],
        "near_exact_fraction": err["exact_fraction"],
        "near_window": err["window"],
        "bias_tolerance": tol,
        "safe": bool(exact == n and err["max_error"] <= tol),
        "max_length": n,
    }


class Fp32AlibiPass(ReportingPass):
    """Makes every ALiBi site fp32-safe (see module doc); modified=False when all already are.
    ``sites``: None reads the ALiBi sites of the pipeline's (cached) detection. `changes` and `notes` say what
    was done per site after `call` (and are appended to the context's report)."""

    def __init__(self, *, sites: Sequence[EncodingSite] | None = None, context: PipelineContext | None = None,
                 preface: Sequence[str] = ()) -> None:
        super().__init__(context=context, preface=preface)
        self.sites = None if sites is None else [s for s in sites if isinstance(s, AlibiSite)]

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        sites = self.sites if self.sites is not None else self.context.detection(model).sites
        return ir.passes.PassResult(model, make_alibi_fp32(model, sites, self.changes, self.notes))


def make_alibi_fp32(model: ir.Model, sites: Sequence[EncodingSite], changes: list[str], notes: list[str]) -> bool:
    """The rewrite of `Fp32AlibiPass` as a function: appends to ``changes`` / ``notes``; True when the model
    was modified."""
    return _AlibiFp32([s for s in sites if isinstance(s, AlibiSite)], changes, notes).rewrite(model)


class _AlibiFp32:
    def __init__(self, sites: list[AlibiSite], changes: list[str], notes: list[str]) -> None:
        self.sites = sites
        self.changes = changes
        self.notes = notes

    def rewrite(self, model: ir.Model) -> bool:
        modified = False
        dead_before = unread_nodes(model.graph)
        for site in self.sites:
            if is_fp32_safe(site):
                self.notes.append(
                    f"ALiBi {site.bias.name}: already fp32-safe ({site.form} form, "
                    f"product in {site.compute_dtype}, bias in {site.dtype})"
                )
                continue
            if site.dtype in _WIDE and site.source == "computed" and self._promote(model.graph, site):
                modified = True
            elif self._relative(model.graph, site):
                modified = True
        if modified:
            # the replaced products go now, not at the pipeline's cleanup: a model written by this function
            # alone is detected as rewritten (the dead half-precision ALiBi would be found again)
            remove_made_dead(model.graph, dead_before)
        return modified

    def _promote(self, graph: ir.Graph, site: AlibiSite) -> bool:
        mul = site.product
        chain: list[ir.Node] = []
        value = mul.outputs[0]
        while True:  # single-consumer view chain from the product to a Cast to float32
            uses = list(value.uses())
            if len(uses) != 1:
                return False
            node = uses[0].node
            if node.op_type == "Cast" and node.attributes["to"].value in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
                break
            if node.op_type not in VIEW_OPS or node.op_type == "Cast":
                return False
            chain.append(node)
            value = node.outputs[0]
        w = NodeWriter(graph, mul, "alibi_fp32")
        slopes = w.op("Cast", site.slopes_value, to=ir.DataType.FLOAT)
        dist = w.op("Cast", site.distances_value, to=ir.DataType.FLOAT)
        product = w.op("Mul", slopes, dist)
        _set_dtype(w, ir.DataType.FLOAT)
        w.commit()
        for use in list(mul.outputs[0].uses()):
            use.node.replace_input_with(use.idx, product)
        for node in chain:
            node.outputs[0].dtype = ir.DataType.FLOAT
        self.changes.append(
            f"ALiBi {site.bias.name}: slopes x distances in float32 instead of {site.compute_dtype} "
            f"(positions were exact only up to {256 if site.compute_dtype == 'bfloat16' else 2048})"
        )
        return True

    def _relative(self, graph: ir.Graph, site: AlibiSite) -> bool:
        factor = _path_factor(site)
        if factor is None:
            self.notes.append(
                f"ALiBi {site.bias.name}: the bias is merged with other terms before the scores; not rewritten"
            )
            return False
        first = min(site.add_nodes, key=lambda n: list(n.graph).index(n) if n.graph is not None else 0)
        k_first = site.add_nodes.index(first)
        scores = site.scores[k_first]
        rank = len(scores.shape) if scores.shape is not None else None
        if rank not in (3, 4):
            self.notes.append(f"ALiBi {site.bias.name}: scores of unknown rank; not rewritten")
            return False
        w = NodeWriter(graph, first, "alibi_rel")
        i64 = lambda v: w.const(np.array(v, dtype=np.int64))  # noqa: E731
        sk = w.op("Shape", scores, start=-1)
        sq = w.op("Shape", scores, start=-2, end=-1)
        if site.source == "computed":
            d = w.op("Cast", site.distances_value, to=ir.DataType.FLOAT)
            d2 = w.op("Reshape", d, w.op("Concat", i64([-1]), sk, axis=0))
        else:
            r = w.op(
                "Range",
                w.const(np.array(0.0, np.float32)),
                w.op("Cast", w.op("Squeeze", sk), to=ir.DataType.FLOAT),
                w.const(np.array(1.0, np.float32)),
            )
            d2 = w.op("Unsqueeze", r, i64([0]))
        dk = w.op("Unsqueeze", d2, i64([1]))
        dq = w.op("Unsqueeze", w.op("Slice", d2, w.op("Neg", sq), i64([_INT64_MAX]), i64([1])), i64([2]))
        rel = w.op("Sub", dk, dq)  # [B or 1, Sq, Sk], exact integers
        slopes = (site.slopes * factor).astype(np.float32).reshape(1, -1, 1, 1)
        bias = w.op("Mul", w.op("Unsqueeze", rel, i64([1])), w.const(slopes))  # [B or 1, H, Sq, Sk]
        if rank == 3:
            bias = w.op("Reshape", bias, w.op("Concat", i64([-1]), sq, sk, axis=0))
        _set_dtype(w, ir.DataType.FLOAT)
        out = w.op("Cast", bias, to=scores.dtype)
        out.dtype = scores.dtype
        w.commit()
        for add, bias_in in zip(site.add_nodes, _bias_inputs(site), strict=False):
            add.replace_input_with(bias_in, out)
        self.changes.append(
            f"ALiBi {site.bias.name}: bias rebuilt as slope x (j - i) in float32, cast to {site.dtype} at "
            f"{len(site.add_nodes)} score Add(s) (was {site.form} form in {site.compute_dtype}/{site.dtype})"
        )
        return True


def _set_dtype(w: NodeWriter, dtype: ir.DataType) -> None:
    """Types the float outputs the writer created (shape ops keep int64)."""
    for node in w.nodes:
        out = node.outputs[0]
        if out.dtype is None:
            out.dtype = ir.DataType.INT64 if node.op_type in ("Shape", "Concat", "Neg", "Squeeze") else dtype


def _bias_inputs(site: AlibiSite) -> list[int]:
    return [0 if add.inputs[0] is not scores else 1 for add, scores in zip(site.add_nodes, site.scores, strict=False)]


def _path_factor(site: AlibiSite) -> float | None:
    """Constant factor the bias is scaled by between its source and the scores (Falcon divides by
    sqrt(head_dim)); None when anything but view ops, slices, casts and constant scaling is on the way."""
    source = site.product.outputs[0] if site.product is not None else site.table
    factor = 1.0
    for add, k in zip(site.add_nodes, _bias_inputs(site), strict=False):
        v, f = add.inputs[k], 1.0
        while v is not source:
            node = v.producer()
            if node is None:
                return None
            if node.op_type in VIEW_OPS or node.op_type == "Slice":
                v = node.inputs[0]
            elif (
                node.op_type in ("Mul", "Div")
                and node.inputs[1] is not None
                and node.inputs[1].const_value is not None
                and node.inputs[1].const_value.size == 1
            ):
                c = float(node.inputs[1].const_value.numpy().reshape(-1)[0])
                f = f * c if node.op_type == "Mul" else f / c
                v = node.inputs[0]
            else:
                return None
        factor = f
    return factor
