"""Building new nodes and constants into an onnx_ir graph in topological order."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

_counter = itertools.count()


def unique_name(graph: ir.Graph, stem: str) -> str:
    taken = {v.name for v in graph.initializers.values()}
    while True:
        name = f"{stem}_posrewrite{next(_counter)}"
        if name not in taken:
            return name


def add_initializer(graph: ir.Graph, array: np.ndarray, stem: str, dtype: ir.DataType | None = None) -> ir.Value:
    """A new initializer holding `array` (converted to `dtype` when given)."""
    name = unique_name(graph, stem)
    if dtype is not None and dtype == ir.DataType.BFLOAT16:
        import ml_dtypes

        tensor = ir.tensor(np.asarray(array, dtype=np.float32).astype(ml_dtypes.bfloat16), dtype=dtype, name=name)
    elif dtype is not None:
        tensor = ir.tensor(np.asarray(array).astype(dtype.numpy()), dtype=dtype, name=name)
    else:
        tensor = ir.tensor(np.asarray(array), name=name)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape.dims), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


class NodeWriter:
    """Creates nodes that are inserted before `anchor` (whose inputs all precede it) in one go."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, stem: str) -> None:
        self.graph = graph
        self.anchor = anchor
        self.stem = stem
        self.nodes: list[ir.Node] = []

    def const(self, array, dtype: ir.DataType | None = None) -> ir.Value:
        return add_initializer(self.graph, np.asarray(array), f"{self.stem}_c", dtype)

    def op(self, op_type: str, *inputs: ir.Value | None, **attributes) -> ir.Value:
        if op_type == "Shape" and ("start" in attributes or "end" in attributes) and self._opset() < 15:
            # Shape's start/end attributes are opset 15; before that they are ignored (the whole shape)
            start, end = int(attributes.pop("start", 0)), int(attributes.pop("end", 1 << 62))
            whole = self.op("Shape", *inputs)
            return self.op(
                "Slice", whole, self.const(np.array([start], np.int64)), self.const(np.array([end], np.int64))
            )
        name = unique_name(self.graph, f"{self.stem}_{op_type}")
        node = ir.node(op_type, list(inputs), attributes or None, name=name)
        node.outputs[0].name = node.name + "_out"
        self.nodes.append(node)
        return node.outputs[0]

    def _opset(self) -> int:
        imports = self.graph.opset_imports
        return int(imports.get("", imports.get("ai.onnx", 21)))

    def commit(self) -> None:
        if self.nodes:
            self.graph.insert_before(self.anchor, self.nodes)
            self.nodes = []


def insert_after_and_redirect(graph: ir.Graph, value: ir.Value, op_type: str, other: ir.Value, stem: str) -> ir.Node:
    """Inserts `op_type(value, other)` right after value's producer and makes every other use read it."""
    uses = list(value.uses())
    node = ir.node(op_type, [value, other], name=unique_name(graph, stem))
    node.outputs[0].name = node.name + "_out"
    node.outputs[0].dtype = value.dtype
    node.outputs[0].shape = value.shape
    graph.insert_after(value.producer(), node)
    for use in uses:
        use.node.replace_input_with(use.idx, node.outputs[0])
    for i, out in enumerate(graph.outputs):
        if out is value:
            graph.outputs[i] = node.outputs[0]
    return node
