"""Dtype tracing on hand-built graphs: roundings the product's own dtype does not show (a Cast of the angles
to float16 before Cos, positions rounded to float16 then cast back to float32), and positions that enter the
graph in half precision."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from posrewrite import api, io
from posrewrite.passes.onnx.rope.fp32 import Fp32PositionsPass
from posrewrite.passes.onnx.rope.precision import rope_site_precision, trace_rope_dtypes

F16, F32, I64 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.INT64
HEADS, DIM, BASE = 2, 8, 10000.0


def _build(path, variant: str) -> None:
    """q [1, S, H, D] fp16 rotated by RoPE with positions [S]; ``variant`` picks where the rounding is:
    "angle_cast": float32 positions and product, angles cast to float16 before Cos/Sin;
    "position_cast": positions int64 -> float16 -> float32, product and cos/sin float32, cos/sin cast at q;
    "half_input": positions fed as float16, everything in float16."""
    inv = (1.0 / BASE ** (np.arange(0, DIM, 2) / DIM)).astype(np.float32)
    pos_type = F16 if variant == "half_input" else I64
    nodes, inits = [], [
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
        numpy_helper.from_array(np.array([0, 2], np.int64), "ax02"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([DIM // 2], np.int64), "sh"),
        numpy_helper.from_array(np.array([DIM], np.int64), "sd"),
        numpy_helper.from_array(np.array([-1], np.int64), "axl"),
        numpy_helper.from_array(inv.astype(np.float16) if variant == "half_input" else inv, "inv_freq"),
    ]
    n = lambda *a, **k: nodes.append(helper.make_node(*a, **k))  # noqa: E731
    pf, freqs = "positions", "freqs"
    if variant == "angle_cast":
        n("Cast", ["positions"], ["pf"], to=F32)
        pf = "pf"
    elif variant == "position_cast":
        n("Cast", ["positions"], ["p16"], to=F16)
        n("Cast", ["p16"], ["pf"], to=F32)
        pf = "pf"
    n("Unsqueeze", [pf, "ax1"], ["pu"])
    n("Mul", ["pu", "inv_freq"], ["freqs"])
    if variant == "angle_cast":
        n("Cast", ["freqs"], ["freqs_h"], to=F16)
        freqs = "freqs_h"
    n("Concat", [freqs, freqs], ["emb"], axis=-1)
    n("Cos", ["emb"], ["cos"])
    n("Sin", ["emb"], ["sin"])
    for t in ("cos", "sin"):
        src = t
        if variant == "position_cast":
            n("Cast", [t], [t + "_h"], to=F16)
            src = t + "_h"
        n("Unsqueeze", [src, "ax02"], [t + "4"])
    n("Slice", ["q", "s0", "sh", "axl"], ["x1"])
    n("Slice", ["q", "sh", "sd", "axl"], ["x2"])
    n("Neg", ["x2"], ["nx2"])
    n("Concat", ["nx2", "x1"], ["rot"], axis=-1)
    n("Mul", ["q", "cos4"], ["qc"])
    n("Mul", ["rot", "sin4"], ["rs"])
    n("Add", ["qc", "rs"], ["q_rot"])
    graph = helper.make_graph(
        nodes, "rope",
        [helper.make_tensor_value_info("q", F16, [1, "S", HEADS, DIM]),
         helper.make_tensor_value_info("positions", pos_type, ["S"])],
        [helper.make_tensor_value_info("q_rot", F16, [1, "S", HEADS, DIM])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(onnx.shape_inference.infer_shapes(model, strict_mode=True), str(path))


def _run(path, q, positions):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"q": q, "positions": positions})[0]


def _reference(q, n):
    inv = 1.0 / BASE ** (np.arange(0, DIM, 2) / DIM)
    ang = np.arange(n)[:, None] * inv
    ang = np.concatenate([ang, ang], -1)[None, :, None, :]
    x = q.astype(np.float64)
    rot = np.concatenate([-x[..., DIM // 2:], x[..., : DIM // 2]], -1)
    return x * np.cos(ang) + rot * np.sin(ang), 2.0**-9 * (np.abs(x) + np.abs(rot))


@pytest.mark.parametrize("variant,position_dtype,angle_dtype", [
    ("angle_cast", "float32", "float16"),
    ("position_cast", "float16", "float32"),
])
def test_hidden_roundings_are_found_and_fixed(tmp_path, variant, position_dtype, angle_dtype):
    src, out = tmp_path / "m.onnx", tmp_path / "fixed.onnx"
    _build(src, variant)
    model = io.load_model(src)
    (site,) = api.detect(model).rope_sites
    trace = trace_rope_dtypes(site)
    assert (trace.position_dtype, trace.angle_dtype) == (position_dtype, angle_dtype)
    row = rope_site_precision(site, 4096)
    assert not row["safe"] and row["exact_position_fraction"] == 0.75
    p = Fp32PositionsPass(sites=api.detect(model).sites)
    assert p(model).modified
    io.save_model(model, out)
    (fixed,) = api.detect(io.load_model(out)).rope_sites
    assert rope_site_precision(fixed, 4096)["safe"]
    n = 4096
    q = np.random.default_rng(1).standard_normal((1, n, HEADS, DIM)).astype(np.float16)
    ref, bound = _reference(q, n)
    pos = np.arange(n, dtype=np.int64)
    assert np.max(np.abs(_run(out, q, pos) - ref) / bound) <= 1.0
    assert np.max(np.abs(_run(src, q, pos) - ref) / bound) > 100.0


def test_half_precision_position_input_is_reported(tmp_path):
    src = tmp_path / "m.onnx"
    _build(src, "half_input")
    model = io.load_model(src)
    (site,) = api.detect(model).rope_sites
    trace = trace_rope_dtypes(site)
    assert trace.inexact_sources == ["positions"] and trace.position_dtype == "float16"
    assert any("positions" in note for note in rope_site_precision(site, 4096)["notes"])
    p = Fp32PositionsPass(sites=api.detect(model).sites)
    assert p(model).modified
    assert any("positions enters the graph in float16" in note for note in p.notes)
    m = model.graph
    assert all(node.outputs[0].dtype.name == "FLOAT" for node in m if node.op_type in ("Cos", "Sin"))
