"""torch's NaN guard on attention probabilities moved to the output rows (`SoftmaxGuardPass`, with ``--fuse``).

The reference is the model as torch exported it, run in onnxruntime: the rewritten graph must give the same
outputs, padding rows (every key masked: NaN before the guard) included, and must leave alone a guard whose
scores it cannot prove finite."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from posrewrite.passes.onnx.attention.softmax_guard import SoftmaxGuardPass, move_softmax_guards

pytest.importorskip("torch")


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


def _steps(sess: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray, schedule: list[int]) -> list[np.ndarray]:
    """Every output of every step of an Optimum-style loop (presents fed back as pasts by name)."""
    names = [o.name for o in sess.get_outputs()]
    pasts = {i.name: np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
             for i in sess.get_inputs() if i.name.startswith("past_key_values")}
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1
    t, outs = 0, []
    for n in schedule:
        feeds = {"input_ids": ids[:, t:t + n], "attention_mask": mask[:, :t + n],
                 "position_ids": positions[:, t:t + n], **pasts}
        got = dict(zip(names, sess.run(None, feeds), strict=True))
        outs.extend(got[k] for k in names)
        pasts = {k: got[k.replace("past_key_values", "present")] for k in pasts}
        t += n
    return outs


def test_optimum_layout_same_outputs_with_fully_masked_rows():
    """Optimum's layout (TorchScript, opset 14, torch's SDPA guard): a left-padded batch, whose pad queries see
    no key at all, prefilled then decoded one token at a time: every output (logits of the pads included,
    presents) equals the exported model's, and the guard's IsNaN is gone from every layer."""
    from fixtures.hf_models import export_optimum_layout

    src = onnx.load(export_optimum_layout())
    layers = _count(src, "IsNaN")
    assert layers == 2
    model = ir.from_proto(src)
    assert move_softmax_guards(model) == layers
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    assert _count(out, "IsNaN") == 0
    ids = np.random.default_rng(3).integers(3, 128, size=(2, 12)).astype(np.int64)
    mask = np.ones((2, 12), np.int64)
    mask[0, :4] = 0
    want = _steps(_session(src), ids, mask, [9, 1, 1, 1])
    got = _steps(_session(out), ids, mask, [9, 1, 1, 1])
    assert np.isfinite(want[0]).all()  # the guard gave the pads' rows zeros, not NaN
    for a, b in zip(want, got, strict=True):
        scale = max(float(np.abs(a).max()), 1e-30)
        assert np.abs(a - b).max() <= 1e-6 * scale  # fp32 round-off of a different kernel choice at most


def _attention_graph(scores_op: str, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """Softmax(scores + bias) guarded as torch writes it, then times v; the scores are q @ k^T through
    ``scores_op``: "Div" (by a constant: finite), "Exp" or "MulInput" (by a graph input: may be infinite)."""
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["qk"])]
    inputs = [helper.make_tensor_value_info(n, dtype, s)
              for n, s in (("q", [1, 2, 5, 4]), ("kt", [1, 2, 4, 5]), ("v", [1, 2, 5, 4]), ("bias", [1, 1, 5, 5]))]
    inits = [helper.make_tensor("zero", dtype, [1], [0.0]), helper.make_tensor("two", dtype, [], [2.0])]
    if scores_op == "Div":
        nodes.append(helper.make_node("Div", ["qk", "two"], ["s"]))
    elif scores_op == "Exp":
        nodes.append(helper.make_node("Exp", ["qk"], ["s"]))
    else:
        inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, []))
        nodes.append(helper.make_node("Mul", ["qk", "scale"], ["s"]))
    nodes += [helper.make_node("Add", ["s", "bias"], ["x"]),
              helper.make_node("Softmax", ["x"], ["p"], axis=-1),
              helper.make_node("IsNaN", ["p"], ["nan"]),
              helper.make_node("Where", ["nan", "zero", "p"], ["w"]),
              helper.make_node("MatMul", ["w", "v"], ["o"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("o", dtype, None)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _feeds(rng: np.random.Generator, with_scale: bool) -> dict[str, np.ndarray]:
    bias = np.where(np.tril(np.ones((5, 5), bool)), 0.0, -np.inf).astype(np.float32)
    bias[1] = -np.inf  # a row with every key masked: NaN before the guard
    bias[3, 0] = np.finfo(np.float32).min  # a finite mask value is not "every key masked"
    feeds = {"q": rng.standard_normal((1, 2, 5, 4)).astype(np.float32),
             "kt": rng.standard_normal((1, 2, 4, 5)).astype(np.float32),
             "v": rng.standard_normal((1, 2, 5, 4)).astype(np.float32), "bias": bias[None, None]}
    if with_scale:
        feeds["scale"] = np.array(0.5, np.float32)
    return feeds


def test_hand_built_guard_moved_and_equal():
    src = _attention_graph("Div")
    model = ir.from_proto(src)
    assert move_softmax_guards(model) == 1
    out = ir.to_proto(model)
    feeds = _feeds(np.random.default_rng(0), False)
    want = _session(src).run(None, feeds)[0]
    got = _session(out).run(None, feeds)[0]
    assert np.all(want[:, :, 1] == 0) and np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scores_op", ["Exp", "MulInput"])
def test_guard_kept_where_scores_may_be_infinite(scores_op):
    """Exp of a product overflows, a graph input may be inf: the guard stays as torch wrote it."""
    model = ir.from_proto(_attention_graph(scores_op))
    result = SoftmaxGuardPass()(model)
    assert not result.modified
    assert sum(n.op_type == "IsNaN" for n in model.graph) == 1


def test_guard_kept_in_half_precision():
    """An fp16 product overflows to inf at 65504: a row can be NaN with unmasked keys, which only the guard on the
    whole matrix turns to zero; the guard stays."""
    model = ir.from_proto(_attention_graph("Div", TensorProto.FLOAT16))
    assert move_softmax_guards(model) == 0
    assert sum(n.op_type == "IsNaN" for n in model.graph) == 1
