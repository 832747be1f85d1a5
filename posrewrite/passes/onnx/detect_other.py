"""The machinery that finds ALiBi, learned absolute, sinusoidal and T5 relative-bias encodings in an ONNX
graph, shared by each kind's detector (in `absolute/`, `alibi/`, `t5/`); `passes.onnx.detect` runs them.

Where a candidate is found is structural (onnxscript patterns, match only):
- `TableGather`  Gather(table, indices) of a constant 2-D table   -> learned / sinusoidal / T5 table
- `TableSlice`   Slice(table, ...) of a constant table             -> learned / sinusoidal read by length
- `_ScoresBias`   Add(scores, bias) where scores come from a MatMul -> ALiBi (computed or baked) / T5 bias
- `SinCosConcat`, `SinCosStack`  [sin(x) | cos(x)] or interleaved  -> computed sinusoidal
What a candidate is comes from its values: the position computation is evaluated on a probe input (a short
all-ones attention mask, token ids that are not padding), which gives offsets (OPT's +2, RoBERTa's
padding_idx + 1) and the form of ALiBi distances without knowing how an exporter spelled them; tables are
fitted (sinusoid formula, per-head linear bias, T5 buckets). Anything that looks like an encoding but
does not fit becomes a `Refusal` with the reason. Biases added to scores are classified here once
(`score_biases`) and read by the ALiBi or T5 reader.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.pattern import PatternBase

from posrewrite.limits import fits_budget
from posrewrite.passes.onnx._graph import (
    VIEW_OPS,
    ConstantEvaluator,
    dtype_name,
    model_opset,
    numpy_dtype,
    trace_through,
)
from posrewrite.sites.base import EncodingSite, Refusal

__all__ = ["score_biases", "BiasGroup", "DetectionContext", "PROBE_LENGTH"]

PROBE_LENGTH = 6  # sequence length of the probe input that position computations are evaluated on
_MAX_CONE = 400  # nodes evaluated per probe value; bigger cones are not position computations
_SCALE_OPS = frozenset({"Mul", "Div"})


# ---------------------------------------------------------------------------------------------- patterns


class TableGather(PatternBase):
    def pattern(self, op, table, indices):
        return op.Gather(table, indices)


class TableSlice(PatternBase):
    def pattern(self, op, table, starts, ends):
        return op.Slice(table, starts, ends, _allow_other_inputs=True)


class _ScoresBias(PatternBase):
    def pattern(self, op, scores, bias):
        return op.Add(scores, bias)


class SinCosConcat(PatternBase):
    def pattern(self, op, x):
        return op.Concat(op.Sin(x), op.Cos(x))


class SinCosStack(PatternBase):
    def pattern(self, op, x, axes1, axes2, shape):
        return op.Reshape(op.Concat(op.Unsqueeze(op.Sin(x), axes1), op.Unsqueeze(op.Cos(x), axes2)), shape)


def pattern_matches(pattern: PatternBase, model: ir.Model) -> Iterable[tuple[ir.Node, dict]]:
    for node in list(model.graph):
        match = pattern.match(model, model.graph, node, check_nodes_are_removable=False)
        if match:
            yield node, dict(match.bindings)


# ------------------------------------------------------------------------------------------------ probe


_PROBE_BUDGET_BYTES = 64 << 20  # a probe input: a short sequence, never a declared static length of 2^28


def _probe_feed(value: ir.Value, length: int) -> np.ndarray | None:
    if value.shape is None or value.dtype is None:
        return None
    dims = []
    for k, d in enumerate(value.shape):
        if isinstance(d, int):
            dims.append(d)
        else:  # symbolic: batch (axis 0 of a rank >= 2 input) is 1, every other dim is the probe length
            dims.append(1 if k == 0 and len(value.shape) >= 2 else length)
    name = (value.name or "").lower()
    dt = numpy_dtype(value.dtype)
    if not fits_budget(dims, dt.itemsize, budget=_PROBE_BUDGET_BYTES):
        return None  # a declared static length too big to feed (the probe says nothing then)
    if value.dtype == ir.DataType.BOOL:
        return np.ones(dims, dtype=bool)
    if value.dtype.is_floating_point():
        return np.zeros(dims, dtype=dt)
    if "mask" in name:
        return np.ones(dims, dtype=dt)
    if "position" in name and dims:
        return np.broadcast_to(np.arange(dims[-1], dtype=dt), dims).copy()
    return np.full(dims, 5, dtype=dt)  # token ids: any id that is not padding


def make_probe(model: ir.Model, length: int) -> ConstantEvaluator:
    """Evaluates values of the graph on a probe input of `length` tokens (see module doc); constant cones are
    folded on the way. The evaluator is _graph's constant folder, fed with `_probe_feed` for the graph inputs."""
    return ConstantEvaluator(
        model_opset(model), feed=lambda value: _probe_feed(value, length), inputs=model.graph.inputs,
        max_nodes=_MAX_CONE,
    )


# -------------------------------------------------------------------------------------------- helpers


def cone_ops(value: ir.Value, limit: int = 200) -> tuple[set[str], list[ir.Node], list[ir.Value]]:
    """Op types, nodes and graph inputs/initializers upstream of `value` (bounded walk)."""
    ops: set[str] = set()
    nodes: list[ir.Node] = []
    leaves: list[ir.Value] = []
    seen: set[int] = set()
    stack = [value]
    while stack and len(nodes) < limit:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is None:
            leaves.append(v)
            continue
        ops.add(node.op_type)
        nodes.append(node)
        stack.extend(i for i in node.inputs if i is not None)
    return ops, nodes, leaves


def position_source(value: ir.Value) -> tuple[str, ir.Value | None]:
    """How positions are formed: "mask_cumsum", "range", "constant" (a sliced arange buffer) or "input"."""
    ops, nodes, leaves = cone_ops(value)
    if "CumSum" in ops:
        return "mask_cumsum", None
    for node in nodes:
        if node.op_type == "Slice" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            data = node.inputs[0]
            if data.dtype is not None and not data.dtype.is_floating_point():
                return "constant", data
    if "Range" in ops:
        return "range", None
    if any(v.const_value is None and v.producer() is None for v in leaves):
        return "input", None
    return "constant", None


def unit_progression(idx: np.ndarray | None) -> int | None:
    """Offset c when every row of idx (last axis) is c, c+1, c+2, ...; None otherwise."""
    if idx is None or idx.ndim == 0 or idx.shape[-1] < 3 or not np.issubdtype(idx.dtype, np.integer):
        return None
    rows = idx.reshape(-1, idx.shape[-1])
    c = int(rows[0, 0])
    expected = c + np.arange(rows.shape[1])
    return c if np.all(rows == expected[None, :]) else None


def _is_scores(value: ir.Value) -> bool:
    """True when value is q @ k^T, possibly scaled by a constant and reshaped."""
    v, _ = trace_through(value)
    node = v.producer()
    if node is not None and node.op_type in _SCALE_OPS:
        for k in (0, 1):
            other = node.inputs[1 - k]
            if other is not None and other.const_value is not None and other.const_value.size == 1:
                v, _ = trace_through(node.inputs[k])
                break
    node = v.producer()
    if node is None or node.op_type != "MatMul":
        return False
    return all(i is not None and i.const_value is None for i in node.inputs)


def reaches_add(value: ir.Value, depth: int = 4) -> bool:
    """True when value (through view ops and slices, never a product) is added to a non-constant tensor:
    an additive position encoding, not a weight, and not a RoPE cos/sin cache (those multiply q and k)."""
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if node.op_type == "Add":
                    other = node.inputs[1 - use.idx] if len(node.inputs) == 2 else None
                    if other is not None and other.const_value is None:
                        return True
                if node.op_type in VIEW_OPS or node.op_type in ("Slice", "Gather"):
                    nxt.extend(node.outputs)
        frontier = nxt
    return False


# ------------------------------------------------------------------------------------------- context


class DetectionContext:
    """What every kind's detector reads a model with: the probe (values on the probe input, see module doc)
    and the constant folder, shared so each value is evaluated once."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.probe = make_probe(model, PROBE_LENGTH)
        self.const = ConstantEvaluator.for_model(model)


# ------------------------------------------------------------------------------ biases added to scores


@dataclasses.dataclass
class BiasGroup:
    """One source of a bias added to attention scores, with every Add that brings it to the scores.

    `kind` is "product" (`leaf` the Mul of slopes and distances), "constant" (`leaf` a constant table) or
    "t5" (`leaf` a Gather from a bucket table)."""

    leaf: ir.Node | ir.Value
    kind: str
    adds: list[ir.Node] = dataclasses.field(default_factory=list)
    scores: list[ir.Value] = dataclasses.field(default_factory=list)
    biases: list[ir.Value] = dataclasses.field(default_factory=list)
    slices: list[ir.Node] = dataclasses.field(default_factory=list)


BiasReader = Callable[[DetectionContext, BiasGroup], EncodingSite | Refusal | None]


def score_biases(
    ctx: DetectionContext, *, alibi: BiasReader, t5: BiasReader, claimed: list[ir.Node] | None = None,
    refused: dict[int, Refusal] | None = None,
) -> tuple[list[EncodingSite], list[Refusal]]:
    """Every bias added to attention scores, classified by what builds it and read by its kind's reader:
    `alibi` for slopes x distances products and constant tables, `t5` for Gathers from bucket tables
    (ALiBi groups first, each kind in the order found). `claimed` receives the Adds of the groups read as a
    site, `refused` the refusal of each Add (by id) whose group was refused."""
    groups: dict[str, dict[int, BiasGroup]] = {"alibi": {}, "t5": {}}
    for node, b in pattern_matches(_ScoresBias(), ctx.model):
        for scores, bias in ((b["scores"], b["bias"]), (b["bias"], b["scores"])):
            if scores is None or bias is None or not _is_scores(scores) or _is_scores(bias):
                continue
            for leaf, kind, slices in _bias_leaves(ctx.const, bias):
                group = groups["t5" if kind == "t5" else "alibi"].setdefault(id(leaf), BiasGroup(leaf, kind))
                group.adds.append(node)
                group.scores.append(scores)
                group.biases.append(bias)
                group.slices.extend(s for s in slices if s not in group.slices)
            break
    sites: list[EncodingSite] = []
    refusals: list[Refusal] = []
    for name, reader in (("alibi", alibi), ("t5", t5)):
        for group in groups[name].values():
            site = reader(ctx, group)
            if isinstance(site, Refusal):
                refusals.append(site)
                if refused is not None:
                    refused.update((id(a), site) for a in group.adds)
            elif site is not None:
                sites.append(site)
                if claimed is not None:
                    claimed.extend(group.adds)
    return sites, refusals


def _bias_leaves(
    const: ConstantEvaluator, bias: ir.Value, depth: int = 12
) -> list[tuple[ir.Node | ir.Value, str, list[ir.Node]]]:
    """Walks up from a bias added to scores to what builds it: a slopes x distances product, a constant
    table, or a Gather from a bucket table. Adds (a mask added to the bias) are followed on both sides."""
    out = []
    stack = [(bias, depth, [])]
    while stack:
        v, d, slices = stack.pop()
        if d <= 0:
            continue
        if v.const_value is not None or (v.producer() is None):
            if (
                v.const_value is not None
                and v.dtype is not None
                and v.dtype.is_floating_point()
                and v.const_value.size > 1
            ):
                out.append((v, "constant", slices))
            continue
        node = v.producer()
        if node.op_type in VIEW_OPS or node.op_type == "Slice":
            stack.append((node.inputs[0], d - 1, slices + ([node] if node.op_type == "Slice" else [])))
        elif node.op_type == "Mul" and slopes_side(const, node) is not None:
            out.append((node, "product", slices))
        elif node.op_type == "Neg":
            stack.append((node.inputs[0], d - 1, slices))
        elif (
            node.op_type in _SCALE_OPS
            and node.inputs[1] is not None
            and node.inputs[1].const_value is not None
            and node.inputs[1].const_value.size == 1
        ):
            stack.append((node.inputs[0], d - 1, slices))  # bias scaled by a constant (Falcon: 1/sqrt(d))
        elif (
            node.op_type == "Gather"
            and node.inputs[0] is not None
            and node.inputs[0].const_value is not None
            and len(node.inputs[0].shape) == 2
        ):
            out.append((node, "t5", slices))
        elif node.op_type in ("Add", "Where"):
            for inp in node.inputs:
                if inp is not None:
                    stack.append((inp, d - 1, slices))
    return out


def slopes_side(const: ConstantEvaluator, mul: ir.Node) -> int | None:
    """The input of `mul` that holds ALiBi slopes (a constant vector along one axis, values in (0, 1]) while
    the other is not constant; None when neither does."""
    for k in (0, 1):
        a, other = mul.inputs[k], mul.inputs[1 - k]
        if a is None or other is None:
            continue
        s = const(a)
        if s is None or s.size < 2 or const(other) is not None:
            continue
        if sum(1 for d in s.shape if d != 1) != 1:
            continue
        vals = s.astype(np.float64).reshape(-1)
        if np.all(vals > 0) and np.all(vals <= 1):
            return k
    return None


def sin_tolerance(table: ir.Value) -> float:
    return {"float16": 2e-3, "bfloat16": 1e-2}.get(dtype_name(table), 1e-4)
