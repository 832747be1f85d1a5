"""KV-cache attention (Optimum / HF decode exports) matched around fused RotaryEmbedding nodes: the Softmax
back to q, k (rotated, after the cache Concat, repeat_kv), v, the scale and the bias (`match_attention`).
Reads the graph only; `NotFused` says why an attention does not match. The rewrite: `fuse_cache.py`."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from posrewrite.passes.onnx._graph import const_tensor

MASKED = -1.0e4  # additive bias values at or below this are masked (exp underflows to zero)
CONTRIB = "com.microsoft"


@dataclasses.dataclass
class Attention:
    softmax: ir.Node
    q_rot: ir.Node
    k_rot: ir.Node
    k_all: ir.Value
    v_all: ir.Value
    past_key: ir.Value
    past_value: ir.Value
    v_new: ir.Value
    bias: ir.Value | None
    scale: float
    out: ir.Value  # [B, H, S, D]
    heads: int
    kv_heads: int
    head_size: int
    k_rep: ir.Value | None = None  # keys / values with kv heads expanded (repeat_kv), [B, H, T, D]
    v_rep: ir.Value | None = None


class NotFused(Exception):
    """Why one attention is not rewritten (said in the notes)."""



def producer(v: ir.Value | None, *ops: str) -> ir.Node | None:
    node = v.producer() if v is not None else None
    if node is None or node.op_type not in ops or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _scalar(v: ir.Value | None) -> float | None:
    if v is None:
        return None
    t = const_tensor(v)
    if t is None:
        return None
    arr = t.numpy()
    if arr.size != 1:
        return None
    return float(np.asarray(arr, dtype=np.float64).reshape(-1)[0])


def _strip_scale(v: ir.Value) -> tuple[ir.Value, float]:
    """v = x * c (or x / c, c * x) with a constant scalar c -> (x, c); else (v, 1)."""
    factor = 1.0
    for _ in range(3):
        node = producer(v, "Mul", "Div")
        if node is None:
            break
        a, b = node.inputs[0], node.inputs[1]
        cb, ca = _scalar(b), _scalar(a)
        if node.op_type == "Div" and cb is not None and cb != 0:
            v, factor = a, factor / cb
        elif node.op_type == "Mul" and cb is not None:
            v, factor = a, factor * cb
        elif node.op_type == "Mul" and ca is not None:
            v, factor = b, factor * ca
        else:
            break
    return v, factor


def rotary_node(v: ir.Value) -> ir.Node | None:
    node = v.producer()
    if node is None or node.op_type != "RotaryEmbedding" or node.domain != CONTRIB:
        return None
    return node


def _unrepeat(v: ir.Value) -> ir.Value:
    """x when v = Reshape(Expand(Unsqueeze(x, axis 2), [B, Hkv, G, T, D]), [B, Hkv*G, T, D]) (HF's repeat_kv)."""
    reshape = producer(v, "Reshape")
    expand = producer(reshape.inputs[0], "Expand") if reshape is not None else None
    unsq = producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
    if unsq is None:
        return v
    axes = unsq.attributes.get_ints("axes") if len(unsq.inputs) < 2 else None
    if axes is None and len(unsq.inputs) > 1:
        t = const_tensor(unsq.inputs[1])
        axes = [int(a) for a in t.numpy().reshape(-1)] if t is not None else None
    if axes is None or list(axes) != [2]:
        return v
    return unsq.inputs[0]


def _cache_concat(graph: ir.Graph, v: ir.Value) -> tuple[ir.Value, ir.Value]:
    """v = Concat(past (a graph input), new, axis=2) -> (past, new)."""
    node = producer(v, "Concat")
    if node is None or len(node.inputs) != 2:
        raise NotFused(f"{v.name} is not Concat(past, new): no KV cache input")
    axis = node.attributes.get_int("axis", 0)
    if axis not in (2, -2):
        raise NotFused(f"the cache concatenation {node.name} is on axis {axis}, not the sequence axis 2")
    past, new = node.inputs
    for _ in range(4):  # Identity, or a one-input Concat (the torchscript exporter writes one for layer 0)
        p = producer(past, "Identity", "Concat")
        if p is None or len(p.inputs) != 1:
            break
        past = p.inputs[0]
    if past not in graph.inputs:
        raise NotFused(f"the cache concatenation {node.name} does not read a graph input first")
    if past.shape is None or len(past.shape) != 4:
        raise NotFused(f"past cache {past.name} is not 4-D [batch, kv_heads, past, head_size]")
    return past, new


def match_attention(graph: ir.Graph, sm: ir.Node) -> Attention:
    axis = sm.attributes.get_int("axis", -1)
    x = sm.inputs[0]
    rank = len(x.shape) if x.shape is not None else 4
    if axis not in (-1, rank - 1):
        raise NotFused(f"Softmax on axis {axis}, not the key axis")
    # probabilities: p, or Where(IsNaN(p), 0, p)
    probs = sm.outputs[0]
    users = [u.node for u in probs.uses()]
    if any(u.op_type not in ("MatMul", "IsNaN", "Where") for u in users) or probs.is_graph_output():
        raise NotFused("the probabilities are read by something other than the value MatMul")
    where = next((u for u in users if u.op_type == "Where"), None)
    if where is not None:
        isnan = producer(where.inputs[0], "IsNaN")
        zero = const_tensor(where.inputs[1])
        if (isnan is None or isnan.inputs[0] is not probs or where.inputs[2] is not probs or zero is None
                or zero.numpy().size != 1 or float(zero.numpy().reshape(-1)[0]) != 0.0):
            raise NotFused("the probabilities go through a Where that is not Where(IsNaN(p), 0, p)")
        probs = where.outputs[0]
        users = [u.node for u in probs.uses()]
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].inputs[0] is not probs:
        raise NotFused("the probabilities are not multiplied by the values (p @ v)")
    pv = users[0]
    # scores (+ bias)
    bias = None
    add = producer(x, "Add")
    scores = x
    if add is not None:
        for i in (0, 1):
            s, _ = _strip_scale(add.inputs[i])
            if producer(s, "MatMul") is not None:
                scores, bias = add.inputs[i], add.inputs[1 - i]
                break
        else:
            raise NotFused("no q @ k^T under the Softmax's Add")
    s, scale = _strip_scale(scores)
    qk = producer(s, "MatMul")
    if qk is None:
        raise NotFused("no q @ k^T under the Softmax")
    q, a = _strip_scale(qk.inputs[0])
    kt, b = _strip_scale(qk.inputs[1])
    scale *= a * b
    transpose = producer(kt, "Transpose")
    if transpose is None or list(transpose.attributes.get_ints("perm", [])) != [0, 1, 3, 2]:
        raise NotFused("k^T is not Transpose(k, perm=[0, 1, 3, 2])")
    k_rep, b2 = _strip_scale(transpose.inputs[0])
    scale *= b2
    q_rot = rotary_node(q)
    if q_rot is None:
        raise NotFused("q is not the output of a fused com.microsoft.RotaryEmbedding")
    k_all = _unrepeat(k_rep)
    v_all = _unrepeat(pv.inputs[1])
    past_key, k_new = _cache_concat(graph, k_all)
    past_value, v_new = _cache_concat(graph, v_all)
    k_rot = rotary_node(k_new)
    if k_rot is None:
        raise NotFused("the new keys are not the output of a fused com.microsoft.RotaryEmbedding")
    kv_heads, head_size = past_key.shape[1], past_key.shape[3]
    if not isinstance(kv_heads, int) or not isinstance(head_size, int):
        raise NotFused(f"kv heads / head size of {past_key.name} {past_key.shape} are not static")
    heads = _heads(q_rot, k_rep, head_size)
    if heads is None:
        raise NotFused("the number of query heads is not known statically")
    if heads % kv_heads:
        raise NotFused(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    if k_all is k_rep and heads != kv_heads:
        raise NotFused("keys have fewer heads than queries but are not expanded by repeat_kv")
    for node in (q_rot, k_rot):
        if node.attributes.get_int("rotary_embedding_dim", 0) not in (0, head_size) and "num_heads" not in \
                node.attributes:
            raise NotFused("partial rotary without num_heads")
    dtype = q.dtype or q_rot.inputs[0].dtype or past_key.dtype
    if bias is not None and (bias.dtype is not None and dtype is not None and bias.dtype != dtype):
        raise NotFused(f"attention bias {bias.name} is {bias.dtype}, queries are {dtype}")
    if dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        raise NotFused(f"queries of type {dtype}")
    if bias is None:
        raise NotFused("no attention bias: the attention is not causal, GroupQueryAttention is")
    return Attention(sm, q_rot, k_rot, k_all, v_all, past_key, past_value, v_new, bias, scale, pv.outputs[0],
                      heads, kv_heads, head_size, k_rep, pv.inputs[1])


def _heads(q_rot: ir.Node, k_rep: ir.Value, head_size: int) -> int | None:
    for shape in (q_rot.inputs[0].shape, q_rot.outputs[0].shape, k_rep.shape):
        if shape is not None and len(shape) == 4 and isinstance(shape[1], int):
            return shape[1]
    if "num_heads" in q_rot.attributes:
        return q_rot.attributes.get_int("num_heads")
    # [B, S, H, D] -> Transpose -> q_heads, after a MatMul with a [hidden, H*D] weight (shape only, never read)
    node = producer(q_rot.inputs[0], "Transpose")
    reshape = producer(node.inputs[0], "Reshape") if node is not None else None
    mm = producer(reshape.inputs[0], "MatMul", "Add") if reshape is not None else None
    while mm is not None and mm.op_type == "Add":  # projection bias
        mm = producer(mm.inputs[0], "MatMul", "Add")
    if mm is not None:
        w = mm.inputs[1]
        if w.shape is not None and len(w.shape) == 2 and isinstance(w.shape[1], int) and w.shape[1] % head_size == 0:
            return w.shape[1] // head_size
    return None

