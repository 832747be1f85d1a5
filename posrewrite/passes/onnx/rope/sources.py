"""Where the cos (or sin) value a q/k rotation multiplies with comes from: traced upstream through broadcasting
ops to a Cos/Sin of computed angles, or to the rows of a constant table selected by position."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from posrewrite.passes.onnx._graph import (
    VIEW_OPS,
    ConstantEvaluator,
    const_tensor,
    int_attr,
    last_dim,
    rank,
    trace_through,
)
from posrewrite.passes.onnx.rope.patterns import read_slice
from posrewrite.passes.onnx.rope.tables import NotUnderstood

#: ops a stored table is broadcast through before its rows are selected
_TABLE_BROADCAST_OPS = ("Expand", "Tile", "Unsqueeze", "Reshape", "Identity", "Cast")
_ROW_SELECT_OPS = ("Gather", "Slice", "Split", "GatherElements", "GatherND")


@dataclasses.dataclass(frozen=True)
class TrigSource:
    """cos/sin computed in the graph: the Cos/Sin node and any constant Mul after it."""

    value: ir.Value  # the site-level value (Cos output or its attention-factor Mul output)
    trig: ir.Node
    factor: float = 1.0
    scale: ir.Node | None = None

    @property
    def angles(self) -> ir.Value:
        return self.trig.inputs[0]


@dataclasses.dataclass(frozen=True)
class TableSource:
    """Rows of a constant table selected by position (and the column range holding this function)."""

    value: ir.Value  # the selected rows
    table: ir.Value
    select: ir.Node
    columns: tuple[int, int] | None = None
    factor: float = 1.0
    scale: ir.Node | None = None
    component: int | None = None  # element of a trailing axis of stacked (cos, sin) in the table


def trace_source(value: ir.Value, fold: ConstantEvaluator) -> TrigSource | TableSource:
    """The source of a cos or sin value; raises NotUnderstood with the reason."""
    factor, scale = 1.0, None
    v = value
    columns: tuple[int, int] | None = None
    pick: int | None = None  # element k of a trailing axis of stacked (cos, sin) parts picked by a Gather
    for _ in range(64):
        node = v.producer()
        if node is None:
            raise NotUnderstood(f"{value.name} is a graph input or constant without a position lookup")
        op = node.op_type
        if op in ("Cos", "Sin"):
            site_value = scale.outputs[0] if scale is not None else node.outputs[0]
            return TrigSource(site_value, node, factor, scale)
        if op == "Mul":
            a, b = node.inputs
            ca, cb = fold(a), fold(b)
            scalar = ca if ca is not None and ca.size == 1 else cb if cb is not None and cb.size == 1 else None
            if scalar is not None and scale is None:
                factor, scale = float(scalar.reshape(-1)[0]), node
                v = b if scalar is ca else a
                continue
            raise NotUnderstood(f"{value.name}: cos/sin scaled by a non-constant ({node.name})")
        if op == "Gather" and pick is None:
            k = _picked_element(node, fold)
            if k is not None:  # x[..., k] of stack((cos, sin), -1) (real pairs of a complex rotation)
                pick, v = k, node.inputs[0]
                continue
        if op == "Concat" and pick is not None:
            part = _stacked_part(node, pick)
            if part is None:
                raise NotUnderstood(f"{value.name}: element {pick} of {node.name} is not one stacked part")
            pick, v = None, part
            continue
        if op in ("GatherElements", "Gather") and _repeats_columns(node, fold):
            v = node.inputs[0]  # repeat_interleave of the columns (interleaved layouts)
            continue
        if op in _ROW_SELECT_OPS:
            data = node.inputs[0]
            table = None
            if data is not None and op != "Split":
                root = stored_table(data)
                if root is not None:
                    data, table = root, fold(root)
            if op in ("Slice", "Split") and _last_axis_op(node, fold):
                # a column range of a combined table (e.g. GPT-J's concat(sin, cos))
                rng = _column_range(node, v, fold)
                if rng is None:
                    raise NotUnderstood(f"{value.name}: column split {node.name} not understood")
                columns = rng if columns is None else (rng[0] + columns[0], rng[0] + columns[1])
                v = data
                continue
            if table is not None and table.ndim >= 3 and pick is not None and 0 <= pick < table.shape[-1]:
                # x[..., k] of rows of a table stacking (cos, sin) on its last axis (torchtune's cache)
                return TableSource(node.outputs[0], data, node, columns, factor, scale, component=pick)
            if table is not None and table.ndim >= 2:
                return TableSource(node.outputs[0], data, node, columns, factor, scale)
            v = data
            continue
        if op in VIEW_OPS:
            v = node.inputs[0]
            continue
        if op == "Concat" and len(node.inputs) >= 2 and all(i is node.inputs[0] for i in node.inputs):
            v = node.inputs[0]  # repeat of cos along an axis
            continue
        raise NotUnderstood(f"{value.name}: reached {op} ({node.name}) while looking for cos/sin")
    raise NotUnderstood(f"{value.name}: source too far upstream")


def _picked_element(node: ir.Node, fold: ConstantEvaluator) -> int | None:
    """k of a Gather taking one element (a scalar index) of the last axis, else None."""
    indices = fold(node.inputs[1]) if len(node.inputs) > 1 else None
    r = rank(node.inputs[0])
    axis = int_attr(node, "axis", 0)
    if indices is None or np.ndim(indices) != 0 or r is None or axis not in (-1, r - 1):
        return None
    k = int(indices)
    width = last_dim(node.inputs[0])
    return k if k >= 0 or width is None else k + width


def _stacked_part(node: ir.Node, k: int) -> ir.Value | None:
    """The k-th input of a Concat along the last axis whose inputs are each one element wide there."""
    r = rank(node.outputs[0])
    axis = int_attr(node, "axis", 0)
    if r is None or axis not in (-1, r - 1) or not 0 <= k < len(node.inputs):
        return None
    if any(last_dim(i) != 1 for i in node.inputs):
        return None
    return node.inputs[k]


def _repeats_columns(node: ir.Node, fold: ConstantEvaluator) -> bool:
    """A gather along the last axis with constant indices that only repeats columns in order."""
    indices = fold(node.inputs[1])
    if indices is None or indices.size == 0 or np.ndim(indices) == 0:
        return False  # a scalar index drops the axis (x[..., 0]): a selection, not a repeat
    axis = int_attr(node, "axis", 0)
    r = rank(node.inputs[0])
    if not (axis == -1 or (r is not None and axis == r - 1)):
        return False
    cols = np.asarray(indices).reshape(-1, indices.shape[-1])
    row = cols[0]
    return bool(np.all(cols == row)) and bool(np.all(np.diff(row) >= 0)) and row[0] == 0


def stored_table(value: ir.Value) -> ir.Value | None:
    """The initializer/Constant a table operand is broadcast from (through Expand/Tile/Unsqueeze...)."""
    v, _ = trace_through(value, _TABLE_BROADCAST_OPS, limit=16,
                         until=lambda x: const_tensor(x) is not None)
    return v if const_tensor(v) is not None else None


def _last_axis_op(node: ir.Node, fold: ConstantEvaluator) -> bool:
    if node.op_type == "Split":
        axis = int_attr(node, "axis", 0)
        r = rank(node.inputs[0])
        return axis == -1 or (r is not None and axis == r - 1)
    spec = read_slice(node, fold)
    return spec is not None and spec.axis == -1


def _column_range(node: ir.Node, out: ir.Value, fold: ConstantEvaluator) -> tuple[int, int] | None:
    if node.op_type == "Slice":
        spec = read_slice(node, fold)
        width = last_dim(node.inputs[0])
        end = spec.end if width is None else min(spec.end, width)
        return (spec.start, end) if spec.step == 1 else None
    sizes = fold(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if sizes is None and node.attributes.get("split") is not None:
        sizes = np.array(node.attributes["split"].value)
    index = list(node.outputs).index(out)
    if sizes is None:
        width = last_dim(node.inputs[0])
        if width is None:
            return None
        n = len(node.outputs)
        sizes = np.full(n, width // n)
    start = int(np.sum(sizes[:index]))
    return start, start + int(sizes[index])
