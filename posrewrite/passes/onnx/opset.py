"""Raising a model's default-domain opset with onnxscript's version converter, in place.

`convert_opset(model, target)` runs `onnxscript.version_converter.ConvertVersionPass(target, fallback=True)`
(onnxscript's adapters from opset 18 on, onnx's C API converter below: ``Unsqueeze(axes=)``, ``Split(split=)``,
``Reduce*(axes=)`` become inputs) on a clone of the model, and refuses, naming the ops, when the converter
skipped a node or left one that is not valid at the target opset (`onnx.checker.check_node`). Only then is the
model itself changed: each node the converter rewrote is rewritten in place (same node object when the op stays
the same, so handles that detection keeps to nodes and values stay valid), new nodes (the Constants holding
`axes`) are inserted before it, and every other node only changes version. Weights are never read: the clone
shares the model's tensors, and the converter leaves big initializers out of what it serialises.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass
from onnxscript.version_converter import ConvertVersionPass

from posrewrite import errors

_DEFAULT = ("", "ai.onnx")


class OpsetConversionError(errors.UsageError):
    """The version converter cannot take every node of the model to the target opset (the message names them)."""


def model_onnx_opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def convert_opset(model: ir.Model, target: int) -> bool:
    """Raises the default-domain opset of `model` to `target` in place; False when it already was at least that.

    Raises OpsetConversionError (the model untouched) when a node cannot be converted.
    """
    current = model_onnx_opset(model)
    if current is None:
        model.opset_imports[""] = target
        return False
    if current >= target:
        return False
    if any(n.domain in _DEFAULT for fn in model.functions.values() for n in ir.traversal.RecursiveGraphIterator(fn)):
        raise OpsetConversionError(
            f"opset {current} -> {target}: the model has local functions, which the version converter inlines; "
            "they are not converted in place"
        )
    NameFixPass()(model)  # every value named: the converted clone is matched to the model by value names
    converted = model.clone()
    problems = _run_converter(converted, target)
    if model_onnx_opset(converted) != target and not problems:
        problems["(model)"] = f"the converter left the model at opset {model_onnx_opset(converted)}"
    problems.update((op, why) for op, why in _invalid_nodes(converted, target).items() if op not in problems)
    if "(model)" in problems:  # onnx's C API converter failed as a whole: name the op its message is about
        why = problems.pop("(model)")
        ops = {n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain in _DEFAULT}
        named = sorted((op for op in ops if op.lower() in why.lower()), key=len, reverse=True)
        problems[named[0] if named else "the model"] = why
    if problems:
        what = "; ".join(f"{op}: {why}" for op, why in sorted(problems.items()))
        raise OpsetConversionError(f"opset {current} -> {target} is not possible for {what}")
    _apply(model, converted)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain in _DEFAULT:
            node.version = None
    model.opset_imports[""] = target
    model.opset_imports.pop("ai.onnx", None)
    needed_ir = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)])
    model.ir_version = max(model.ir_version or 0, needed_ir)
    return True


# ---------------------------------------------------------------------------------------------------------------
# running the converter and reading its verdict
# ---------------------------------------------------------------------------------------------------------------


class _Collect(logging.Handler):
    """The version converter reports a node it cannot convert as a logged warning, not an exception."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.problems: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = str(record.msg)
        if msg.startswith("Skipping version conversion for node") and len(record.args or ()) >= 2:
            op, why = record.args[0], record.args[1]
            self.problems.setdefault(str(op), _one_line(why))
        elif msg.startswith("Failed to convert"):
            why = record.exc_info[1] if record.exc_info else record.getMessage()
            self.problems.setdefault("(model)", _one_line(why))


def _run_converter(model: ir.Model, target: int) -> dict[str, str]:
    """Runs the converter on `model`; returns {op: why} for what it reported it could not convert.

    Its reports are log records, so they are collected here even where logging is switched off (the CLI does
    that): for the run, the libraries' loggers send their records to the collector only, never to stderr.
    """
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    disabled = logging.root.manager.disable
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
        lg.propagate = False
    logging.disable(logging.NOTSET)
    try:
        ConvertVersionPass(target, fallback=True)(model)
    except Exception as exc:  # noqa: BLE001 - the converter's error becomes the refusal's reason
        handler.problems.setdefault("(model)", _one_line(exc))
    finally:
        logging.disable(disabled)
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
    return handler.problems


def _invalid_nodes(model: ir.Model, target: int) -> dict[str, str]:
    """Default-domain nodes that do not fit their schema at `target` (what the converter left unconverted)."""
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)])
    ctx.opset_imports = {"": target}
    bad: dict[str, str] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in _DEFAULT or node.op_type in bad or node.op_type == "Constant" or _has_graph(node):
            continue  # a subgraph's nodes are checked one by one; a Constant is valid at every opset
        proto = ir.serde.serialize_node(node)
        proto.domain = ""
        try:
            onnx.checker.check_node(proto, ctx)
        except onnx.checker.ValidationError as exc:
            bad[node.op_type] = _one_line(str(exc).replace("==> Context:", "").strip())
    return bad


def _one_line(text) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(text).__name__


def _has_graph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


# ---------------------------------------------------------------------------------------------------------------
# carrying the converter's rewrites over to the model
# ---------------------------------------------------------------------------------------------------------------


def _apply(model: ir.Model, converted: ir.Model) -> None:
    values: dict[str, ir.Value] = {}
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    graphs = [model.graph] + [g for n in nodes for a in n.attributes.values() for g in _graphs(a)]
    for graph in graphs:
        values.update((v.name, v) for v in graph.inputs)
        values.update(graph.initializers)
    values.update((v.name, v) for n in nodes for v in n.outputs)
    producers = {v.name: n for n in ir.traversal.RecursiveGraphIterator(converted.graph) for v in n.outputs}
    for node in nodes:
        if node.domain not in _DEFAULT or not node.outputs:
            continue
        new = producers.get(node.outputs[0].name)
        if new is None or _same(node, new):
            continue  # unchanged, or dead code the converter dropped (removed with the fusion's cleanup)
        copier = _Copier(node, values)
        if new.op_type == node.op_type and len(new.outputs) == len(node.outputs):
            inputs = [copier.value(v) for v in new.inputs]
            node.resize_inputs(len(inputs))
            for k, v in enumerate(inputs):
                node.replace_input_with(k, v)
            for name in [n for n, a in node.attributes.items() if not _graphs(a)]:
                node.attributes.pop(name)
            for a in new.attributes.values():
                if not _graphs(a):
                    node.attributes[a.name] = ir.Attr(a.name, a.type, a.value)
        else:  # the op itself changed: the node is replaced, its outputs keep their names
            replacement = copier.node(new, insert=False)
            ir.convenience.replace_nodes_and_values(
                node.graph, node, [node], [replacement], list(node.outputs), list(replacement.outputs)
            )


class _Copier:
    """Copies nodes of the converted clone that the model lacks (upstream first) before `anchor`."""

    def __init__(self, anchor: ir.Node, values: dict[str, ir.Value]) -> None:
        self.anchor = anchor
        self.values = values

    def value(self, v: ir.Value | None) -> ir.Value | None:
        if v is None:
            return None
        if v.name in self.values:
            return self.values[v.name]
        producer = v.producer()
        if producer is None:
            raise OpsetConversionError(f"the version converter created an input {v.name!r} the model does not have")
        copy = self.node(producer, insert=True)
        return copy.outputs[list(producer.outputs).index(v)]

    def node(self, src: ir.Node, *, insert: bool) -> ir.Node:
        copy = ir.Node(
            src.domain,
            src.op_type,
            [self.value(v) for v in src.inputs],
            attributes=[ir.Attr(a.name, a.type, a.value) for a in src.attributes.values()],
            num_outputs=len(src.outputs),
            name=src.name,
        )
        for out, src_out in zip(copy.outputs, src.outputs, strict=True):
            out.name = src_out.name if src_out.name not in self.values else None
            if src_out.type is not None:
                out.type = src_out.type
            if src_out.shape is not None:
                out.shape = src_out.shape
            if out.name is not None:
                self.values[out.name] = out
        if insert:
            self.anchor.graph.insert_before(self.anchor, copy)
        return copy


def _graphs(attr: ir.Attr) -> list[ir.Graph]:
    if attr.type == ir.AttributeType.GRAPH:
        return [attr.value]
    if attr.type == ir.AttributeType.GRAPHS:
        return list(attr.value)
    return []


def _same(node: ir.Node, new: ir.Node) -> bool:
    if node.op_type != new.op_type or len(node.inputs) != len(new.inputs):
        return False
    if [v.name if v is not None else None for v in node.inputs] != [
        v.name if v is not None else None for v in new.inputs
    ]:
        return False
    if set(node.attributes) != set(new.attributes):
        return False
    if node.op_type == "Constant":
        return True  # its value is never converted (and may be big: not read to compare)
    for name, a in node.attributes.items():
        b = new.attributes[name]
        if a.type != b.type:
            return False
        if _graphs(a):
            continue  # subgraph nodes are compared one by one
        if a.type in (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS):
            ta = a.value if a.type == ir.AttributeType.TENSORS else [a.value]
            tb = b.value if b.type == ir.AttributeType.TENSORS else [b.value]
            if len(ta) != len(tb) or not all(
                x.dtype == y.dtype and np.array_equal(x.numpy(), y.numpy()) for x, y in zip(ta, tb, strict=True)
            ):
                return False
        elif a.value != b.value:
            return False
    return True
