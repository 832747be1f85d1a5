"""Models at opset 11 / 12, where Unsqueeze, Split and ReduceMean take `axes` / `split` as attributes.

Detection evaluates constant cones and probe inputs at the model's own opset (an opset-11 `Unsqueeze(axes=)`
run at a later opset raised TypeError and the site was lost). Expected values come from the numbers the
models were built with (fixtures/old_opsets.py), not from the graphs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from fixtures.old_opsets import alibi_attention, alibi_slopes, rope_attention
from posrewrite import api
from posrewrite.passes.onnx.detect import detect_other_encodings

OPSETS = [11, 12]


def _save(proto: onnx.ModelProto, path) -> str:
    onnx.save(proto, str(path))
    return str(path)


@pytest.mark.parametrize("opset", OPSETS)
def test_rope_angles_through_an_old_unsqueeze(opset, tmp_path):
    """inv_freq = 1 / base ** Unsqueeze(arange(0, d, 2) / d, axes=[0]): folded at the model's opset."""
    base, head_dim = 5000.0, 8
    path = _save(rope_attention(opset, base=base, head_dim=head_dim), tmp_path / "rope.onnx")
    found = api.inspect(path)
    assert [type(s).__name__ for s in found.sites] == ["RopeSite"], found.refusals
    site = found.sites[0]
    assert site.base == pytest.approx(base, rel=1e-5)
    assert site.rotary_dim == head_dim


@pytest.mark.parametrize("opset", OPSETS)
def test_alibi_probe_through_an_old_unsqueeze(opset, tmp_path):
    """slopes * Unsqueeze(arange(seq), axes=[0, 1]): the probe evaluates the key positions at the model's opset."""
    heads = 4
    path = _save(alibi_attention(opset, heads=heads), tmp_path / "alibi.onnx")
    sites, refusals = detect_other_encodings(ir.load(path))
    assert refusals == []
    assert [s.kind for s in sites] == ["alibi"]
    site = sites[0]
    assert site.source == "computed" and site.num_heads == heads
    np.testing.assert_allclose(site.slopes, alibi_slopes(heads), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# fusing: the opset is raised by onnxscript's version converter (opset 23 for --fuse onnx, 13 for --fuse ort)
# ---------------------------------------------------------------------------------------------------------------

TOL = 1e-5  # of the output's magnitude: fp32 round-off of a few reordered products and sums


def _run(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _default_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("target,opset_after", [("onnx", 23), ("ort", 13)])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("opset", OPSETS)
def test_fused_old_opset_model_equals_the_original(opset, layout, target, opset_after, tmp_path):
    """Unsqueeze(axes=) in the angles and (interleaved) inside the rotation, Split(split=) of qkv and
    ReduceMean(axes=) of the norm around it: converted, fused, valid for onnx's full check, same outputs."""
    src = _save(rope_attention(opset, layout=layout), tmp_path / "src.onnx")
    out = tmp_path / f"fused-{target}.onnx"
    result = api.rewrite(src, output=out, fuse=target)
    assert result.modified
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    assert _default_opset(proto) == opset_after
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("RotaryEmbedding") == 2 and "Cos" not in ops and "Sin" not in ops
    for n in (1, 7, 33):
        x = np.random.default_rng(n).standard_normal((2, n, 16)).astype(np.float32)
        ref = _run(src, x)
        assert float(np.max(np.abs(_run(out, x) - ref))) <= TOL * float(np.max(np.abs(ref)))


def _with_unconvertible_op(tmp_path) -> str:
    """The opset-12 RoPE model taken to opset 18 by onnx's own converter, plus a GroupNormalization whose input
    has no shape: onnxscript's converter cannot tell whether its scale is per group (opset 18) or per channel."""
    from onnx import TensorProto, helper, version_converter

    proto = version_converter.convert_version(rope_attention(12), 18)
    g = proto.graph
    g.input.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    g.initializer.extend([onnx.numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("gs", "gb")])
    g.node.append(helper.make_node("GroupNormalization", ["z", "gs", "gb"], ["zn"], num_groups=2))
    g.output.append(helper.make_tensor_value_info("zn", TensorProto.FLOAT, None))
    path = str(tmp_path / "gn.onnx")
    onnx.save(proto, path)
    return path


def test_fuse_onnx_refuses_an_op_the_converter_cannot_convert(tmp_path, capsys):
    from posrewrite.cli import main
    from tests.test_cli_errors import assert_one_error_line

    src = _with_unconvertible_op(tmp_path)
    out = tmp_path / "out.onnx"
    assert main([src, "--fuse", "onnx", "-o", str(out)]) == 2
    assert_one_error_line(capsys.readouterr().err, "GroupNormalization")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# the opset raise itself
# ---------------------------------------------------------------------------------------------------------------


def _one_node_model(opset: int, node: onnx.NodeProto, inputs: dict[str, list | None], out_shape) -> ir.Model:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, out_shape)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return ir.from_proto(proto)


def test_raise_opset_converts_group_normalization_scale_to_per_channel():
    """GroupNormalization-18 takes scale/bias per group, -21 per channel: the converter expands them; the
    result equals group normalisation written out here in numpy."""
    import onnxruntime as ort
    from onnx import helper

    from posrewrite.passes.onnx.rope import fuse as fuse_rotary

    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2, epsilon=1e-5)
    model = _one_node_model(18, node, {"x": [2, 4, 3], "s": [2], "b": [2]}, [2, 4, 3])
    assert fuse_rotary.raise_opset(model, 23)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert _default_opset(proto) == 23
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3)).astype(np.float32)
    s, b = np.array([1.5, -0.5], np.float32), np.array([0.1, 0.2], np.float32)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "s": s, "b": b})[0]
    groups = x.reshape(2, 2, -1).astype(np.float64)
    norm = ((groups - groups.mean(-1, keepdims=True)) / np.sqrt(groups.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    ref = norm * np.repeat(s, 2)[None, :, None] + np.repeat(b, 2)[None, :, None]
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_raise_opset_refuses_what_onnx_converter_cannot_convert_and_leaves_the_model_untouched():
    """An opset-8 Scan with sequence_lens (removed at 9) stops onnx's converter: refused by name, model unchanged."""
    from onnx import TensorProto, helper

    from posrewrite import errors
    from posrewrite.passes.onnx.rope import fuse as fuse_rotary

    f = TensorProto.FLOAT
    body = helper.make_graph(
        [helper.make_node("Add", ["s", "xt"], ["s2"]), helper.make_node("Identity", ["s2"], ["yt"])], "body",
        [helper.make_tensor_value_info("s", f, [2]), helper.make_tensor_value_info("xt", f, [2])],
        [helper.make_tensor_value_info("s2", f, [2]), helper.make_tensor_value_info("yt", f, [2])],
    )
    node = helper.make_node("Scan", ["lens", "s0", "xs"], ["sN", "ys"], num_scan_inputs=1, body=body)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("lens", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("s0", f, [1, 2]), helper.make_tensor_value_info("xs", f, [1, 3, 2])],
        [helper.make_tensor_value_info("sN", f, [1, 2]), helper.make_tensor_value_info("ys", f, [1, 3, 2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    model = ir.from_proto(proto)
    with pytest.raises(errors.UsageError, match="Scan.*--fuse ort"):
        fuse_rotary.raise_opset(model, 23)
    assert model.opset_imports[""] == 8 and [n.op_type for n in model.graph] == ["Scan"]
