"""Tiny hand-built ONNX models (no torch) for the hostile-input tests and the fuzz campaign."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def rope_proto(*, seq: int | str = "S", heads: int = 2, dim: int = 8, base: float = 10000.0,
               weight_elems: int = 0) -> onnx.ModelProto:
    """q [1, heads, seq, dim] -> rotate-half RoPE of q at positions 0..seq-1 (angles computed in the graph).

    ``weight_elems`` > 0 adds a float initializer of that many elements (added to the output, all zeros) so the
    model has weights to move to external data.
    """
    half = dim // 2
    inv_freq = (1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32).reshape(1, half)
    inits = [
        numpy_helper.from_array(inv_freq, "inv_freq"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([0], np.int64), "s0"),
        numpy_helper.from_array(np.array([half], np.int64), "sh"),
        numpy_helper.from_array(np.array([dim], np.int64), "sd"),
        numpy_helper.from_array(np.array([-1], np.int64), "axm1"),
    ]
    nodes = [
        helper.make_node("Shape", ["q"], ["q_shape"], name="shape"),
        helper.make_node("Gather", ["q_shape", "axis2_scalar"], ["seq_len"], name="seq_len", axis=0),
        helper.make_node("Range", ["zero", "seq_len", "one"], ["pos_i"], name="range"),
        helper.make_node("Cast", ["pos_i"], ["pos"], name="cast_pos", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pos", "axis1"], ["pos_col"], name="unsq"),
        helper.make_node("MatMul", ["pos_col", "inv_freq"], ["freqs"], name="freqs"),
        helper.make_node("Concat", ["freqs", "freqs"], ["emb"], name="emb", axis=-1),
        helper.make_node("Cos", ["emb"], ["cos"], name="cos"),
        helper.make_node("Sin", ["emb"], ["sin"], name="sin"),
        helper.make_node("Slice", ["q", "s0", "sh", "axm1"], ["x1"], name="x1"),
        helper.make_node("Slice", ["q", "sh", "sd", "axm1"], ["x2"], name="x2"),
        helper.make_node("Neg", ["x2"], ["nx2"], name="neg"),
        helper.make_node("Concat", ["nx2", "x1"], ["rot"], name="rot", axis=-1),
        helper.make_node("Mul", ["q", "cos"], ["qc"], name="qc"),
        helper.make_node("Mul", ["rot", "sin"], ["rs"], name="rs"),
        helper.make_node("Add", ["qc", "rs"], ["y0"], name="y0"),
    ]
    inits.append(numpy_helper.from_array(np.array(2, np.int64), "axis2_scalar"))
    if weight_elems:
        inits.append(numpy_helper.from_array(np.zeros(weight_elems, np.float32).reshape(-1)[:1] * 0, "bias"))
        w = np.zeros((weight_elems,), np.float32)
        inits[-1] = numpy_helper.from_array(w, "W")
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "w0"))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "w1"))
        nodes += [
            helper.make_node("Slice", ["W", "w0", "w1"], ["w_first"], name="w_first"),
            helper.make_node("Add", ["y0", "w_first"], ["y"], name="add_w"),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["y0"], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, "rope",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, heads, seq, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, heads, seq, dim])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def save(proto: onnx.ModelProto, path: Path, *, external: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=64)
    else:
        onnx.save(proto, path)
    return path
