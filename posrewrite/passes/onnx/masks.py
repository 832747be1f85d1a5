"""Constant causal / sliding-window masks baked at the training length, rebuilt for a longer one.

GPT-Neo's ``bias`` buffer and older GPT-2 and GPT-NeoX exports hold a [.., T, T] constant mask read through
Slice; it fails past T like a position table. `extend_square_masks` regenerates it by the same rule in
i - j (`rewrite --max-positions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from posrewrite.errors import UsageError
from posrewrite.limits import MEMORY_BUDGET_BYTES, fits_budget
from posrewrite.passes.onnx._build import replace_initializer, retarget_length
from posrewrite.passes.onnx._infra import PipelineContext, ReportingPass

__all__ = ["ExtendSquareMasksPass", "extend_square_masks"]


class ExtendSquareMasksPass(ReportingPass):
    """--max-positions: causal masks baked as [T, T] constants grow to ``rows`` (`extend_square_masks`)."""

    def __init__(self, *, rows: int, context: PipelineContext | None = None, preface: Sequence[str] = ()) -> None:
        super().__init__(context=context, preface=preface)
        if int(rows) < 1:
            raise ValueError("rows must be positive")
        self.rows = int(rows)

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        self.changes.extend(extend_square_masks(model.graph, self.rows))
        self.context.report.other_changes.extend(self.changes)
        return ir.passes.PassResult(model, bool(self.changes))


def _toeplitz_values(square: np.ndarray) -> np.ndarray | None:
    """f(d) for d = -(T-1)..T-1 when square[i, j] == f(i - j) for every i, j; None otherwise."""
    t = square.shape[0]
    f = np.concatenate([square[0, :0:-1], square[:, 0]])  # d = -(T-1)..-1 from row 0, then 0..T-1
    i, j = np.indices(square.shape)
    if not np.array_equal(f[i - j + t - 1], square):
        return None
    return f


def extend_square_masks(graph: ir.Graph, rows: int) -> list[str]:
    """Constant causal / sliding-window masks baked at the training length (GPT-Neo's ``bias`` buffer, older
    GPT-2 and GPT-NeoX exports): a [.., T, T] constant with two values that depends only on i - j and is
    read through Slice fails past T like a position table. It is rebuilt at `rows` x `rows` by the same rule
    (distances beyond T-1 take the value at T-1: causal stays causal, a window narrower than T stays
    closed). Returns one line per extended mask."""
    changes = []
    for value in list(graph.initializers.values()):
        shape = value.shape
        if value.const_value is None or shape is None or len(shape) < 2 or not shape.is_static():
            continue
        t = shape[-1]
        if shape[-2] != t or t >= rows or t < 2 or any(d != 1 for d in list(shape)[:-2]):
            continue
        uses = list(value.uses())
        if not uses or any(_through_users(u.node) != "Slice" for u in uses):
            continue
        square = value.const_value.numpy().reshape(t, t)
        if np.unique(square).size > 2:
            continue
        f = _toeplitz_values(square)
        if f is None:
            continue
        if not fits_budget((rows, rows), square.dtype.itemsize):
            raise UsageError(
                f"--max-positions {rows}: the {t}x{t} mask {value.name} would become {rows}x{rows} "
                f"({rows * rows * square.dtype.itemsize / 2**30:.3g} GiB), over the memory budget of "
                f"{MEMORY_BUDGET_BYTES >> 20} MiB (see README, Reliability)"
            )
        # g[k] = the value at distance i - j = k - (rows - 1); row i of the new mask is g[i + rows - 1 - j] for
        # j = 0..rows-1, a window of g reversed: only the rows x rows result is allocated
        g = f[np.clip(np.arange(-(rows - 1), rows), -(t - 1), t - 1) + t - 1]
        windows = np.lib.stride_tricks.sliding_window_view(g[::-1], rows)[::-1]
        new = np.ascontiguousarray(windows, dtype=square.dtype).reshape(tuple(list(shape)[:-2]) + (rows, rows))
        replaced = replace_initializer(graph, value, new)
        slices = _forget_shapes(replaced, t)
        moved = sum(retarget_length(graph, node, t, rows) for node in slices)  # bounds like min(seq, T)
        bounds = f", {moved} slice bound(s) computed from {t} moved to {rows}" if moved else ""
        changes.append(f"mask {value.name} -> {replaced.name}: {t}x{t} -> {rows}x{rows} (same rule in i - j){bounds}")
    return changes


def _forget_shapes(value: ir.Value, old: int, depth: int = 4) -> list[ir.Node]:
    """Shapes recorded by the exporter on the slices of a grown constant may hold its old size as a static
    dim, which onnxruntime would trust: they are dropped (onnxruntime infers them again). Returns the
    Slice nodes met on the way."""
    slices: list[ir.Node] = []
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if node.op_type not in ("Slice", "Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze"):
                    continue
                if node.op_type == "Slice" and node not in slices:
                    slices.append(node)
                for out in node.outputs:
                    if out.shape is not None and any(d == old for d in out.shape):
                        out.shape = None
                    nxt.append(out)
        frontier = nxt
    return slices


def _through_users(node: ir.Node) -> str:
    """The op type reached from `node` through shape-only ops (Slice of a Cast of a mask counts as Slice)."""
    for _ in range(4):
        if node.op_type not in ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze"):
            return node.op_type
        users = [u.node for out in node.outputs for u in out.uses()]
        if len(users) != 1:
            return node.op_type
        node = users[0]
    return node.op_type
