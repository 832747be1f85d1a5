"""torch's NaN guard on attention probabilities, computed on the [.., S, D] output instead of the [.., S, T] matrix.

torch exports ``scaled_dot_product_attention`` with a mask (the TorchScript exporter: Optimum's layout) as::

    p = Softmax(scores + bias)        w = Where(IsNaN(p), 0, p)        out = w @ v

A query row whose every key is masked (bias -inf in the whole row: a left-padding position) is NaN after the
Softmax and zero after the Where. IsNaN and Where each read the whole [B, H, S, T] probability matrix and the
Where writes it again: at 2048 tokens they take more time than the Softmax itself (`benchmarks/extend_cost.py`).
The same values come from the rows alone::

    out = Where(|ReduceMax(bias, -1)| < inf, Softmax(scores + bias) @ v, 0)

- a row whose bias has a finite entry: the Softmax is finite there (finite scores), so the original Where kept
  it; the matrix product of a row reads that row of ``p`` only, so the output row is the same, bit for bit;
- a row whose bias is -inf everywhere: the original gives ``0 @ v = 0``, the new graph selects 0 (the NaN of
  that row stays in the row and is not selected).

Exact when the scores are finite wherever the inputs are: the pass only rewrites fp32 (fp64) attention whose scores
come from MatMul products through scalings by constants, views, slices, concatenations and selections (what
exporters and posrewrite's ``--extend`` write), whose probabilities feed only the guard, and whose guarded
probabilities feed only the product with the values. Anything else keeps its guard: half-precision attention too,
whose products overflow to inf at |score| > 65504 (an fp32 product would need activations near 1e19). Run with
``--extend`` (which rewrites the scores of attention it leaves unfused) and ``--fuse`` (for attention it could not
fuse: a fused attention op has no such matrix at all).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from posrewrite.passes.onnx._build import EXTEND_NODE_PREFIX, NodeWriter
from posrewrite.passes.onnx._graph import const_tensor
from posrewrite.passes.onnx._infra import PipelineContext, ReportingPass

__all__ = ["SoftmaxGuardPass", "move_softmax_guards"]

#: ops through which a finite input gives a finite output (input 0 only, unless listed in _ALL_INPUTS)
_VIEWS = frozenset({"Reshape", "Transpose", "Slice", "Squeeze", "Unsqueeze", "Expand", "Identity", "Flatten"})
_ALL_INPUTS = frozenset({"Concat", "Add", "Sub"})
_SCALINGS = frozenset({"Mul", "Div"})


def _small_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant of ``value`` when it has at most 65536 elements (weights are never read), else None."""
    if value is None:
        return None
    tensor = const_tensor(value)
    if tensor is None or tensor.shape is None or not tensor.shape.is_static() or \
            int(np.prod(tensor.shape.numpy(), dtype=np.int64)) > 1 << 16:
        return None
    return np.asarray(tensor.numpy())


def _finite_constant(value: ir.Value | None, nonzero: bool = False) -> bool:
    array = _small_array(value)
    if array is None or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        return False
    return bool(np.all(np.isfinite(array))) and (not nonzero or bool(np.all(array != 0)))


def finite_scores(value: ir.Value, limit: int = 256) -> bool:
    """Whether ``value`` is finite wherever the graph's inputs and weights are: every path back ends at a MatMul
    (or a finite constant) through views, slices, concatenations, sums, selections and scalings by finite
    constants (division by a nonzero one)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if len(seen) > limit:
            return False
        node = v.producer()
        if node is None:
            if not _finite_constant(v):
                return False
            continue
        op = node.op_type if node.domain in ("", "ai.onnx") else None
        if op in ("MatMul", "Gemm"):
            continue
        if op == "Constant":
            if not _finite_constant(v):
                return False
        elif op in _VIEWS:
            stack.append(node.inputs[0])
        elif op in _ALL_INPUTS:
            stack.extend(i for i in node.inputs if i is not None)
        elif op == "Where":
            stack.extend(node.inputs[1:3])
        elif op == "Mul":
            a, b = node.inputs[0], node.inputs[1]
            if _finite_constant(b):
                stack.append(a)
            elif _finite_constant(a):
                stack.append(b)
            else:
                return False
        elif op == "Div":
            if not _finite_constant(node.inputs[1], nonzero=True):
                return False
            stack.append(node.inputs[0])
        else:
            return False
    return True


def _sole_use(value: ir.Value, op_type: str) -> tuple[ir.Node, int] | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node, index = uses[0]
    return (node, index) if node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _match(softmax: ir.Node) -> tuple[ir.Value, ir.Node, ir.Node, ir.Value, ir.Value] | None:
    """(bias, the guard's Where, the node reading the guarded probabilities, the product with the values in the
    probabilities' row layout, the Where's zero) of a guarded Softmax, or None. The product is ``w @ v``, or
    ``Reshape(Reshape(w) @ v)`` (the probabilities grouped by kv head and viewed back)."""
    axis = softmax.attributes.get_int("axis", -1)
    shape = softmax.inputs[0].shape
    if axis != -1 and (shape is None or axis != len(shape) - 1):
        return None
    add = softmax.inputs[0].producer()
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    p = softmax.outputs[0]
    if p.is_graph_output():
        return None
    users = {n.op_type: (n, i) for n, i in p.uses()}
    if len(list(p.uses())) != 2 or set(users) != {"IsNaN", "Where"}:
        return None
    isnan, _ = users["IsNaN"]
    where, index = users["Where"]
    if index != 2 or where.inputs[0] is not isnan.outputs[0] or len(list(isnan.outputs[0].uses())) != 1:
        return None
    zero = _small_array(where.inputs[1])  # of the probabilities' dtype (Where's two branches share it)
    if zero is None or zero.size != 1 or float(zero.reshape(())) != 0.0:
        return None
    if zero.dtype not in (np.float32, np.float64):
        return None  # a half-precision product can overflow to inf: its NaN rows are not only the masked ones
    product = _sole_use(where.outputs[0], "MatMul")
    reader, out = (product[0], product[0].outputs[0]) if product is not None and product[1] == 0 else (None, None)
    if product is None:  # grouped by kv head (posrewrite's --extend on GQA): Reshape, MatMul, Reshape back
        view = _sole_use(where.outputs[0], "Reshape")
        mm = _sole_use(view[0].outputs[0], "MatMul") if view is not None and view[1] == 0 else None
        back = _sole_use(mm[0].outputs[0], "Reshape") if mm is not None and mm[1] == 0 else None
        # only the views --extend writes (`_grouped_value_product`): [B, H, S, T] -> [B, Hkv, G, S, T], and the
        # product back to [B, H, S, D], whose rows are the probabilities' rows
        if back is not None and back[1] == 0 and all((n.name or "").startswith(EXTEND_NODE_PREFIX)
                                                     for n in (view[0], mm[0], back[0])):
            reader, out = view[0], back[0].outputs[0]
    if reader is None:
        return None
    a, b = add.inputs[0], add.inputs[1]
    if finite_scores(a) and not finite_scores(b):
        bias = b
    elif finite_scores(b) and not finite_scores(a):
        bias = a
    elif finite_scores(a) and finite_scores(b):
        return None  # no mask: nothing is ever NaN, but nothing to read the rows from either; left alone
    else:
        return None
    return bias, where, reader, out, where.inputs[1]


def move_softmax_guards(model: ir.Model) -> int:
    """Rewrites every guarded attention softmax of ``model.graph`` (see the module docstring); returns how many."""
    graph = model.graph
    matches = [(s, m) for s in list(graph) if s.op_type == "Softmax" and s.domain in ("", "ai.onnx")
               and (m := _match(s)) is not None]
    if not matches:
        return 0
    w = NodeWriter(graph, stem="posrewrite_guard")
    rows: dict[int, ir.Value] = {}
    for softmax, (bias, _, reader, out, zero) in matches:
        if id(bias) not in rows:
            if w._opset() >= 18:
                top = w.op("ReduceMax", bias, w.const(np.array([-1], np.int64)), keepdims=1)
            else:
                top = w.op("ReduceMax", bias, axes=[-1], keepdims=1)
            top = w.op("Abs", w.op("Cast", top, to=ir.DataType.FLOAT))
            rows[id(bias)] = w.op("Less", top, w.const(np.array(np.inf, np.float32)))
        uses = list(out.uses())
        reader.replace_input_with(0, softmax.outputs[0])
        guarded = w.op("Where", rows[id(bias)], out, zero)
        if out.dtype is not None:
            guarded.dtype = out.dtype
            guarded.shape = out.shape
        for node, index in uses:
            node.replace_input_with(index, guarded)
        for i, o in enumerate(graph.outputs):
            if o is out:
                graph.outputs[i] = guarded
    w.commit()
    for _, (_, where, _, _, _) in matches:  # the guard: read by nothing now
        graph.remove([where, where.inputs[0].producer()], safe=True)
    graph.sort()
    return len(matches)


class SoftmaxGuardPass(ReportingPass):
    """torch's ``Where(IsNaN(p), 0, p)`` on the probabilities of unfused attention moved to the output rows
    (`move_softmax_guards`): the same values, two passes over the [.., S, T] matrix fewer."""

    def __init__(self, *, context: PipelineContext | None = None, preface: Sequence[str] = ()) -> None:
        super().__init__(context=context, preface=preface)

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        n = move_softmax_guards(model)
        if n:
            self.changes.append(
                f"unfused attention: torch's NaN guard Where(IsNaN(p), 0, p) on the [.., S, T] probabilities of {n} "
                "attention(s) applied to the [.., S, D] output rows instead (rows whose keys are all masked are "
                "zero as before; the same values)")
        return ir.passes.PassResult(model, bool(n))
