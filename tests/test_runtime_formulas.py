"""The run-time inverse-frequency formulas (dynamic NTK, LongRoPE) are written once, in
``posrewrite.math.rope.runtime_inv_freq``, against a small ops interface. Here the ONNX builder (run in
onnxruntime), the fx writer (run by torch) and numpy each evaluate it at lengths around L, and all three are
compared with Hugging Face's own per-length inverse frequencies."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import LlamaConfig, Phi3Config  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from posrewrite.math.rope import NumpyOps, RopeParameters, default_inv_freq, runtime_inv_freq  # noqa: E402
from posrewrite.passes.fx._graph import GraphWriter  # noqa: E402
from posrewrite.passes.fx.rescale import FxOps  # noqa: E402
from posrewrite.passes.onnx._build import NodeWriter  # noqa: E402
from posrewrite.passes.onnx.rope.rescale import OnnxOps  # noqa: E402

L = 4096
LENGTHS = [100, 4096, 4097, 6000, 20000]


def _roundoff_bound(ref: np.ndarray) -> np.ndarray:
    # float32 evaluation of exp(-x ln b') by any operation order: a few roundings of |ln f| and of f
    f = np.abs(ref.astype(np.float64))
    return 2.0 ** -24 * f * (8 + 4 * np.abs(np.log(f)))


def _cases():
    yield "dynamic-2", {"rope_type": "dynamic", "factor": 2.0}, 64
    yield "dynamic-4", {"rope_type": "dynamic", "factor": 4.0}, 128
    rng = np.random.default_rng(0)
    short = [float(v) for v in 1.0 + 0.1 * rng.random(48)]
    long = [float(v) for v in 1.0 + 3.0 * np.linspace(0, 1, 48)]
    yield "longrope", {"rope_type": "longrope", "short_factor": short, "long_factor": long}, 96


CASES = list(_cases())


def _hf(rope: dict, head_dim: int, seq_len: int) -> np.ndarray:
    if rope["rope_type"] == "longrope":
        config = Phi3Config(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=2,
                            max_position_embeddings=4 * L, original_max_position_embeddings=L,
                            rope_parameters={**rope, "rope_theta": 10000.0})
    else:
        config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=2,
                             max_position_embeddings=L, rope_parameters={**rope, "rope_theta": 10000.0})
    inv, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, device="cpu", seq_len=seq_len)
    if rope["rope_type"] == "dynamic" and seq_len <= L:  # HF keeps the original vector up to L
        inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, device="cpu", seq_len=L)
    return inv.numpy().astype(np.float32)


def _params(rope: dict) -> RopeParameters:
    if rope["rope_type"] == "dynamic":  # HF: L is the model's max_position_embeddings
        return RopeParameters.from_hf(rope, max_position_embeddings=L)
    return RopeParameters.from_hf({**rope, "original_max_position_embeddings": L}, max_position_embeddings=4 * L)


def _numpy(params: RopeParameters, dim: int, n: int) -> np.ndarray:
    return runtime_inv_freq(NumpyOps(), np.float32(n), params, inv_freq=default_inv_freq(1e4, dim), base=1e4, dim=dim)


def _onnx(params: RopeParameters, dim: int, lengths: list[int]) -> list[np.ndarray]:
    import onnxruntime as ort

    seq = ir.Value(name="seq", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
    graph = ir.Graph([seq], [], nodes=[], name="runtime", opset_imports={"": 18})
    anchor = ir.node("Identity", [seq], name="anchor")
    graph.append(anchor)
    w = NodeWriter(graph, anchor, "rt")
    out = runtime_inv_freq(OnnxOps(w), anchor.outputs[0], params, inv_freq=default_inv_freq(1e4, dim), base=1e4,
                           dim=dim)
    w.commit()
    out.name = "inv_freq"
    graph.outputs.append(out)
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [sess.run(None, {"seq": np.array(n, dtype=np.float32)})[0] for n in lengths]


class _Seq(torch.nn.Module):
    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return pos.to(torch.float32) * 2.0


def _fx(params: RopeParameters, dim: int, lengths: list[int]) -> list[np.ndarray]:
    from torch.fx import Node

    ep = torch.export.export(_Seq(), (torch.arange(8)[None],),
                             dynamic_shapes=({1: torch.export.Dim("s", max=100000)},))
    w = GraphWriter(ep)
    pos = next(n for n in ep.graph.nodes if n.op == "placeholder")
    mul = next(n for n in ep.graph.nodes if n.op == "call_function" and "mul" in str(n.target))
    ops = FxOps(w, mul)
    seq = ops._call(torch.ops.aten.add.Tensor, (ops._call(torch.ops.aten.max.default, (pos,)), 1))
    inv = runtime_inv_freq(ops, seq, params, inv_freq=default_inv_freq(1e4, dim), base=1e4, dim=dim)
    assert isinstance(inv, Node)
    # the formula's nodes have no users: the interpreter still runs every node in order, and captures inv
    gm = torch.fx.GraphModule(ep.graph_module, ep.graph)
    out = []
    for n in lengths:
        interp = _Capture(gm, inv)
        interp.run(*_placeholders(ep, torch.arange(n)[None]))
        out.append(interp.value.numpy())
    return out


class _Capture(torch.fx.Interpreter):
    def __init__(self, gm, node):
        super().__init__(gm)
        self.node, self.value = node, None

    def run_node(self, n):
        result = super().run_node(n)
        if n is self.node:
            self.value = result
        return result


def _placeholders(ep, pos: torch.Tensor) -> list[torch.Tensor]:
    args = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT":
            args.append(pos)
        else:
            args.append(ep.constants[spec.target])
    return args


@pytest.mark.parametrize("name,rope,dim", CASES, ids=[c[0] for c in CASES])
def test_runtime_inv_freq_same_on_every_side(name, rope, dim):
    params = _params(rope)
    onnx_vals = _onnx(params, dim, LENGTHS)
    fx_vals = _fx(params, dim, LENGTHS)
    for n, o, f in zip(LENGTHS, onnx_vals, fx_vals, strict=True):
        ref = _hf(rope, dim, n)
        bound = _roundoff_bound(ref)
        for label, ours in (("numpy", _numpy(params, dim, n)), ("onnx", o), ("fx", f)):
            assert ours.dtype == np.float32 and ours.shape == ref.shape, label
            err = np.abs(ours.astype(np.float64) - ref)
            assert np.all(err <= bound), f"{label} at {n}: max error / bound {np.max(err / bound):.3g}"
        if n > L:  # past L the vector really changed
            assert not np.allclose(ref, default_inv_freq(1e4, dim))
