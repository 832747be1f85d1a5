"""What every rewriting pass leaves: a graph that can be sorted and whose every value is defined.

`check_graph(model, step)` raises `BrokenGraphError` (exit code 1: a bug in posrewrite, caught where it was made)
naming the step, when
- the nodes form a cycle (one is listed, node by node), or
- a node reads a value no one defines: not an input or initializer of its graph or of a graph enclosing it, and
  not an output of a node still in one of them (a node removed while something still reads it), or
- a graph output is such a value.

It reads no tensor data; time and memory are linear in the number of nodes and values.
"""

from __future__ import annotations

import onnx_ir as ir

from posrewrite.errors import PosrewriteError


class BrokenGraphError(PosrewriteError):
    """A pass left a graph with a cycle or an undefined value (a bug in that pass)."""


def _name(node: ir.Node) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def _cycle(graph: ir.Graph) -> list[ir.Node] | None:
    """A cycle among `graph`'s own nodes (dependencies through subgraphs' captured values included), or None."""
    nodes = list(graph)
    index = {id(n): k for k, n in enumerate(nodes)}

    def preds(node: ir.Node) -> list[int]:
        out = []
        stack = [node]
        while stack:  # a node with subgraphs depends on what its subgraphs read from this graph
            n = stack.pop()
            for v in n.inputs:
                p = v.producer() if v is not None else None
                if p is not None and id(p) in index:
                    out.append(index[id(p)])
            for attr in n.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    stack.extend(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    stack.extend(x for g in attr.value for x in g)
        return out

    edges = [preds(n) for n in nodes]
    state = [0] * len(nodes)  # 0 new, 1 on the path, 2 done
    for start in range(len(nodes)):
        if state[start]:
            continue
        path, its = [start], [iter(edges[start])]
        state[start] = 1
        while path:
            nxt = next(its[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                its.pop()
            elif state[nxt] == 1:
                return [nodes[k] for k in path[path.index(nxt):]]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                its.append(iter(edges[nxt]))
    return None


def check_input_graph(model: ir.Model, path: object) -> None:
    """The same check on a model as it was read, before any pass: a cycle or an undefined value there is the
    input's fault, not posrewrite's (`ModelLoadError`, exit 3), and must not be blamed on the first pass that
    modifies the model."""
    from posrewrite.errors import ModelLoadError

    try:
        check_graph(model, "the input model")
    except BrokenGraphError as exc:
        reason = str(exc).removeprefix("the input model left ").removesuffix(": a bug in posrewrite")
        raise ModelLoadError(f"{path}: not a valid ONNX graph: {reason}") from None


def check_graph(model: ir.Model, step: str) -> None:
    """Raises `BrokenGraphError` naming `step` when ``model``'s main graph or a subgraph has a cycle or reads an
    undefined value; returns None otherwise."""
    scopes: dict[int, set[int]] = {}

    def defined(graph: ir.Graph, outer: set[int]) -> set[int]:
        here = set(outer)
        here.update(id(v) for v in graph.inputs)
        here.update(id(v) for v in graph.initializers.values())
        here.update(id(o) for n in graph for o in n.outputs)
        scopes[id(graph)] = here
        return here

    def visit(graph: ir.Graph, outer: set[int]) -> None:
        here = defined(graph, outer)
        cycle = _cycle(graph)
        if cycle is not None:
            shown = " -> ".join(_name(n) for n in reversed(cycle[:8])) + (" -> ..." if len(cycle) > 8 else "")
            raise BrokenGraphError(f"{step} left a cycle in graph {graph.name or 'main'!r} ({len(cycle)} nodes: "
                                   f"{shown}): a bug in posrewrite")
        for node in graph:
            for k, v in enumerate(node.inputs):
                if v is not None and id(v) not in here:
                    raise BrokenGraphError(
                        f"{step} left {_name(node)} reading {v.name or 'an unnamed value'!r} (input {k}), which "
                        f"nothing in the graph defines: a bug in posrewrite")
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    visit(attr.value, here)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for g in attr.value:
                        visit(g, here)
        for v in graph.outputs:
            if id(v) not in here:
                raise BrokenGraphError(f"{step} left graph output {v.name!r} undefined: a bug in posrewrite")

    visit(model.graph, set())
