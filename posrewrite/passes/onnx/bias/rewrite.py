"""Score biases rebuilt from their fitted formula (`math.bias`), for every family that has one.

The new bias is computed from the scores' runtime shape, in float32, and cast to the bias dtype only where it
meets the scores: the profile f_h(x) over the distances 0..Sk-1 (or -(Sk-1)..Sk-1 for a two-sided asymmetric
bias), distances divided by the scale S (distance interpolation), gathered by |i - j| (or i - j) into
[H, Sq, Sk]; the mask that was folded into the bias is put back by its rule. So one rewrite serves
- `--max-positions N`: a bias baked as a constant table by the export runs at any length (N included);
- `--bias-scale S` (`--alibi-scale` for ALiBi): the formula at distances / S;
- `--fp32-positions`: distances and formula in float32.
A bias computed by a network of the distance has no formula and is not rewritten (detection says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from posrewrite.math.bias import family_values, near_bias_precision
from posrewrite.math.precision import colliding_positions, exact_position_count, unit_roundoff
from posrewrite.passes.onnx._build import NodeWriter
from posrewrite.passes.onnx._infra import PipelineContext, ReportingPass
from posrewrite.sites.base import EncodingSite
from posrewrite.sites.bias import ScoreBiasSite

__all__ = ["rewrite_score_bias", "Fp32ScoreBiasPass", "HALF_DTYPES", "score_bias_precision"]

HALF_DTYPES = ("float16", "bfloat16")
_F32 = ir.DataType.FLOAT
_I64 = ir.DataType.INT64


def rewrite_score_bias(
    graph: ir.Graph, site: ScoreBiasSite, *, max_positions: int | None = None, scale: float | None = None,
    fp32: bool = False,
) -> tuple[list[str], list[str]]:
    """(changes, notes) of the rewrite of one site for the options given (see module doc); the site was
    rewritten exactly when a change is reported."""
    s = 1.0 if scale is None else float(scale)
    name = site.bias.name
    if not site.rewritable:
        return [], [f"score bias {name}: {site.reason or 'not rewritable'}"]
    reasons = []
    if s != 1.0:
        if site.family == "bucketed":
            return [], [f"score bias {name}: T5 buckets have no distance interpolation; not rewritten"]
        reasons.append(f"distances / {s:g}")
    if max_positions and site.source == "constant":
        reasons.append(f"baked {site.max_positions}-token table replaced by the formula (runs at any length, "
                       f"{max_positions} included)")
    if fp32 and site.dtype in HALF_DTYPES:
        reasons.append(f"distances and formula in float32, cast to {site.dtype} at the scores")
    if not reasons:
        notes = []
        if max_positions and site.source == "computed":
            notes.append(f"score bias {name} ({site.family}): computed from the runtime sequence, runs at any "
                         "length as is")
        if fp32 and site.dtype not in HALF_DTYPES:
            notes.append(f"score bias {name} ({site.family}): already in {site.dtype}")
        return [], notes
    _rebuild(graph, site, s)
    return [f"score bias {name} ({site.family}, {len(site.add_nodes)} score Add(s)): " + "; ".join(reasons)], []


def _rebuild(graph: ir.Graph, site: ScoreBiasSite, scale: float) -> None:
    order = {id(n): k for k, n in enumerate(graph)}
    first = min(site.add_nodes, key=lambda n: order.get(id(n), 0))
    scores = site.scores[site.add_nodes.index(first)]
    w = NodeWriter(graph, first, "score_bias")
    i64 = lambda v: w.const(np.array(v, dtype=np.int64))  # noqa: E731
    f32 = lambda v: w.const(np.asarray(v, dtype=np.float32))  # noqa: E731
    sq = w.op("Shape", scores, start=-2, end=-1)
    sk = w.op("Shape", scores, start=-1)
    sq0, sk0 = w.op("Squeeze", sq), w.op("Squeeze", sk)
    zero, one = i64(0), i64(1)
    i = w.op("Range", w.op("Sub", sk0, sq0), sk0, one)
    j = w.op("Range", zero, sk0, one)
    delta = w.op("Sub", w.op("Unsqueeze", i, i64([1])), w.op("Unsqueeze", j, i64([0])))  # [Sq, Sk] = i - j
    heads = site.num_heads
    p = site.params
    if site.form == "key_only":
        x = w.op("Cast", j, to=_F32)  # c_h + m_h j, the key position as the model had it
        if scale != 1.0:
            x = w.op("Mul", x, f32(1.0 / scale))
        m = f32(np.asarray(p["slopes"], np.float64).reshape(heads, 1, 1))
        c = f32(np.asarray(p["offset"], np.float64).reshape(heads, 1, 1))
        bias = w.op("Add", w.op("Mul", m, w.op("Unsqueeze", x, i64([0, 1]))), c)  # [H, 1, Sk]
        bias = w.op("Expand", bias, w.op("Concat", i64([heads]), sq, sk, axis=0))
    else:
        if site.symmetric:
            index = w.op("Abs", delta)
            dvec = w.op("Range", zero, sk0, one)
        else:  # two-sided asymmetric: profile over -(Sk-1)..Sk-1
            skm1 = w.op("Sub", sk0, one)
            index = w.op("Add", delta, skm1)
            dvec = w.op("Range", w.op("Neg", skm1), sk0, one)
        profile = _profile(w, site, dvec, scale, f32, i64)  # [H, D]
        bias = w.op("Gather", profile, index, axis=1)  # [H, Sq, Sk]
    rule = site.mask
    if rule.kind != "none":
        if rule.kind == "causal":
            hidden = w.op("Less", delta, zero)
        elif rule.kind == "sliding":
            hidden = w.op("Or", w.op("Less", delta, zero), w.op("GreaterOrEqual", delta, i64(int(rule.window))))
        else:  # "window"
            hidden = w.op("GreaterOrEqual", w.op("Abs", delta), i64(int(rule.window)))
        bias = w.op("Where", hidden, f32(rule.value), bias)
    lead = [d for d in site.bias_shape[:-2]]
    bias = w.op("Reshape", bias, w.op("Concat", i64(lead), sq, sk, axis=0))
    out = w.op("Cast", bias, to=site.bias.dtype or _F32)
    out.dtype = site.bias.dtype
    w.commit()
    for add, scores_in in zip(site.add_nodes, site.scores, strict=True):
        k = 0 if add.inputs[1] is scores_in else 1
        add.replace_input_with(k, out)


def _profile(w: NodeWriter, site: ScoreBiasSite, dvec: ir.Value, scale: float, f32, i64) -> ir.Value:
    """f_h(x) [H, D] over the distances `dvec` (int64), in float32 (the family's formula in `math.bias`)."""
    heads, p = site.num_heads, site.params
    col = lambda v: f32(np.asarray(v, np.float64).reshape(heads, 1))  # noqa: E731
    if site.family == "bucketed":
        return _buckets(w, site, dvec, f32, i64)
    x = w.op("Cast", dvec, to=_F32)
    if scale != 1.0:
        x = w.op("Mul", x, f32(1.0 / scale))
    x = w.op("Unsqueeze", x, i64([0]))  # [1, D]
    c = col(p["offset"])
    fam = site.family
    if fam == "linear":
        return w.op("Sub", c, w.op("Mul", col(p["slopes"]), x))
    if fam == "kerple_log":
        return w.op("Sub", c, w.op("Mul", col(p["r1"]), w.op("Log", w.op("Add", w.op("Mul", col(p["r2"]), x),
                                                                               f32(1.0)))))
    if fam == "kerple_power":
        return w.op("Sub", c, w.op("Mul", col(p["r1"]), w.op("Pow", w.op("Abs", x), col(p["r2"]))))
    if fam == "sandwich":
        dim, first = int(p["dim"]), int(p["first"])
        freqs = float(p["base"]) ** (-2.0 * np.arange(first, first + dim // 2, dtype=np.float64) / dim)
        ang = w.op("Mul", w.op("Unsqueeze", x, i64([2])), f32(freqs.reshape(1, 1, -1)))  # [1, D, K]
        total = w.op("ReduceSum", w.op("Cos", ang), i64([2]), keepdims=0)  # [1, D]
        return w.op("Add", c, w.op("Mul", col(p["scale"]), total))
    raise ValueError(f"no formula for family {fam!r}")


def _buckets(w: NodeWriter, site: ScoreBiasSite, dvec: ir.Value, f32, i64) -> ir.Value:
    """table_h[bucket(j - i)] over δ = `dvec` by T5's rule (`math.absolute.t5_relative_bucket`)."""
    p = site.params
    nb, md, bidirectional = int(p["num_buckets"]), int(p["max_distance"]), bool(p["bidirectional"])
    table = np.asarray([[0.0 if v is None else v for v in row] for row in p["table"]], np.float64)  # [H, nb]
    rel = w.op("Neg", dvec)
    ret = None
    if bidirectional:
        nb //= 2
        ret = w.op("Mul", w.op("Cast", w.op("Greater", rel, i64(0)), to=_I64), i64(nb))
        n = w.op("Abs", rel)
    else:
        n = w.op("Neg", w.op("Min", rel, i64(0)))
    max_exact = nb // 2
    nf = w.op("Cast", w.op("Max", n, i64(1)), to=_F32)
    large = w.op("Div", w.op("Log", w.op("Div", nf, f32(float(max_exact)))), f32(float(np.log(md / max_exact))))
    large = w.op("Add", i64(max_exact), w.op("Cast", w.op("Mul", large, f32(float(nb - max_exact))), to=_I64))
    large = w.op("Min", large, i64(nb - 1))
    bucket = w.op("Where", w.op("Less", n, i64(max_exact)), n, large)
    if ret is not None:
        bucket = w.op("Add", ret, bucket)
    return w.op("Gather", f32(table), bucket, axis=1)  # [H, D]


class Fp32ScoreBiasPass(ReportingPass):
    """--fp32-positions for the score biases read by value: half-precision ones rebuilt in float32 (module doc).
    ``sites``: None reads the pipeline's (cached) detection."""

    def __init__(self, *, sites: Sequence[EncodingSite] | None = None, context: PipelineContext | None = None,
                 preface: Sequence[str] = ()) -> None:
        super().__init__(context=context, preface=preface)
        self.sites = None if sites is None else [s for s in sites if isinstance(s, ScoreBiasSite)]

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        sites = self.sites
        if sites is None:
            sites = [s for s in self.context.detection(model).sites if isinstance(s, ScoreBiasSite)]
        modified = False
        for site in sites:
            changes, notes = rewrite_score_bias(model.graph, site, fp32=True)
            self.changes.extend(changes)
            self.notes.extend(notes)
            modified |= bool(changes)
        return ir.passes.PassResult(model, modified)


def profile_values(site: ScoreBiasSite, x: np.ndarray) -> np.ndarray:
    """The fitted profile f_h(x) of a site (float64), for `check` and tests of the rewrite's formula."""
    return family_values(site.family, site.params, x)


def score_bias_precision(site: ScoreBiasSite, max_length: int) -> dict[str, Any]:
    """`check`'s row for a score bias at `max_length` tokens, keyed like the RoPE and ALiBi rows: the bias is
    taken as computed in its own dtype (positions, distance and formula); safe when every position is exact
    and the nearest 256 distances of the last query are within the bias dtype's round-off of the formula.
    A learned network has no formula to measure: its row says so."""
    n = int(max_length)
    dtype = site.dtype if site.dtype in ("float16", "bfloat16", "float32", "float64") else "float32"
    row: dict[str, Any] = {"kind": "score_bias", "family": site.family, "position_dtype": dtype,
                           "angle_dtype": dtype, "max_length": n}
    exact = exact_position_count(n, dtype)
    row.update(exact_position_fraction=exact / n if n else 1.0, colliding_positions=colliding_positions(n, dtype))
    if not site.rewritable or site.family == "bucketed":
        row.update(max_angle_error=None, safe=bool(exact == n), note="no formula to measure" if not
                   site.rewritable else "bucket lookups: exact integers")
        return row
    err = near_bias_precision(site.family, site.params, n, dtype=dtype, symmetric=site.symmetric, form=site.form)
    scale = float(np.max(np.abs(family_values(site.family, site.params, np.arange(min(n, 256.0))))) or 1.0)
    tol = max(1e-3, 4 * unit_roundoff(dtype) * scale)
    row.update(max_angle_error=err["max_error"], near_exact_fraction=err["exact_fraction"], near_window=err["window"],
               bias_tolerance=tol, safe=bool(exact == n and err["max_error"] <= tol))
    return row
