"""Biases added to attention scores, classified by value (`math.bias`), for the Adds that the ALiBi and T5
readers (`alibi/detect.py`, `t5/detect.py`) did not explain.

Each bias is evaluated on probe inputs (see `detect_other.py`; symbolic dimensions bound to the probe length,
so `Shape` of an activation reads no weights) at two lengths, after a structural look at its cone: a bias that
reads float graph inputs (a bias the caller feeds) is not an encoding of the graph; one that reads more
constant elements than a position bias has (model weights), or changes with the token ids, depends on the
content (CoPE, data-dependent ALiBi) and is refused. The values b_h(i, j) are split into a mask and an
encoding; the encoding is fitted per head by the families of `math.bias`. A network of the distance (dynamic
position bias) is reported as such and is not rewritable; anything else is refused with what was seen.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from posrewrite.math.bias import (
    BiasFit,
    DistanceProfile,
    bias_values,
    distance_profile,
    fit_linear,
    fit_profile,
    fit_tolerance,
    key_profile,
    mask_rule,
    paper_slopes_match,
    split_mask,
)
from posrewrite.passes.onnx._graph import ConstantEvaluator, dtype_name, model_opset
from posrewrite.passes.onnx.detect_other import (
    DetectionContext,
    _is_scores,
    _probe_feed,
    _ScoresBias,
    pattern_matches,
)
from posrewrite.sites.base import Refusal
from posrewrite.sites.bias import LEARNED_NETWORK, ScoreBiasSite

__all__ = ["score_bias_sites", "FIT_LENGTH", "CHECK_LENGTH"]

FIT_LENGTH = 256  # probe length the families are fitted on (Sandwich's slow frequencies need far distances)
CHECK_LENGTH = 41  # a second length: the fitted formula must hold there too
_MAX_CONE = 600  # nodes of a bias cone (an MLP of the distance is a few dozen)
_OWN_PARAMETERS = 1 << 20  # constant elements a position bias may read (slopes, tables, a small MLP)
_MAX_BIAS_ELEMENTS = 1 << 22
_NETWORK_OPS = frozenset({"MatMul", "Gemm"})
_ACTIVATIONS = frozenset({"Relu", "Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "LeakyRelu", "Softplus", "Mish",
                          "HardSigmoid", "HardSwish", "Erf", "Swish"})


class _Probe:
    """Values of the graph on a probe of `length` tokens with token id `token` (see module doc)."""

    def __init__(self, model: ir.Model, length: int, token: int = 5) -> None:
        binding: dict[str, int] = {}
        for value in model.graph.inputs:
            for k, d in enumerate(value.shape or ()):
                if not isinstance(d, int) and d.value is not None:
                    binding.setdefault(str(d.value), 1 if k == 0 and len(value.shape) >= 2 else length)
        self.binding = binding

        def feed(value: ir.Value) -> np.ndarray | None:
            arr = _probe_feed(value, length)
            if arr is not None and np.issubdtype(arr.dtype, np.integer) and "mask" not in (value.name or "").lower() \
                    and "position" not in (value.name or "").lower():
                arr = np.full(arr.shape, token, dtype=arr.dtype)
            return arr

        # shape_of reads `binding`, not self: a bound method would make a reference cycle (probe -> evaluator ->
        # probe) that keeps the evaluator's arrays, views of memory-mapped external data, alive until the cyclic
        # collector runs, and saving the model next cannot close its external data file (BufferError)
        self.evaluate = ConstantEvaluator(model_opset(model), feed=feed, inputs=model.graph.inputs,
                                          max_nodes=_MAX_CONE, shape_of=functools.partial(_shape_of, binding))

    def __call__(self, value: ir.Value) -> np.ndarray | None:
        return self.evaluate(value)


def _shape_of(binding: dict[str, int], value: ir.Value) -> list[int] | None:
    """The shape of `value` on a probe: static dims, and symbolic ones from the probe's `binding`."""
    if value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if isinstance(d, int):
            dims.append(d)
        elif d.value is not None and str(d.value) in binding:
            dims.append(binding[str(d.value)])
        else:
            return None
    return dims


def _cone(bias: ir.Value) -> tuple[list[ir.Node], list[ir.Value], int]:
    """Nodes, graph-input leaves and constant elements of the cone of `bias`; the data input of Shape / Size
    is not followed (its shape is all they read)."""
    nodes: list[ir.Node] = []
    inputs: list[ir.Value] = []
    elements = 0
    seen: set[int] = set()
    stack = [bias]
    while stack and len(nodes) <= _MAX_CONE:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is None:
            if v.const_value is not None:
                elements += int(np.prod(v.const_value.shape.dims)) if v.const_value.shape is not None else 1
            elif v.is_graph_input():
                inputs.append(v)
            continue
        nodes.append(node)
        if node.op_type in ("Shape", "Size"):
            continue
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                elements += int(np.prod(attr.value.shape.dims)) if attr.value.shape is not None else 1
        stack.extend(i for i in node.inputs if i is not None)
    return nodes, inputs, elements


def _sliced_table_length(nodes: list[ir.Node]) -> int | None:
    """The length of a constant float table [.., T, T] that the bias slices to the runtime length (a bias
    cached at T positions: x-transformers' ALiBi buffer, MPT's table); None when there is none."""
    lengths = []
    for node in nodes:
        data = node.inputs[0] if node.op_type == "Slice" and node.inputs else None
        if data is None or data.const_value is None or data.dtype is None or not data.dtype.is_floating_point():
            continue
        shape = data.const_value.shape
        if shape is not None and len(shape) >= 2:
            lengths.append(int(shape[-1]))
    return min(lengths) if lengths else None


def _heads(values: np.ndarray) -> np.ndarray | None:
    """[H, Sq, Sk] from a bias [..., Sq, Sk] whose leading dims are 1 but one (the heads)."""
    if values.ndim < 2:
        return None
    lead = [d for d in values.shape[:-2] if d != 1]
    if len(lead) > 1:
        return None
    return values.reshape(int(np.prod(lead or [1])), *values.shape[-2:])


def score_bias_sites(
    ctx: DetectionContext, claimed: Iterable[ir.Node] = ()
) -> tuple[list[ScoreBiasSite], list[tuple[Refusal, tuple[ir.Node, ...]]]]:
    """The score biases of `ctx.model` that no Add in `claimed` brings (see module doc), and the refusals,
    each with the Adds of its bias."""
    skip = {id(n) for n in claimed}
    groups: dict[int, tuple[ir.Value, list[ir.Node], list[ir.Value]]] = {}
    for node, b in pattern_matches(_ScoresBias(), ctx.model):
        if id(node) in skip:
            continue
        for scores, bias in ((b["scores"], b["bias"]), (b["bias"], b["scores"])):
            if scores is None or bias is None or not _is_scores(scores) or _is_scores(bias):
                continue
            group = groups.setdefault(id(bias), (bias, [], []))
            group[1].append(node)
            group[2].append(scores)
            break
    if not groups:
        return [], []
    probes = (_Probe(ctx.model, FIT_LENGTH), _Probe(ctx.model, CHECK_LENGTH), _Probe(ctx.model, FIT_LENGTH, 9))
    sites: list[ScoreBiasSite] = []
    refusals: list[tuple[Refusal, tuple[ir.Node, ...]]] = []
    for bias, adds, scores in groups.values():
        try:
            found = _classify(ctx, probes, bias, adds, scores)
        except Exception as exc:  # noqa: BLE001 - a hostile bias (odd shapes, dtypes): a refusal, not a traceback
            found = Refusal("score_bias", bias.name or "?", f"bias could not be read ({type(exc).__name__})")
        if isinstance(found, Refusal):
            refusals.append((found, tuple(adds)))
        elif found is not None:
            sites.append(found)
    return sites, refusals


def _classify(ctx: DetectionContext, probes, bias: ir.Value, adds, scores) -> ScoreBiasSite | Refusal | None:
    where = bias.name or "?"
    nodes, inputs, elements = _cone(bias)
    if len(nodes) > _MAX_CONE:
        return None  # not a position computation (a whole branch of the model)
    if any(v.dtype is not None and v.dtype.is_floating_point() for v in inputs):
        return None  # a bias the caller feeds (attention_bias input): nothing of the graph to describe
    if elements > _OWN_PARAMETERS:
        return Refusal("score_bias", where, f"the bias reads {elements} constant elements (model weights): "
                       "it depends on the content, not only on positions")
    fit_probe, check_probe, token_probe = probes
    raw = fit_probe(bias)
    if raw is None or raw.size == 0 or raw.size > _MAX_BIAS_ELEMENTS or not np.issubdtype(raw.dtype, np.floating):
        return None
    values3 = _heads(raw)
    if values3 is None:
        return Refusal("score_bias", where, f"bias of shape {list(raw.shape)} has more than one non-1 leading axis")
    dtype = dtype_name(bias)
    values, mask = split_mask(values3)
    rule = mask_rule(mask, values3)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None  # all masked
    rows = np.nanmax(values, axis=-1) - np.nanmin(values, axis=-1)
    atol = fit_tolerance(finite, dtype)
    if not np.any(rows > atol):
        return None  # a mask (and per-row constants): no position encoding
    other = token_probe(bias)
    if other is not None and (other.shape != raw.shape or not np.array_equal(split_mask(other)[1], split_mask(raw)[1])
                              or np.nanmax(np.abs(split_mask(other)[0] - split_mask(raw)[0])) > atol):
        return Refusal("score_bias", where, "the bias changes with the token ids: content-dependent, not a "
                       "function of positions")
    if rule.kind == "other":
        return Refusal("score_bias", where, "a mask folded into the bias follows no causal / sliding-window rule")
    constant = not inputs and ctx.const(bias) is not None
    baked = int(values.shape[-1]) if constant else _sliced_table_length(nodes)
    common = dict(
        num_heads=values.shape[0], mask=rule, source="constant" if baked is not None else "computed",
        max_positions=baked,
        static_inputs=all(isinstance(d, int) for v in ctx.model.graph.inputs for d in (v.shape or ())),
        dtype=dtype, bias=bias, add_nodes=tuple(adds), scores=tuple(scores), bias_shape=tuple(raw.shape),
        nodes=tuple(nodes),
    )
    network = any(n.op_type in _NETWORK_OPS for n in nodes) and any(n.op_type in _ACTIVATIONS
                                                                     or n.op_type == "Mul" for n in nodes)
    profile = distance_profile(values, atol)
    if profile is not None:
        fit, tried = fit_profile(profile, dtype)
        if fit is None:
            closest = min(tried, key=lambda t: t.residual / max(t.tolerance, 1e-30))
            if network:
                return ScoreBiasSite(
                    family=LEARNED_NETWORK, form="relative", symmetric=profile.symmetric,
                    two_sided=profile.two_sided, params={}, residual=closest.residual, tolerance=closest.tolerance,
                    rewritable=False, reason="learned function of distance (a network of i - j), not rewritable",
                    notes=(f"closest formula: {closest.family} (residual {closest.residual:.3g} > "
                           f"{closest.tolerance:.3g})",), **common)
            return Refusal("score_bias", where, f"a function of i - j that fits no known family (closest: "
                           f"{closest.family}, residual {closest.residual:.3g} > {closest.tolerance:.3g})")
        return _site(fit, profile, "relative", check_probe, common, where)
    g = key_profile(values, atol)
    if g is not None:
        x = np.arange(g.shape[-1], dtype=np.float64)
        fit = fit_linear(x, g, fit_tolerance(g, dtype))
        if not fit.exact:
            return Refusal("score_bias", where, "a function of the key position alone that is not linear in it "
                           f"(residual {fit.residual:.3g})")
        fit = BiasFit("linear", {"slopes": [-s for s in fit.params["slopes"]], "offset": fit.params["offset"]},
                      fit.residual, fit.tolerance)
        profile = DistanceProfile(x, g, False, False)
        return _site(fit, profile, "key_only", check_probe, common, where)
    return Refusal("score_bias", where, f"bias {list(raw.shape)} is neither a function of i - j nor of the key "
                   "position j (absolute or content-dependent terms)")


def _site(fit: BiasFit, profile: DistanceProfile, form: str, check_probe, common: dict,
          where: str) -> ScoreBiasSite | Refusal:
    notes = []
    if form == "key_only":
        notes.append("key-only form m_h j (Bloom's): equal to the relative form after softmax")
    if common["source"] == "constant" and common["max_positions"] == common["bias_shape"][-1]:
        n = common["max_positions"]
        shape = list(common["bias_shape"])
        fix = ("re-export with a dynamic sequence axis (torch.onnx.export(..., dynamic_shapes=...)), or "
               "--max-positions N regenerates it from the fitted formula")
        notes.append(f"bias baked as a constant {shape} table by a static export: runs only at {n} tokens; {fix}")
    elif common["source"] == "constant":
        notes.append(f"bias sliced from a constant table of {common['max_positions']} positions: fails past them; "
                     "--max-positions N regenerates it from the fitted formula")
    if common["source"] == "computed" or common["max_positions"] != common["bias_shape"][-1]:
        check = check_probe(common["bias"])
        if check is not None:
            c3 = _heads(check)
            if c3 is not None:
                want = bias_values(fit.family, fit.params, c3.shape[-2], c3.shape[-1], form=form,
                                   symmetric=profile.symmetric)
                seen, _ = split_mask(c3)
                if want.shape[0] == seen.shape[0] or seen.shape[0] == 1:
                    diff = np.abs(np.where(np.isfinite(seen), seen - want, 0.0))
                    if form == "key_only":  # a constant per query row is free
                        diff = np.abs(np.where(np.isfinite(seen), (seen - want) - (seen - want)[..., -1:], 0.0))
                    if float(diff.max()) > fit.tolerance:
                        return Refusal("score_bias", where, f"fits {fit.family} at {FIT_LENGTH} tokens but not at "
                                       f"{CHECK_LENGTH}: the bias changes with the sequence length")
        if common["source"] == "computed":
            notes.append("computed from the runtime sequence: runs at any length as is")
    standard = None
    if fit.family == "linear":
        slopes = np.asarray(fit.params["slopes"], dtype=np.float64)
        standard = paper_slopes_match(slopes)
        notes.append("slopes are the paper's geometric slopes" if standard else
                     "slopes are not the paper's geometric slopes 2^(-8h/H)")
    rewritable, reason = True, None
    if fit.family == "bucketed" and not fit.params.get("saturated"):
        rewritable, reason = False, "T5 buckets not all seen at the probe length: the table cannot be regenerated"
    return ScoreBiasSite(family=fit.family, form=form, symmetric=profile.symmetric, two_sided=profile.two_sided,
                         params=fit.params, residual=fit.residual, tolerance=fit.tolerance,
                         standard_slopes=standard, rewritable=rewritable, reason=reason, notes=tuple(notes), **common)
