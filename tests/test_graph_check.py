"""posrewrite.graph_check: a pass that leaves a cycle or an undefined value is named (exit 1), on graphs built
here by hand; and the check runs after every ReportingPass that modified the model."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from posrewrite.graph_check import BrokenGraphError, check_graph


def _model(nodes, inputs, outputs) -> ir.Model:
    graph = ir.Graph(inputs, outputs, nodes=nodes, opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10)


def _x() -> ir.Value:
    return ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))


def test_a_sound_graph_passes():
    x = _x()
    a = ir.node("Relu", [x], name="a")
    b = ir.node("Neg", [a.outputs[0]], name="b")
    check_graph(_model([a, b], [x], [b.outputs[0]]), "step")


def test_a_cycle_is_named_with_the_step_and_its_nodes():
    x = _x()
    a = ir.node("Add", [x, x], name="a")
    b = ir.node("Neg", [a.outputs[0]], name="b")
    a.replace_input_with(1, b.outputs[0])  # a reads b, b reads a
    with pytest.raises(BrokenGraphError, match=r"MyPass left a cycle .*2 nodes.*Add 'a'.*Neg 'b'|MyPass left a cycle "
                                               r".*2 nodes.*Neg 'b'.*Add 'a'") as exc:
        check_graph(_model([a, b], [x], [b.outputs[0]]), "MyPass")
    assert exc.value.exit_code == 1


def test_a_value_whose_producer_was_removed_is_named():
    x = _x()
    a = ir.node("Relu", [x], name="a")
    b = ir.node("Neg", [a.outputs[0]], name="b")
    model = _model([a, b], [x], [b.outputs[0]])
    model.graph.remove(a)  # b still reads a's output
    with pytest.raises(BrokenGraphError, match=r"MyPass left Neg 'b' reading .* nothing in the graph defines"):
        check_graph(model, "MyPass")


def test_an_undefined_graph_output_is_named():
    x = _x()
    a = ir.node("Relu", [x], name="a")
    model = _model([a], [x], [a.outputs[0]])
    model.graph.remove(a, safe=False)
    with pytest.raises(BrokenGraphError, match="graph output"):
        check_graph(model, "MyPass")


def test_a_subgraph_may_read_the_outer_graph_but_not_an_undefined_value():
    x = _x()
    cond = ir.Value(name="c", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    inner = ir.node("Neg", [x], name="inner")  # reads the outer graph's input: defined
    then = ir.Graph([], [inner.outputs[0]], nodes=[inner], name="then")
    other = ir.node("Relu", [x], name="other")
    orelse = ir.Graph([], [other.outputs[0]], nodes=[other], name="else")
    if_node = ir.node("If", [cond], {"then_branch": then, "else_branch": orelse}, num_outputs=1, name="if")
    model = _model([if_node], [x, cond], [if_node.outputs[0]])
    check_graph(model, "step")
    stray = ir.Value(name="stray")
    inner.replace_input_with(0, stray)
    with pytest.raises(BrokenGraphError, match="'stray'"):
        check_graph(model, "step")


def test_every_reporting_pass_is_checked():
    from posrewrite.passes.onnx._infra import ReportingPass

    class Breaks(ReportingPass):
        def run(self, model):
            node = next(iter(model.graph))
            node.replace_input_with(0, node.outputs[0])  # reads itself
            return ir.passes.PassResult(model, True)

    x = _x()
    a = ir.node("Relu", [x], name="a")
    with pytest.raises(BrokenGraphError, match="Breaks left a cycle"):
        Breaks()(_model([a], [x], [a.outputs[0]]))
