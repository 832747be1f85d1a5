"""Graphs written here node by node (onnx.helper), so small that they need no export: what inspect reports, as
JSON, for a score bias whose table is written from its paper's formula, and for a Cos that rotates nothing.

These keep the descriptions' JSON (posrewrite/sites/bias.py, posrewrite/sites/base.py) in the fast suite."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from posrewrite import api

L, H, D = 16, 2, 8
OPSET = [helper.make_opsetid("", 17)]


def _value(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def kerple_log_table(r1: np.ndarray, r2: np.ndarray, n: int) -> np.ndarray:
    """KERPLE's logarithmic bias (Chi et al. 2022): -r1 log(1 + r2 |i - j|), one (r1, r2) per head."""
    dist = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]).astype(np.float64)
    return -r1[:, None, None] * np.log1p(r2[:, None, None] * dist)


def test_score_bias_table_is_described_with_its_parameters(tmp_path):
    r1, r2 = np.array([1.0, 0.5]), np.array([2.0, 0.25])
    bias = kerple_log_table(r1, r2, L).astype(np.float32)[None]  # [1, H, L, L]
    nodes = [
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "attention", [_value("q", [1, H, L, D]), _value("kt", [1, H, D, L]),
                                                   _value("v", [1, H, L, D])],
                              [_value("out", [1, H, L, D])], [numpy_helper.from_array(bias, "bias")])
    path = tmp_path / "kerple.onnx"
    onnx.save(helper.make_model(graph, opset_imports=OPSET), path)
    (site,) = api.inspect(path).sites
    d = json.loads(json.dumps(site.to_dict()))
    assert d["kind"] == "score_bias" and d["family"] == "kerple_log" and d["num_heads"] == H
    assert d["max_positions"] == L and d["dtype"] == "float32"
    # the table is float32 (relative round-off 6e-8); fitting two parameters from 16 distances loses at most a
    # few hundred of those: 1e-5 relative
    np.testing.assert_allclose(d["params"]["r1"], r1, rtol=1e-5)
    np.testing.assert_allclose(d["params"]["r2"], r2, rtol=1e-5)


def test_cos_that_rotates_nothing_is_a_refusal_naming_it(tmp_path):
    inv_freq = (10000.0 ** (-np.arange(0, 8, 2) / 8)).astype(np.float32)[None]
    nodes = [helper.make_node("Mul", ["pos", "inv_freq"], ["angles"]), helper.make_node("Cos", ["angles"], ["cos"])]
    graph = helper.make_graph(nodes, "no_rotation", [_value("pos", [L, 1])], [_value("cos", [L, 4])],
                              [numpy_helper.from_array(inv_freq, "inv_freq")])
    path = tmp_path / "cos.onnx"
    onnx.save(helper.make_model(graph, opset_imports=OPSET), path)
    found = api.inspect(path)
    assert not found.sites
    (refusal,) = found.refusals
    d = json.loads(json.dumps(refusal.to_dict()))
    assert set(d) == {"kind", "where", "reason"}
    assert d["where"] == "cos" and "Cos" in d["reason"]
