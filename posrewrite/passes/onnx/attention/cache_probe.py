"""Whether RoPE can go inside GroupQueryAttention (do_rotary=1): the graph's form (`rotary_stays_outside`)
and the installed onnxruntime's contract, probed on random inputs (`rotary_probe`)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from posrewrite.passes.onnx.attention.cache_match import CONTRIB, Attention

_I64 = ir.DataType.INT64


def rotary_stays_outside(att: Attention, shared: dict) -> str | None:
    """None when GroupQueryAttention's own rotation (do_rotary=1 with the q/k RotaryEmbedding's cos/sin caches
    and positions as its position_ids input) computes what the two RotaryEmbedding nodes do; else why not.
    The graph's form is checked here, the kernel's contract by `rotary_probe` (an evaluation)."""
    q_rot, k_rot = att.q_rot, att.k_rot
    if len(q_rot.inputs) < 4 or len(k_rot.inputs) < 4:
        return "RotaryEmbedding without its caches"
    if any(a is not b for a, b in zip(q_rot.inputs[1:4], k_rot.inputs[1:4], strict=True)):
        return "q and k are rotated with different positions or caches"
    positions, cos, sin = q_rot.inputs[1:4]
    interleaved = {n.attributes.get_int("interleaved", 0) for n in (q_rot, k_rot)}
    if len(interleaved) != 1:
        return "q and k rotate in different layouts"
    for node in (q_rot, k_rot):
        if node.attributes.get_int("is_packed_batching", 0) or node.attributes.get_float("scale", 1.0) != 1.0:
            return "RotaryEmbedding with packed batching or a scale"
        if node.attributes.get_int("rotary_embedding_dim", 0) not in (0, att.head_size):
            return "partial rotary (GroupQueryAttention rotates whole heads here)"
    if positions.shape is None or len(positions.shape) != 2 or positions.dtype != _I64:
        return f"positions {positions.name} are not [batch, sequence] int64"
    dtype = att.out.dtype or q_rot.inputs[0].dtype
    for cache in (cos, sin):
        shape = cache.shape
        if shape is None or len(shape) != 2 or shape[1] != att.head_size // 2 or cache.dtype != dtype:
            return f"cos/sin cache {cache.name} is not [rows, {att.head_size // 2}] {dtype}"
    key = ("rotary_probe", att.heads, att.kv_heads, att.head_size, interleaved.pop(), dtype)
    if key not in shared:
        shared[key] = rotary_probe(*key[1:])
    return shared[key]




def rotary_probe(heads: int, kv_heads: int, head_size: int, interleaved: int, dtype: ir.DataType) -> str | None:
    """Runs, in the installed onnxruntime, GroupQueryAttention with do_rotary=1 and position_ids against
    RotaryEmbedding (as written here: [B, S, N*D] input, num_heads) + GroupQueryAttention without rotation, on
    random q/k/v, caches, pasts, a causal bias and random (non-monotonic, per batch entry) positions, for a
    prompt, a batched step after a past and a decode step. None when every output agrees within round-off."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto
        from onnx import helper as oh

        elem = int(dtype)
        np_type = np.float16 if dtype == ir.DataType.FLOAT16 else np.float32
        if dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            return f"not checked for {dtype} queries"
        names = ("q", "k", "v", "past_k", "past_v", "cos", "sin", "bias")
        ins = [oh.make_tensor_value_info(n, elem, None) for n in names]
        ins += [oh.make_tensor_value_info("pos", TensorProto.INT64, None)]
        ins += [oh.make_tensor_value_info(n, TensorProto.INT32, None) for n in ("seqlens_k", "total", "q_lens")]
        attrs = {"num_heads": heads, "kv_num_heads": kv_heads}
        rot = {"interleaved": interleaved}
        tail = ["seqlens_k", "total"]
        extra = ["bias", "", "", "", "", "", "q_lens"]
        inside = [oh.make_node("GroupQueryAttention", ["q", "k", "v", "past_k", "past_v", *tail, "cos", "sin", "pos",
                                                      *extra], ["o", "pk", "pv"], domain=CONTRIB, do_rotary=1,
                               rotary_interleaved=interleaved, **attrs)]
        outside = [
            oh.make_node("RotaryEmbedding", ["q", "pos", "cos", "sin"], ["qr"], domain=CONTRIB, num_heads=heads,
                         **rot),
            oh.make_node("RotaryEmbedding", ["k", "pos", "cos", "sin"], ["kr"], domain=CONTRIB, num_heads=kv_heads,
                         **rot),
            oh.make_node("GroupQueryAttention", ["qr", "kr", "v", "past_k", "past_v", *tail, "", "", "", *extra],
                         ["o", "pk", "pv"], domain=CONTRIB, **attrs),
        ]
        outs = [oh.make_tensor_value_info(n, elem, None) for n in ("o", "pk", "pv")]
        so = ort.SessionOptions()
        so.log_severity_level = 4
        sessions = []
        for nodes in (inside, outside):
            proto = oh.make_model(oh.make_graph(nodes, "probe", ins, outs),
                                  opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid(CONTRIB, 1)])
            sessions.append(ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]))
        rng = np.random.default_rng(0)
        rows = 64
        angles = rng.uniform(-np.pi, np.pi, size=(rows, head_size // 2))
        for batch, past, seq in ((2, 0, 5), (2, 4, 3), (2, 7, 1)):
            total = past + seq
            bias = np.where(np.arange(total)[None, :] > past + np.arange(seq)[:, None], -1.0e4, 0.0)
            feeds = {
                "q": rng.standard_normal((batch, seq, heads * head_size)),
                "k": rng.standard_normal((batch, seq, kv_heads * head_size)),
                "v": rng.standard_normal((batch, seq, kv_heads * head_size)),
                "past_k": rng.standard_normal((batch, kv_heads, past, head_size)),
                "past_v": rng.standard_normal((batch, kv_heads, past, head_size)),
                "cos": np.cos(angles), "sin": np.sin(angles),
                "bias": np.broadcast_to(bias, (batch, 1, seq, total)),
            }
            feeds = {k: np.ascontiguousarray(v, dtype=np_type) for k, v in feeds.items()}
            feeds["pos"] = rng.integers(0, rows, size=(batch, seq)).astype(np.int64)
            feeds["seqlens_k"] = np.full((batch,), total - 1, np.int32)
            feeds["total"] = np.array(total, np.int32)
            feeds["q_lens"] = np.full((batch,), seq, np.int32)
            got, want = (s.run(None, feeds) for s in sessions)
            eps = float(np.finfo(np_type).eps)
            for a, b in zip(got, want, strict=True):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                if a.shape != b.shape or not np.all(np.abs(a - b) <= 16 * eps * max(1.0, float(np.abs(b).max()))):
                    return (f"this onnxruntime's GroupQueryAttention rotates differently (past {past}, {seq} new "
                            "tokens, random positions)")
    except Exception as exc:  # noqa: BLE001 - an older onnxruntime without position_ids: keep the rotation out
        return f"GroupQueryAttention with do_rotary and position_ids did not run ({type(exc).__name__})"
    return None

