"""One attention-shaped RoPE in onnxruntime CPU: the exported (unfused) rotation against each fused op.

    python benchmarks/rope_micro.py [--threads 2] [--repeat 30] [--shapes 1x32x2048x128,1x8x2048x128]

For each shape [B, H, S, D] and dtype (float32, float16) it times, in one process and one run:
  unfused   x*cos + concat(-x[..., D/2:], x[..., :D/2])*sin   (the ops the dynamo exporter writes; cos/sin
            [1, 1, S, D] are inputs, as they are computed once per model and shared by every layer)
  contrib   com.microsoft.RotaryEmbedding(x, position_ids, cos_cache, sin_cache)
  onnx23    RotaryEmbedding-23(x, cos_cache, sin_cache, position_ids)
  copy      numpy copy of the same bytes (one read, one write): the memory-bandwidth floor of any RoPE
Outputs are bound to preallocated buffers (IOBinding) so allocation is not timed. Medians over --repeat
runs after warm-up. Ratios: unfused/fused (speed-up) and fused/copy (distance from the bandwidth floor).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

DEFAULT_SHAPES = "1x32x2048x128,1x8x2048x128,1x16x512x64,4x32x128x128"
_TP = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def _model(nodes, inputs, outputs, inits=(), domains=()) -> bytes:
    graph = helper.make_graph(nodes, "rope", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", 23)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def unfused_model(shape, dtype) -> bytes:
    b, h, s, d = shape
    t = _TP[dtype]
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, dtype=np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Slice", ["x", "zero", "half", "axis"], ["x1"]),
        helper.make_node("Slice", ["x", "half", "end", "axis"], ["x2"]),
        helper.make_node("Neg", ["x2"], ["nx2"]),
        helper.make_node("Concat", ["nx2", "x1"], ["rot"], axis=-1),
        helper.make_node("Mul", ["x", "cos"], ["a"]),
        helper.make_node("Mul", ["rot", "sin"], ["bb"]),
        helper.make_node("Add", ["a", "bb"], ["y"]),
    ]
    inits = [i64("zero", [0]), i64("half", [d // 2]), i64("end", [d]), i64("axis", [-1])]
    inputs = [
        helper.make_tensor_value_info("x", t, list(shape)),
        helper.make_tensor_value_info("cos", t, [1, 1, s, d]),
        helper.make_tensor_value_info("sin", t, [1, 1, s, d]),
    ]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", t, list(shape))], inits)


def fused_model(shape, dtype, op: str, rows: int) -> bytes:
    b, h, s, d = shape
    t = _TP[dtype]
    inv = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
    ang = np.arange(rows)[:, None] * inv[None]
    cos = numpy_helper.from_array(np.cos(ang).astype(dtype), "cos_cache")
    sin = numpy_helper.from_array(np.sin(ang).astype(dtype), "sin_cache")
    inputs = [
        helper.make_tensor_value_info("x", t, list(shape)),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [b, s]),
    ]
    outputs = [helper.make_tensor_value_info("y", t, list(shape))]
    if op == "contrib":
        node = helper.make_node(
            "RotaryEmbedding",
            ["x", "position_ids", "cos_cache", "sin_cache"],
            ["y"],
            domain="com.microsoft",
            interleaved=0,
        )
        return _model([node], inputs, outputs, [cos, sin], domains=["com.microsoft"])
    node = helper.make_node("RotaryEmbedding", ["x", "cos_cache", "sin_cache", "position_ids"], ["y"], interleaved=0)
    return _model([node], inputs, outputs, [cos, sin])


def _session(model: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _time_session(sess, feeds: dict, out: np.ndarray, repeat: int) -> float:
    binding = sess.io_binding()
    for name, arr in feeds.items():
        binding.bind_cpu_input(name, arr)
    binding.bind_output("y", "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
    for _ in range(3):
        sess.run_with_iobinding(binding)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _time_copy(x: np.ndarray, repeat: int) -> float:
    dst = np.empty_like(x)
    for _ in range(3):
        np.copyto(dst, x)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(dst, x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_one(shape, dtype, threads: int, repeat: int) -> dict:
    b, h, s, d = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    inv = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
    ang = np.arange(s)[:, None] * inv[None]
    cos = np.concatenate([np.cos(ang)] * 2, -1).astype(dtype)[None, None]
    sin = np.concatenate([np.sin(ang)] * 2, -1).astype(dtype)[None, None]
    pos = np.ascontiguousarray(np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)))
    out = np.empty(shape, dtype)
    row = {"shape": "x".join(map(str, shape)), "dtype": np.dtype(dtype).name, "MB": round(x.nbytes / 1e6, 2)}
    ref = None
    for name, model, feeds in (
        ("unfused", unfused_model(shape, dtype), {"x": x, "cos": cos, "sin": sin}),
        ("contrib", fused_model(shape, dtype, "contrib", max(s, 4096)), {"x": x, "position_ids": pos}),
        ("onnx23", fused_model(shape, dtype, "onnx23", max(s, 4096)), {"x": x, "position_ids": pos}),
    ):
        try:
            sess = _session(model, threads)
            row[name] = _time_session(sess, feeds, out, repeat) * 1e3
            if ref is None:
                ref = out.astype(np.float32).copy()
            else:
                row[f"{name}_maxdiff"] = float(np.max(np.abs(out.astype(np.float32) - ref)))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            row[name] = None
            row[f"{name}_error"] = str(exc).splitlines()[0][:120]
    row["copy"] = _time_copy(x, repeat) * 1e3
    for fused in ("contrib", "onnx23"):
        if row.get("unfused") and row.get(fused):
            row[f"unfused/{fused}"] = row["unfused"] / row[fused]
            row[f"{fused}/copy"] = row[fused] / row["copy"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxHxSxD")
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dtypes = [np.dtype(d).type for d in args.dtypes.split(",")]
    rows = [bench_one(shape, dt, args.threads, args.repeat) for shape in shapes for dt in dtypes]
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    print(f"onnxruntime {ort.__version__} CPU, {args.threads} thread(s), median of {args.repeat} (ms)")
    head = (
        f"{'shape':>16} {'dtype':>8} {'MB':>7} {'unfused':>8} {'contrib':>8} {'onnx23':>8} {'copy':>7} "
        f"{'unf/contrib':>11} {'unf/onnx23':>10} {'contrib/copy':>12} {'onnx23/copy':>11}"
    )
    print(head)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        print(
            f"{r['shape']:>16} {r['dtype']:>8} {r['MB']:>7} {fmt(r.get('unfused'), '8.3f')} "
            f"{fmt(r.get('contrib'), '8.3f')} {fmt(r.get('onnx23'), '8.3f')} {r['copy']:7.3f} "
            f"{fmt(r.get('unfused/contrib'), '10.2f')}x {fmt(r.get('unfused/onnx23'), '9.2f')}x "
            f"{fmt(r.get('contrib/copy'), '11.2f')}x {fmt(r.get('onnx23/copy'), '10.2f')}x"
        )
        for k, v in r.items():
            if k.endswith("_error"):
                print(f"{'':>16} {k}: {v}")
            if k.endswith("_maxdiff") and v > (1e-5 if r["dtype"] == "float32" else 1e-2):
                print(f"{'':>16} warning: {k} = {v:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
