"""Rewrite time and peak memory on a 7B-shaped Llama export (Optimum layout, fp16, external data).

The graph is built directly with onnx (no torch): 32 layers, hidden 4096, 32 q / 8 kv heads, intermediate
11008, vocab 32000, fp16 weights in one *sparse* external data file (13.5 GB apparent, almost nothing on disk:
the values are zeros). Inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/value; outputs
logits, present.{i}.key/value; RoPE computed HF-style from an inv_freq constant and position_ids.

Each rewrite runs in a fresh process (``/usr/bin/time``-style: the child's peak RSS from ``wait4``):

    python benchmarks/large_model.py [--layers 32] [--dir /tmp/posrewrite-7b] [--what rescale,fuse]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_F16 = TensorProto.FLOAT16


class _Builder:
    def __init__(self, data_name: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.data_name = data_name
        self.offset = 0
        self.k = 0

    def name(self, stem: str) -> str:
        self.k += 1
        return f"/{stem}_{self.k}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        if op_type == "Unsqueeze":  # axes are an input from opset 13
            inputs = [*inputs, self.const(np.array(attrs.pop("axes"), np.int64))]
        outs = [self.name(f"{op_type}_output") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, arr) -> str:
        name = self.name("Constant_output")
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(arr))))
        return name

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        """An fp16 initializer stored in the external data file (zeros: the file is sparse)."""
        t = TensorProto(name=name, data_type=_F16, dims=list(shape), data_location=TensorProto.EXTERNAL)
        size = int(np.prod(shape)) * 2
        for key, value in (("location", self.data_name), ("offset", str(self.offset)), ("length", str(size))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.offset += (size + 4095) // 4096 * 4096
        self.inits.append(t)
        return name

    def small(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(arr, name))
        return name


def _rms_norm(b: _Builder, x: str, w: str) -> str:
    x32 = b.op("Cast", [x], to=TensorProto.FLOAT)
    var = b.op("ReduceMean", [b.op("Pow", [x32, b.const(np.float32(2))])], axes=[-1], keepdims=1)
    inv = b.op("Div", [b.const(np.float32(1)), b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(1e-5))])])])
    return b.op("Mul", [w, b.op("Cast", [b.op("Mul", [x32, inv])], to=_F16)])


def _rotate(b: _Builder, x: str, cos: str, sin: str, half: int) -> str:
    x1 = b.op("Slice", [x, b.const(np.array([0])), b.const(np.array([half])), b.const(np.array([3]))])
    x2 = b.op("Slice", [x, b.const(np.array([half])), b.const(np.array([1 << 62])), b.const(np.array([3]))])
    rot = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rot, sin])])


def build_llama(path: Path, *, layers: int = 32, hidden: int = 4096, heads: int = 32, kv_heads: int = 8,
                intermediate: int = 11008, vocab: int = 32000, base: float = 10000.0) -> Path:
    """Writes the model and its sparse data file; returns the model path (opset 14, like Optimum's exports)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    b = _Builder(data_name)
    d = hidden // heads
    half = d // 2
    group = heads // kv_heads
    # attention mask: causal + padding from attention_mask, additive, HF-style (finfo.min), [B, 1, S, T]
    seq = b.op("Gather", [b.op("Shape", ["input_ids"]), b.const(np.int64(1))], axis=0)
    total = b.op("Gather", [b.op("Shape", ["attention_mask"]), b.const(np.int64(1))], axis=0)
    past_len = b.op("Sub", [total, seq])
    qpos = b.op("Add", [b.op("Range", [b.const(np.int64(0)), seq, b.const(np.int64(1))]), past_len])
    kpos = b.op("Range", [b.const(np.int64(0)), total, b.const(np.int64(1))])
    causal = b.op("LessOrEqual", [b.op("Unsqueeze", [kpos], axes=[0]), b.op("Unsqueeze", [qpos], axes=[1])])
    pad = b.op("Cast", [b.op("Unsqueeze", ["attention_mask"], axes=[1, 2])], to=TensorProto.BOOL)
    keep = b.op("And", [b.op("Unsqueeze", [causal], axes=[0, 1]), pad])
    mask = b.op("Where", [keep, b.const(np.array(0.0, np.float16)), b.const(np.array(-65504.0, np.float16))])
    # RoPE angles, HF's LlamaRotaryEmbedding as the torchscript exporter writes it
    inv_freq = b.small("inv_freq", (1.0 / base ** (np.arange(0, d, 2, dtype=np.float32) / d)).astype(np.float32))
    batch = b.op("Gather", [b.op("Shape", ["input_ids"]), b.const(np.int64(0))], axis=0)
    inv3 = b.op("Unsqueeze", [inv_freq], axes=[0, 2])
    inv_b = b.op("Expand", [inv3, b.op("Concat", [b.op("Unsqueeze", [batch], axes=[0]), b.const(np.array([1, 1]))],
                                               axis=0)])
    pos = b.op("Cast", [b.op("Unsqueeze", ["position_ids"], axes=[1])], to=TensorProto.FLOAT)
    freqs = b.op("Transpose", [b.op("MatMul", [inv_b, pos])], perm=[0, 2, 1])
    emb = b.op("Concat", [freqs, freqs], axis=-1)
    cos = b.op("Unsqueeze", [b.op("Cast", [b.op("Cos", [emb])], to=_F16)], axes=[1])
    sin = b.op("Unsqueeze", [b.op("Cast", [b.op("Sin", [emb])], to=_F16)], axes=[1])
    x = b.op("Gather", [b.weight("model.embed_tokens.weight", (vocab, hidden)), "input_ids"], axis=0)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = []
    bshd = b.const(np.array([0, 0, -1, d], np.int64))
    scale = b.const(np.array(1.0 / np.sqrt(d), np.float16))
    for i in range(layers):
        p = f"model.layers.{i}"
        h = _rms_norm(b, x, b.weight(f"{p}.input_layernorm.weight", (hidden,)))
        heads_of = {}
        for name, n_out in (("q", hidden), ("k", kv_heads * d), ("v", kv_heads * d)):
            y = b.op("MatMul", [h, b.weight(f"{p}.self_attn.{name}_proj.weight.T", (hidden, n_out))])
            heads_of[name] = b.op("Transpose", [b.op("Reshape", [y, bshd])], perm=[0, 2, 1, 3])
        q = _rotate(b, heads_of["q"], cos, sin, half)
        k = _rotate(b, heads_of["k"], cos, sin, half)
        presents = []
        for kind, new in (("key", k), ("value", heads_of["v"])):
            name = f"past_key_values.{i}.{kind}"
            inputs.append(helper.make_tensor_value_info(name, _F16, ["batch_size", kv_heads, "past_length", d]))
            full = b.op("Concat", [name, new], axis=2)
            out = f"present.{i}.{kind}"
            b.nodes.append(helper.make_node("Identity", [full], [out], name=b.name("Identity")))
            outputs.append(helper.make_tensor_value_info(out, _F16, ["batch_size", kv_heads, "total_length", d]))
            presents.append(full)
        rep = []
        for full in presents:  # repeat_kv
            shp = b.op("Shape", [full])
            e = b.op("Expand", [b.op("Unsqueeze", [full], axes=[2]), b.op("Concat", [
                b.op("Slice", [shp, b.const(np.array([0])), b.const(np.array([2]))]), b.const(np.array([group])),
                b.op("Slice", [shp, b.const(np.array([2])), b.const(np.array([4]))])], axis=0)])
            rep.append(b.op("Reshape", [e, b.const(np.array([0, heads, -1, d], np.int64))]))
        kt = b.op("Transpose", [rep[0]], perm=[0, 1, 3, 2])
        scores = b.op("Add", [b.op("Mul", [b.op("MatMul", [q, kt]), scale]), mask])
        probs = b.op("Softmax", [scores], axis=-1)
        att = b.op("MatMul", [probs, rep[1]])
        att = b.op("Reshape", [b.op("Transpose", [att], perm=[0, 2, 1, 3]), b.const(np.array([0, 0, hidden]))])
        x = b.op("Add", [x, b.op("MatMul", [att, b.weight(f"{p}.self_attn.o_proj.weight.T", (hidden, hidden))])])
        h = _rms_norm(b, x, b.weight(f"{p}.post_attention_layernorm.weight", (hidden,)))
        gate = b.op("MatMul", [h, b.weight(f"{p}.mlp.gate_proj.weight.T", (hidden, intermediate))])
        up = b.op("MatMul", [h, b.weight(f"{p}.mlp.up_proj.weight.T", (hidden, intermediate))])
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        x = b.op("Add", [x, b.op("MatMul", [act, b.weight(f"{p}.mlp.down_proj.weight.T", (intermediate, hidden))])])
    h = _rms_norm(b, x, b.weight("model.norm.weight", (hidden,)))
    b.nodes.append(helper.make_node("MatMul", [h, b.weight("lm_head.weight.T", (hidden, vocab))], ["logits"]))
    outputs.insert(0, helper.make_tensor_value_info("logits", _F16, ["batch_size", "sequence_length", vocab]))
    graph = helper.make_graph(b.nodes, "llama", inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    with open(path.parent / data_name, "wb") as f:
        f.truncate(b.offset)  # sparse: no block is written
    return path


class _StageTimes:
    """A posrewrite progress reporter that records how long each stage took."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, description: str, total: float | None = None):
        from posrewrite.progress import NullReporter

        t = time.perf_counter()
        with NullReporter().stage(description, total) as s:
            yield s
        self.times[description] = self.times.get(description, 0.0) + time.perf_counter() - t

    def note(self, message: str) -> None:
        pass


def _child(what: str, src: str, out: str) -> None:
    from posrewrite import api

    stages = _StageTimes()
    t = time.perf_counter()
    if what == "rescale":
        r = api.rewrite(src, output=out, rope_scale=4.0, rope_method="yarn", original_max_positions=4096,
                        validate=False, progress=stages)
    else:
        r = api.rewrite(src, output=out, fuse="ort", max_positions=16384, validate=False, progress=stages)
    rest = time.perf_counter() - t - sum(stages.times.values())
    print("  stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.times.items()) + f", other {rest:.1f} s")
    for line in r.changes:
        print("  change:", line)
    for line in r.notes:
        print("  note:", line)


def measure(what: str, src: Path, out: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, return code) of one rewrite in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", what, str(src), str(out)], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - t, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dir", default="/tmp/posrewrite-7b")
    parser.add_argument("--what", default="rescale,fuse")
    args = parser.parse_args()
    folder = Path(args.dir)
    src = folder / "model.onnx"
    t = time.perf_counter()
    build_llama(src, layers=args.layers, hidden=args.hidden, heads=32, kv_heads=8,
                intermediate=11008 if args.hidden == 4096 else args.hidden * 3)
    data = src.with_name(src.name + ".data")
    print(f"built {src} in {time.perf_counter() - t:.1f} s: {args.layers} layers, hidden {args.hidden}, "
          f"fp16 weights {data.stat().st_size / 2**30:.1f} GB (sparse file)")
    for what in args.what.split(","):
        out = folder / f"{what}.onnx"
        seconds, rss, rc = measure(what, src, out)
        print(f"{what:8s} {seconds:6.1f} s  peak RSS {rss:7.0f} MB  exit {rc}")
        for p in (out, out.with_name(out.name + ".data")):
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
