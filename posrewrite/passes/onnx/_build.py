"""Building new nodes and constants into an onnx_ir graph in topological order; replacing an initializer and
the slice bounds computed from its length when a table grows."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

_counter = itertools.count()


#: the name prefix of the nodes the attention-level extension writes (attention/extend.py): the rotations it adds
#: (ReRoPE's, SelfExtend's second position system) are the extension's, recorded by its marker, not the model's RoPE
EXTEND_NODE_PREFIX = "posrewrite_extend"


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
    """posrewrite's one node builder: new nodes recorded on an onnx_ir tape (`ir.tape.Tape`) and put into the
    graph in one go by `commit`, before ``anchor`` (whose inputs all precede it), or at the end of the graph when
    there is no anchor (the caller sorts the graph afterwards).

    With a ``stem``, every node, its output and every new constant get a unique name from it (constants are
    initializers); without one, nodes and outputs are left unnamed and constants are Constant nodes (the form of
    onnxscript's own rewrites, for nodes written beside them)."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node | None = None, stem: str | None = None) -> None:
        self.graph = graph
        self.anchor = anchor
        self.stem = stem
        self.tape = ir.tape.Tape()

    @property
    def nodes(self) -> tuple[ir.Node, ...]:
        """The nodes written since the last `commit`, in order."""
        return tuple(self.tape.nodes)

    def const(self, array, dtype: ir.DataType | None = None) -> ir.Value:
        if self.stem is None:
            tensor = np.asarray(array) if dtype is None else np.asarray(array).astype(dtype.numpy())
            return self.op("Constant", value=ir.tensor(tensor))
        return add_initializer(self.graph, np.asarray(array), f"{self.stem}_c", dtype)

    def op(self, op_type: str, *inputs: ir.Value | None, _domain: str = "", _name: str | None = None,
           **attributes) -> ir.Value:
        """One node ``op_type(*inputs, **attributes)`` (in ``_domain``; named ``_name`` instead of from the stem);
        its output."""
        if op_type == "Shape" and ("start" in attributes or "end" in attributes) and self._opset() < 15:
            # Shape's start/end attributes are opset 15; before that they are ignored (the whole shape)
            start, end = int(attributes.pop("start", 0)), int(attributes.pop("end", 1 << 62))
            whole = self.op("Shape", *inputs)
            return self.op(
                "Slice", whole, self.const(np.array([start], np.int64)), self.const(np.array([end], np.int64))
            )
        name = _name
        if name is None and self.stem is not None:
            name = unique_name(self.graph, f"{self.stem}_{op_type}")
        out = self.tape.op(op_type, list(inputs), attributes or None, domain=_domain, name=name)
        if name is not None:
            out.name = name + "_out"
        return out

    def op_multi(self, op_type: str, *inputs: ir.Value | None, _num_outputs: int, _domain: str = "",
                 _name: str | None = None, **attributes) -> tuple[ir.Value, ...]:
        """One node with ``_num_outputs`` outputs (named ``<node>_out`` for one, ``<node>_out<k>`` for several)."""
        name = _name
        if name is None and self.stem is not None:
            name = unique_name(self.graph, f"{self.stem}_{op_type}")
        outs = tuple(self.tape.op_multi_out(op_type, list(inputs), attributes or None, num_outputs=_num_outputs,
                                            domain=_domain, name=name))
        if name is not None:
            for k, out in enumerate(outs):
                out.name = f"{name}_out{k}" if _num_outputs > 1 else f"{name}_out"
        return outs

    def clone(self, target: ir.Value, subs: dict[int, ir.Value], allowed: set[int] | None,
              memo: dict[int, ir.Value]) -> ir.Value:
        """``target`` recomputed with the values in ``subs`` (by id) replaced; only nodes in ``allowed`` (all when
        None) are cloned, the rest are kept as they are. Iterative, in dependency order. The clones' outputs keep
        their dtypes and lose their shapes (a clone may run on other lengths)."""
        order: list[ir.Node] = []
        state: dict[int, int] = {}
        stack: list[tuple[ir.Node, bool]] = []

        def visit(value: ir.Value | None) -> None:
            if value is None or id(value) in subs or id(value) in memo:
                return
            node = value.producer()
            if node is None or (allowed is not None and id(node) not in allowed) or id(node) in state:
                return
            stack.append((node, False))

        visit(target)
        while stack:
            node, done = stack.pop()
            if done:
                state[id(node)] = 2
                order.append(node)
                continue
            if id(node) in state:
                continue
            state[id(node)] = 1
            stack.append((node, True))
            for inp in node.inputs:
                visit(inp)

        def mapped(value: ir.Value | None) -> ir.Value | None:
            if value is None:
                return None
            if id(value) in subs:
                return subs[id(value)]
            return memo.get(id(value), value)

        for node in order:
            inputs = [mapped(v) for v in node.inputs]
            if all(a is b for a, b in zip(inputs, node.inputs, strict=True)):
                for out in node.outputs:
                    memo[id(out)] = out
                continue
            name = unique_name(self.graph, f"{self.stem}_{node.op_type}") if self.stem is not None else None
            outs = self.tape.op_multi_out(node.op_type, inputs, dict(node.attributes), domain=node.domain,
                                          num_outputs=len(node.outputs), version=node.version, name=name)
            for old_out, new_out in zip(node.outputs, outs, strict=True):
                if name is not None:
                    new_out.name = name + f"_out{old_out.index()}"
                new_out.dtype = old_out.dtype
                new_out.shape = None
                memo[id(old_out)] = new_out
        return mapped(target)

    def _opset(self) -> int:
        imports = self.graph.opset_imports
        return int(imports.get("", imports.get("ai.onnx", 21)))

    def commit(self) -> None:
        nodes = list(self.tape.nodes)
        if nodes:
            if self.anchor is not None:
                self.graph.insert_before(self.anchor, nodes)
            else:
                self.graph.extend(nodes)
        self.tape = ir.tape.Tape()


def _unread(node: ir.Node, outputs: frozenset[ir.Value]) -> bool:
    return not any(out in outputs or out.uses() for out in node.outputs)


def unread_nodes(graph: ir.Graph) -> frozenset[int]:
    """Ids of the nodes of ``graph`` whose outputs nothing reads (and that give no graph output): dead code as the
    graph holds it now (what `remove_made_dead` leaves alone)."""
    outputs = frozenset(graph.outputs)
    return frozenset(id(n) for n in graph if _unread(n, outputs))


def remove_made_dead(graph: ir.Graph, before: frozenset[int]) -> int:
    """Removes the nodes of ``graph`` that a rewrite left unread: every node nothing reads now, but those already
    unread before it (``before``, from `unread_nodes`), in one sweep from the graph's end (a node read only by
    removed nodes after it goes too). What the rewrite replaced goes with it; dead code it found, the other nodes'
    inputs and outputs and the initializers are left to the caller's cleanup (`cleanup_passes`). Returns how
    many nodes went."""
    outputs = frozenset(graph.outputs)
    removed = 0
    for node in reversed(list(graph)):
        if id(node) not in before and _unread(node, outputs):
            graph.remove(node, safe=True)
            removed += 1
    return removed


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


def divide_input(graph: ir.Graph, node: ir.Node, value: ir.Value, divisor: float, stem: str) -> None:
    """Makes `node` read `value / divisor` where it read `value` (a Mul by the reciprocal, in value's dtype,
    inserted before `node`); other readers of `value` are left as they are."""
    k = list(node.inputs).index(value)
    w = NodeWriter(graph, node, stem)
    scaled = w.op("Mul", value, w.const(np.array(1.0 / divisor), dtype=value.dtype))
    scaled.dtype = value.dtype
    w.commit()
    node.replace_input_with(k, scaled)


def replace_initializer(graph: ir.Graph, old: ir.Value, array: np.ndarray) -> ir.Value:
    """A new initializer holding `array` (in `old`'s dtype) read everywhere `old` was; `old` is dropped when
    nothing reads it any more."""
    new = add_initializer(graph, array, (old.name or "table").replace(".", "_"), old.dtype)
    ir.convenience.replace_all_uses_with(old, new)
    for k, out in enumerate(graph.outputs):
        if out is old:
            graph.outputs[k] = new
    if old.name in graph.initializers and not list(old.uses()):
        graph.initializers.pop(old.name)
    return new


_LENGTH_OPS = frozenset({"Add", "Sub", "Mul", "Max", "Min", "Neg", "Reshape", "Unsqueeze", "Squeeze", "Concat", "Cast"})


def retarget_length(graph: ir.Graph, slice_node: ir.Node, old: int, new: int) -> int:
    """Slice bounds computed from a table's length (MPT: start = max(0, L - key_length)) are recomputed
    with the new length: the arithmetic path from a constant equal to `old` to the bound is cloned with
    `new` in its place (the original nodes may serve other consumers). Returns how many bounds moved."""
    moved = 0
    for k in (1, 2):
        if k >= len(slice_node.inputs) or slice_node.inputs[k] is None:
            continue
        bound = slice_node.inputs[k]
        path = _path_to_constant(bound, old)
        if path is None:
            continue
        w = NodeWriter(graph, slice_node, "alibi_len")
        new_bound = _clone_with(w, bound, path, old, new, {})
        w.commit()
        slice_node.replace_input_with(k, new_bound)
        moved += 1
    return moved


def _clone_with(w: NodeWriter, v: ir.Value, path: set[ir.Node], old: int, new: int, clones: dict) -> ir.Value:
    """Copy of the computation of `v` restricted to `path`, with the constant `old` replaced by `new`."""
    if id(v) in clones:
        return clones[id(v)]
    c = v.const_value
    if c is not None and c.size == 1 and int(c.numpy().reshape(-1)[0]) == old:
        out = w.const(np.full(tuple(c.shape), new, dtype=c.numpy().dtype))
    elif v.producer() is not None and v.producer() in path:
        node = v.producer()
        attrs = {a.name: a.value for a in node.attributes.values()}
        inputs = [_clone_with(w, i, path, old, new, clones) if i is not None else None for i in node.inputs]
        out = w.op(node.op_type, *inputs, **attrs)
        out.dtype = v.dtype
    else:
        out = v
    clones[id(v)] = out
    return out


def _path_to_constant(value: ir.Value, target: int, depth: int = 8) -> set[ir.Node] | None:
    """Nodes on integer-arithmetic paths from a scalar constant equal to `target` to `value`."""
    c = value.const_value
    if c is not None:
        return set() if c.size == 1 and int(c.numpy().reshape(-1)[0]) == target else None
    node = value.producer()
    if node is None or node.op_type not in _LENGTH_OPS or depth == 0:
        return None
    found: set[ir.Node] | None = None
    for inp in node.inputs:
        if inp is None:
            continue
        sub = _path_to_constant(inp, target, depth - 1)
        if sub is not None:
            found = (found or set()) | sub
    return None if found is None else found | {node}
