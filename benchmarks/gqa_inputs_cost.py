"""What GroupQueryAttention's optional inputs cost: one com.microsoft.GroupQueryAttention node (do_rotary=1)
with and without ``position_ids`` and ``attention_bias``, on the same feeds, interleaved.

`--fuse ort` on Optimum-layout exports passes the graph's mask as ``attention_bias`` (left padding, which
GroupQueryAttention's own right-padding mask cannot express) and the graph's positions as ``position_ids``;
onnxruntime-genai's builder model passes neither. This measures that difference alone.

    python benchmarks/gqa_inputs_cost.py [--heads 16] [--kv-heads 4] [--head-size 64] [--threads 2]
                                         [--cases 0x2048,2048x1] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _session(heads: int, kv_heads: int, positions: bool, bias: bool, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto
    from onnx import helper as oh

    names = ["q", "k", "v", "past_k", "past_v", "cos", "sin"]
    ins = [oh.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    ins += [oh.make_tensor_value_info(n, TensorProto.INT32, None) for n in ("seqlens_k", "total")]
    if positions:
        ins.append(oh.make_tensor_value_info("pos", TensorProto.INT64, None))
    if bias:
        ins.append(oh.make_tensor_value_info("bias", TensorProto.FLOAT, None))
    node = oh.make_node("GroupQueryAttention", [*names[:5], "seqlens_k", "total", "cos", "sin",
                                                "pos" if positions else "", "bias" if bias else ""],
                        ["o", "present_k", "present_v"], domain="com.microsoft", num_heads=heads,
                        kv_num_heads=kv_heads, do_rotary=1)
    outs = [oh.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("o", "present_k", "present_v")]
    model = oh.make_model(oh.make_graph([node], "gqa", ins, outs),
                          opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="0x2048,2048x1", help="PASTxNEW, comma-separated")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    h, kv, d = args.heads, args.kv_heads, args.head_size
    rng = np.random.default_rng(0)
    variants = {(p, b): _session(h, kv, p, b, args.threads) for p in (False, True) for b in (False, True)}
    print(f"GroupQueryAttention {h}/{kv} heads, head size {d}, do_rotary=1, onnxruntime CPU {args.threads} threads; "
          f"medians of {args.repeat} (interleaved), ratio to neither input")
    for case in args.cases.split(","):
        past, seq = (int(x) for x in case.split("x"))
        total, rows = past + seq, max(4096, past + seq)
        angles = np.arange(rows)[:, None] * 10000.0 ** (-np.arange(d // 2) / (d // 2))[None]
        causal = np.where(np.arange(total)[None, :] > past + np.arange(seq)[:, None], -3.0e38, 0.0)
        feeds = {
            "q": rng.standard_normal((1, seq, h * d)), "k": rng.standard_normal((1, seq, kv * d)),
            "v": rng.standard_normal((1, seq, kv * d)), "past_k": rng.standard_normal((1, kv, past, d)),
            "past_v": rng.standard_normal((1, kv, past, d)), "cos": np.cos(angles), "sin": np.sin(angles),
            "bias": causal[None, None],
        }
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        feeds |= {"seqlens_k": np.array([total - 1], np.int32), "total": np.array(total, np.int32),
                  "pos": np.arange(past, total)[None].astype(np.int64)}
        per = {}
        for key, sess in variants.items():
            wanted = {i.name for i in sess.get_inputs()}
            per[key] = (sess, {k: v for k, v in feeds.items() if k in wanted}, [])
        for _ in range(args.repeat + 1):
            for sess, f, times in per.values():
                t = time.perf_counter()
                sess.run(None, f)
                times.append(time.perf_counter() - t)
        base = statistics.median(per[(False, False)][2][1:])
        for (p, b), (_, _, times) in per.items():
            label = " + ".join(n for n, on in (("position_ids", p), ("attention_bias", b)) if on) or "neither"
            m = statistics.median(times[1:])
            print(f"  past {past:5d}, new {seq:5d}  {label:32s} {m * 1e3:9.3f} ms  {m / base:5.2f}x")


if __name__ == "__main__":
    main()
