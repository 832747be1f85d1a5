"""Decode-style attention (Optimum / HF exports with a KV cache) -> com.microsoft.GroupQueryAttention.

The graph this recognises, per layer, after posrewrite fused RoPE into com.microsoft.RotaryEmbedding nodes::

    q = RotaryEmbedding(q_heads [B, H, S, D], position_ids, cos, sin)
    k_all = Concat(past_key [B, Hkv, P, D], RotaryEmbedding(k_heads, ...), axis=2)      -> present.{i}.key
    v_all = Concat(past_value, v_heads, axis=2)                                       -> present.{i}.value
    scores = (q * a) @ Transpose(repeat_kv(k_all) * b)   (or (q @ k^T) * s, or / s)   scale = a*b, s, 1/s
    p = Softmax(scores + bias)                (optionally Where(IsNaN(p), 0, p): torch's SDPA export)
    out = p @ repeat_kv(v_all)                                                         [B, H, S, D]

GroupQueryAttention(q, k, v [B, S, *], past_key, past_value, seqlens_k, total_sequence_length,
attention_bias=bias, scale=..) computes the same thing when its own causal mask adds nothing to the bias:
GroupQueryAttention masks key j for query i when j > P + i (P = seqlens_k + 1 - S, the past length given
seqlens_k = P + S - 1 for every batch entry) and adds the bias elsewhere. So the bias is *evaluated* (onnxruntime,
on its own cone of the graph) for several past/sequence lengths, with an all-ones and a left-padded
attention_mask, and must mask every key after the query's position (at or below -1e4: exp underflows to zero).
Layers that compute the same mask (torch writes Where(mask, 0, -inf) once per layer) share one, checked once.

RoPE goes inside (do_rotary=1, the RotaryEmbedding's cos/sin caches, and its positions -- the graph's own
position_ids, whatever they are -- as GroupQueryAttention's position_ids input) when the two RotaryEmbedding
nodes share positions and caches, rotate whole heads, and a probe of the installed onnxruntime (GroupQueryAttention
rotating by position_ids against RotaryEmbedding + GroupQueryAttention without rotation, random positions)
agrees; otherwise the RotaryEmbedding nodes stay before it, on the [B, S, N*D] view. q, k, v are read as the
projections computed them ([B, S, N*D]) and the graph's [B, S, H*D] attention output is GroupQueryAttention's,
where the reshapes between are proven views (`_Dims`: their shape tensors read as dimensions of known values);
otherwise reshapes to and from [B, S, N*D] are written. Kv heads are not expanded any more
(GroupQueryAttention reads head h from kv head h // (H / Hkv), as HF's repeat_kv does).

One difference is allowed and stated: a query row whose keys are all masked (a left-padding position) gives
NaN in the original before its Where(IsNaN) turns it to zero; the bias is clamped to the dtype's lowest finite
value so that GroupQueryAttention gives a finite average there instead. Such rows are padding: no real
position reads them (their keys are masked by the same attention_mask at every later step).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from posrewrite.graph_check import check_graph
from posrewrite.passes.onnx._build import NodeWriter
from posrewrite.passes.onnx._graph import concrete_dims

_MASKED = -1.0e4
_CONTRIB = "com.microsoft"
_I64 = ir.DataType.INT64
_I32 = ir.DataType.INT32


@dataclasses.dataclass
class _Attention:
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


def fuse_cache_attention(model: ir.Model) -> tuple[int, list[str], str]:
    """Rewrites every recognised attention with a KV cache into GroupQueryAttention. Returns (count, reasons
    for the attentions left as they are, what the fused attentions hold: where their rotation is)."""
    graph = model.graph
    found: list[_Attention] = []
    reasons: list[str] = []
    for node in [n for n in graph if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]:
        try:
            found.append(_match(graph, node))
        except NotFused as exc:
            reasons.append(f"{node.name or 'Softmax'}: {exc}")
    if not found:
        return 0, reasons, ""
    biases: list[ir.Value] = []  # one mask for every layer that computes the same one (checked and clamped once)
    for att in found:
        if att.bias is not None:
            att.bias = next((b for b in biases if _same_computation(b, att.bias)), att.bias)
            if not any(b is att.bias for b in biases):
                biases.append(att.bias)
    verdicts: dict[int, str | None] = {}
    kept = []
    for att in found:
        if att.bias is not None:
            key = id(att.bias)
            if key not in verdicts:
                verdicts[key] = _bias_is_at_least_causal(model, att.bias)
            if verdicts[key] is not None:
                reasons.append(f"{att.softmax.name or 'Softmax'}: attention bias {att.bias.name}: {verdicts[key]}")
                continue
        kept.append(att)
    shared: dict = {}
    heads_views = [v for att in kept for v in (att.q_rot.inputs[0], att.k_rot.inputs[0], att.v_new)]
    outside: dict[str, int] = {}
    copies = 0
    for att in kept:
        why, views = _rewrite(model, att, shared)
        if why is not None:
            outside[why] = outside.get(why, 0) + 1
        copies += not views
    if kept:
        from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

        RemoveUnusedNodesPass()(model)
        _shape_without_concat(graph)
        _shape_before_rotation(graph)
        RemoveUnusedNodesPass()(model)  # the rotations read only for their shapes: gone, so are their uses
        for v in heads_views:  # [B, H, S, D] transposes now read only for their shapes: read the shape before them
            if v is not None and v.producer() is not None and v.producer().graph is graph:
                _shape_through_transpose(graph, v)
        RemoveUnusedNodesPass()(model)
        check_graph(model, "the KV-cache GroupQueryAttention rewrite (fuse_cache_attention)")
        TopologicalSortPass()(model)
    inside = len(kept) - sum(outside.values())
    parts = [f"RoPE inside {inside} (do_rotary=1, cos/sin caches and the graph's position_ids)"] if inside else []
    parts += [f"RotaryEmbedding before {n}: {why}" for why, n in outside.items()]
    if copies:
        parts.append(f"head reshapes/transposes kept around {copies} (not proven views of the projections)")
    return len(kept), reasons, "; ".join(parts)


# ---------------------------------------------------------------------------------------------------
# matching
# ---------------------------------------------------------------------------------------------------


def _producer(v: ir.Value | None, *ops: str) -> ir.Node | None:
    node = v.producer() if v is not None else None
    if node is None or node.op_type not in ops or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _scalar(v: ir.Value | None) -> float | None:
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
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
        node = _producer(v, "Mul", "Div")
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


def _rotary(v: ir.Value) -> ir.Node | None:
    node = v.producer()
    if node is None or node.op_type != "RotaryEmbedding" or node.domain != _CONTRIB:
        return None
    return node


def _unrepeat(v: ir.Value) -> ir.Value:
    """x when v = Reshape(Expand(Unsqueeze(x, axis 2), [B, Hkv, G, T, D]), [B, Hkv*G, T, D]) (HF's repeat_kv)."""
    reshape = _producer(v, "Reshape")
    expand = _producer(reshape.inputs[0], "Expand") if reshape is not None else None
    unsq = _producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
    if unsq is None:
        return v
    axes = unsq.attributes.get_ints("axes") if len(unsq.inputs) < 2 else None
    if axes is None and len(unsq.inputs) > 1:
        t = ir.convenience.get_const_tensor(unsq.inputs[1])
        axes = [int(a) for a in t.numpy().reshape(-1)] if t is not None else None
    if axes is None or list(axes) != [2]:
        return v
    return unsq.inputs[0]


def _cache_concat(graph: ir.Graph, v: ir.Value) -> tuple[ir.Value, ir.Value]:
    """v = Concat(past (a graph input), new, axis=2) -> (past, new)."""
    node = _producer(v, "Concat")
    if node is None or len(node.inputs) != 2:
        raise NotFused(f"{v.name} is not Concat(past, new): no KV cache input")
    axis = node.attributes.get_int("axis", 0)
    if axis not in (2, -2):
        raise NotFused(f"the cache concatenation {node.name} is on axis {axis}, not the sequence axis 2")
    past, new = node.inputs
    for _ in range(4):  # Identity, or a one-input Concat (the torchscript exporter writes one for layer 0)
        p = _producer(past, "Identity", "Concat")
        if p is None or len(p.inputs) != 1:
            break
        past = p.inputs[0]
    if past not in graph.inputs:
        raise NotFused(f"the cache concatenation {node.name} does not read a graph input first")
    if past.shape is None or len(past.shape) != 4:
        raise NotFused(f"past cache {past.name} is not 4-D [batch, kv_heads, past, head_size]")
    return past, new


def _match(graph: ir.Graph, sm: ir.Node) -> _Attention:
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
        isnan = _producer(where.inputs[0], "IsNaN")
        zero = ir.convenience.get_const_tensor(where.inputs[1])
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
    add = _producer(x, "Add")
    scores = x
    if add is not None:
        for i in (0, 1):
            s, _ = _strip_scale(add.inputs[i])
            if _producer(s, "MatMul") is not None:
                scores, bias = add.inputs[i], add.inputs[1 - i]
                break
        else:
            raise NotFused("no q @ k^T under the Softmax's Add")
    s, scale = _strip_scale(scores)
    qk = _producer(s, "MatMul")
    if qk is None:
        raise NotFused("no q @ k^T under the Softmax")
    q, a = _strip_scale(qk.inputs[0])
    kt, b = _strip_scale(qk.inputs[1])
    scale *= a * b
    transpose = _producer(kt, "Transpose")
    if transpose is None or list(transpose.attributes.get_ints("perm", [])) != [0, 1, 3, 2]:
        raise NotFused("k^T is not Transpose(k, perm=[0, 1, 3, 2])")
    k_rep, b2 = _strip_scale(transpose.inputs[0])
    scale *= b2
    q_rot = _rotary(q)
    if q_rot is None:
        raise NotFused("q is not the output of a fused com.microsoft.RotaryEmbedding")
    k_all = _unrepeat(k_rep)
    v_all = _unrepeat(pv.inputs[1])
    past_key, k_new = _cache_concat(graph, k_all)
    past_value, v_new = _cache_concat(graph, v_all)
    k_rot = _rotary(k_new)
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
    return _Attention(sm, q_rot, k_rot, k_all, v_all, past_key, past_value, v_new, bias, scale, pv.outputs[0],
                      heads, kv_heads, head_size, k_rep, pv.inputs[1])


def _heads(q_rot: ir.Node, k_rep: ir.Value, head_size: int) -> int | None:
    for shape in (q_rot.inputs[0].shape, q_rot.outputs[0].shape, k_rep.shape):
        if shape is not None and len(shape) == 4 and isinstance(shape[1], int):
            return shape[1]
    if "num_heads" in q_rot.attributes:
        return q_rot.attributes.get_int("num_heads")
    # [B, S, H, D] -> Transpose -> q_heads, after a MatMul with a [hidden, H*D] weight (shape only, never read)
    node = _producer(q_rot.inputs[0], "Transpose")
    reshape = _producer(node.inputs[0], "Reshape") if node is not None else None
    mm = _producer(reshape.inputs[0], "MatMul", "Add") if reshape is not None else None
    while mm is not None and mm.op_type == "Add":  # projection bias
        mm = _producer(mm.inputs[0], "MatMul", "Add")
    if mm is not None:
        w = mm.inputs[1]
        if w.shape is not None and len(w.shape) == 2 and isinstance(w.shape[1], int) and w.shape[1] % head_size == 0:
            return w.shape[1] // head_size
    return None


# ---------------------------------------------------------------------------------------------------
# the bias must mask every key after the query's position
# ---------------------------------------------------------------------------------------------------


def _bias_is_at_least_causal(model: ir.Model, bias: ir.Value) -> str | None:
    """None when, evaluated for several (past, seq) and attention masks, the bias [B|1, 1|H, S, P+S] masks
    every key j > P + i for query i; else why not."""
    graph = model.graph
    inputs = set(graph.inputs)
    cone: list[ir.Node] = []
    needed: list[ir.Value] = []
    shape_only: list[ir.Value] = []  # read only through Shape: fed as zeros of their shape, never computed
    seen: set[int] = set()
    stack = [bias]
    while stack:
        v = stack.pop()
        node = v.producer()
        if node is None:
            if v in inputs and v not in needed:
                needed.append(v)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        cone.append(node)
        if node.domain not in ("", "ai.onnx") or any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()
        ):
            return f"computed by {node.domain}::{node.op_type}"
        if node.op_type == "Shape" and node.inputs[0] not in inputs:
            if node.inputs[0] not in shape_only:
                shape_only.append(node.inputs[0])
            continue
        stack.extend(i for i in node.inputs if i is not None)
        if len(cone) > 5000:
            return "its computation is too large to check"
    # a value also computed in the cone (read by something other than a Shape) is computed, not fed
    shape_only = [v for v in shape_only if v.producer() is None or id(v.producer()) not in seen]
    if any(not v.name for v in shape_only):
        return "reads the shape of an unnamed value"
    dims = _dims_of_inputs(graph)
    needed.extend(shape_only)
    order = {id(n): k for k, n in enumerate(graph)}
    cone.sort(key=lambda n: order.get(id(n), 0))
    try:
        session = _session(model, cone, needed, bias)
    except Exception as exc:  # noqa: BLE001
        return f"could not be evaluated ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    for past, seq in ((0, 5), (4, 3), (7, 1)):
        total = past + seq
        for padded in (False, True):
            mask = np.ones((2, total), np.int64)
            if padded:
                mask[0, : min(2, total - 1)] = 0
            feeds = {}
            sizes = {k: {"batch": 2, "seq": seq, "past": past, "total": total}[role] for k, role in dims.items()}
            for v in needed:
                feed = _zeros_of_shape(v, sizes) if v in shape_only else _feed(v, past, seq, mask)
                if feed is None:
                    return (f"depends on the shape of {v.name} {v.shape}, not tied to the inputs' dimensions"
                            if v in shape_only else f"depends on input {v.name}, which this check cannot feed")
                feeds[v.name] = feed
            try:
                value = np.asarray(session.run(None, feeds)[0], dtype=np.float32)
            except Exception as exc:  # noqa: BLE001
                return f"could not be evaluated ({type(exc).__name__})"
            if value.ndim != 4 or value.shape[2] != seq or value.shape[3] != total or value.shape[0] not in (1, 2):
                return f"has shape {value.shape} for {seq} new and {total} total tokens (want [B, 1|H, S, T])"
            i, j = np.indices((seq, total))
            future = j > past + i
            if not np.all(value[:, :, future] <= _MASKED):
                return f"does not mask future keys (past {past}, {seq} new tokens): not causal"
    return None


def _dims_of_inputs(graph: ir.Graph) -> dict[str, str]:
    """Symbolic dimension name -> role (batch, seq, past, total), from the inputs of Optimum's layout."""
    roles: dict[str, str] = {}
    for v in graph.inputs:
        name, shape = (v.name or "").lower(), v.shape
        if shape is None:
            continue
        dims = [str(d) if not isinstance(d, int) else None for d in shape]
        if name in ("input_ids", "position_ids") and len(dims) == 2:
            pairs = zip(dims, ("batch", "seq"), strict=True)
        elif name == "attention_mask" and len(dims) == 2:
            pairs = zip(dims, ("batch", "total"), strict=True)
        elif "past" in name and len(dims) == 4:
            pairs = ((dims[0], "batch"), (dims[2], "past"))
        else:
            continue
        for d, role in pairs:
            if d is not None:
                roles.setdefault(d, role)
    return roles


def _zeros_of_shape(v: ir.Value, sizes: dict[str, int]) -> np.ndarray | None:
    if v.shape is None or v.dtype is None:
        return None
    dims = concrete_dims(v.shape, sizes)
    return None if dims is None else np.zeros(dims, dtype=v.dtype.numpy())


def _feed(v: ir.Value, past: int, seq: int, mask: np.ndarray) -> np.ndarray | None:
    name = (v.name or "").lower()
    dtype = v.dtype.numpy() if v.dtype is not None else np.float32
    if name == "attention_mask":
        return mask.astype(dtype)
    if name == "input_ids":
        return np.ones((2, seq), dtype)
    if name == "position_ids":
        return np.broadcast_to(np.arange(past, past + seq), (2, seq)).astype(dtype)
    if "past" in name and v.shape is not None and len(v.shape) == 4:
        dims = [d if isinstance(d, int) else 0 for d in v.shape]
        return np.zeros((2, dims[1], past, dims[3]), dtype)
    return None


def _session(model: ir.Model, cone: list[ir.Node], needed: list[ir.Value], target: ir.Value):
    import onnxruntime as ort

    names: dict[int, str] = {}
    initializers = []

    def name_of(v: ir.Value | None) -> str:
        if v is None:
            return ""
        if id(v) not in names:
            names[id(v)] = v.name if v in needed else f"v{len(names)}"
            if v.producer() is None and v not in needed:
                t = ir.convenience.get_const_tensor(v)
                if t is None:
                    raise ValueError(f"{v.name} has no value")
                if t.size > 1 << 20:
                    raise ValueError("reads a large tensor")
                initializers.append(onnx.numpy_helper.from_array(np.asarray(t.numpy()), names[id(v)]))
        return names[id(v)]

    protos = []
    for node in cone:
        proto = ir.serde.serialize_node(node)
        del proto.input[:]
        proto.input.extend(name_of(i) for i in node.inputs)
        del proto.output[:]
        proto.output.extend(name_of(o) for o in node.outputs)
        proto.name = f"n{len(protos)}"
        protos.append(proto)
    ins = [onnx.helper.make_tensor_value_info(v.name, int(v.dtype), None) for v in needed]
    out = onnx.helper.make_empty_tensor_value_info(name_of(target))
    g = onnx.helper.make_graph(protos, "bias", ins, [out], initializer=initializers)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(g, opset_imports=opsets)
    proto.ir_version = model.ir_version or 10
    so = ort.SessionOptions()
    so.log_severity_level = 4
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------------
# layouts: which reshapes around the attention are views of GroupQueryAttention's [B, S, N*D] inputs / output
# ---------------------------------------------------------------------------------------------------


class _Dims:
    """Dimensions known equal by construction (a Transpose moves them, a MatMul with a 2-D weight keeps the
    leading ones, a rotation keeps all, the attention output has the query's batch and rows, a reshape proven
    to be a view keeps the ones it copies), so that shape tensors built from Shape/Gather/Concat can be read as
    "dimension k of value v"."""

    def __init__(self, att: _Attention) -> None:
        self.att = att
        self.kept: dict[int, tuple[ir.Value, dict[int, int]]] = {}  # reshape output -> (its input, dims it keeps)

    def _next(self, v: ir.Value, i: int) -> tuple[ir.Value, int] | None:
        """One step towards where dimension i of v comes from, or None."""
        if v is self.att.out and i in (0, 2):
            return self.att.q_rot.inputs[0], i
        if id(v) in self.kept and i in self.kept[id(v)][1]:
            return self.kept[id(v)][0], self.kept[id(v)][1][i]
        node = v.producer()
        if node is None:
            return None
        if node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
            perm = list(node.attributes.get_ints("perm", []))
            return (node.inputs[0], perm[i]) if perm and i < len(perm) else None
        if node.op_type == "RotaryEmbedding" and node.domain == _CONTRIB:
            return node.inputs[0], i
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            a, b = node.inputs[0], node.inputs[1]
            if a.shape is not None and b.shape is not None and len(b.shape) == 2 and i < len(a.shape) - 1:
                return a, i
        return None

    def root(self, v: ir.Value, i: int) -> tuple[ir.Value, int]:
        for _ in range(64):
            step = self._next(v, i)
            if step is None:
                break
            v, i = step
        return v, i

    def static(self, v: ir.Value, i: int) -> int | None:
        att = self.att
        known = {id(att.out): (att.heads, att.head_size), id(att.q_rot.inputs[0]): (att.heads, att.head_size),
                 id(att.k_rot.inputs[0]): (att.kv_heads, att.head_size)}
        for _ in range(64):
            if v.shape is not None and i < len(v.shape) and isinstance(v.shape[i], int):
                return v.shape[i]
            if id(v) in known and i in (1, 3):
                return known[id(v)][i // 2]
            step = self._next(v, i)
            if step is None:
                return None
            v, i = step
        return None

    def same(self, elem: int | tuple[ir.Value, int] | None, v: ir.Value, i: int) -> bool:
        """elem (an int, or dimension k of a value) is dimension i of v."""
        if elem is None:
            return False
        if isinstance(elem, int):
            return elem == self.static(v, i)
        if self.root(*elem) == self.root(v, i):  # tuples of (value, index): values compared by identity
            return True
        a, b = self.static(*elem), self.static(v, i)
        return a is not None and a == b


def _elements(v: ir.Value | None, depth: int = 0) -> list | None:
    """The elements of a small int64 shape tensor: ints, (value, k) for "dimension k of value", None unknown.
    None when the tensor's form is not one of Constant, Shape, Gather, Concat, Unsqueeze, Squeeze, Slice, Cast."""
    if v is None or depth > 16:
        return None
    t = ir.convenience.get_const_tensor(v)
    if t is not None:
        arr = np.asarray(t.numpy())
        if arr.ndim > 1 or arr.size > 8 or arr.dtype.kind not in "iu":
            return None
        return [int(x) for x in arr.reshape(-1)]
    node = v.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op == "Shape":
        x = node.inputs[0]
        if x.shape is None:
            return None
        rank = len(x.shape)
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", rank)
        start, end = (max(0, min(rank, k + rank if k < 0 else k)) for k in (start, end))
        return [(x, k) for k in range(start, end)]
    if op in ("Unsqueeze", "Squeeze", "Cast"):
        return _elements(node.inputs[0], depth + 1)
    if op == "Concat":
        out: list = []
        for i in node.inputs:
            part = _elements(i, depth + 1)
            if part is None:
                return None
            out.extend(part)
        return out
    if op == "Gather":
        data, idx = _elements(node.inputs[0], depth + 1), ir.convenience.get_const_tensor(node.inputs[1])
        if data is None or idx is None or node.attributes.get_int("axis", 0) != 0:
            return None
        picks = [int(k) for k in np.asarray(idx.numpy()).reshape(-1)]
        if any(not -len(data) <= k < len(data) for k in picks):
            return None
        return [data[k] for k in picks]
    if op == "Slice":
        data = _elements(node.inputs[0], depth + 1)
        bounds = [ir.convenience.get_const_tensor(i) if i is not None else None for i in node.inputs[1:]]
        if data is None or len(bounds) < 2 or bounds[0] is None or bounds[1] is None:
            return None
        if len(bounds) > 2 and bounds[2] is not None and [int(a) for a in bounds[2].numpy().reshape(-1)] != [0]:
            return None
        if len(bounds) > 3 and bounds[3] is not None and [int(a) for a in bounds[3].numpy().reshape(-1)] != [1]:
            return None
        start, end = (int(np.asarray(b.numpy()).reshape(-1)[0]) for b in bounds[:2])
        return data[slice(start, end)]
    return None


def _reshape_keeps(dims: _Dims, node: ir.Node, wanted: list) -> bool:
    """Reshape `node` gives a tensor whose dimension k is wanted[k]: (value, i) for "dimension i of value",
    an int for a static size; its target's 0 (copy) must copy a wanted dimension, one -1 is allowed when every
    other dimension is proven (then it is the remaining one)."""
    if node.attributes.get_int("allowzero", 0):
        return False
    x = node.inputs[0]
    target = _elements(node.inputs[1])
    if target is None or len(target) != len(wanted):
        return False
    unknown = 0
    for k, (e, want) in enumerate(zip(target, wanted, strict=True)):
        if e == -1:
            unknown += 1
            continue
        if e == 0:  # copies the input's dimension k
            ok = isinstance(want, tuple) and x.shape is not None and k < len(x.shape) and dims.same((x, k), *want)
        elif isinstance(want, int):
            ok = isinstance(e, int) and e == want or isinstance(e, tuple) and dims.static(*e) == want
        else:
            ok = dims.same(e, *want)
        if not ok:
            return False
    return unknown <= 1


def _flat_projection(dims: _Dims, heads_view: ir.Value, n: int) -> ir.Value | None:
    """x [B, S, n*D] when heads_view [B, n, S, D] = Transpose(Reshape(x, [B, S, n, D]), 0213) with the
    reshape proven to keep x's first two dimensions: GroupQueryAttention's input, no copy and no reshape."""
    d = dims.att.head_size
    t = _producer(heads_view, "Transpose")
    if t is None or list(t.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    r = _producer(t.inputs[0], "Reshape")
    if r is None:
        return None
    x = r.inputs[0]
    if x.shape is None or len(x.shape) != 3 or x.shape[2] != n * d:
        return None
    if not _reshape_keeps(dims, r, [(x, 0), (x, 1), n, d]):
        return None
    dims.kept[id(r.outputs[0])] = (x, {0: 0, 1: 1})
    return x


def _flat_output(dims: _Dims) -> tuple[ir.Value, list[ir.Node]] | None:
    """The value the graph computes as the attention output in [B, S, H*D] (what GroupQueryAttention returns),
    with the nodes between: out [B, H, S, D] -> (Reshape to the same shape) -> Transpose(0213) -> Reshape to
    [B, S, H*D]; each reshape proven by its shape tensor. None when the graph's form is another."""
    att = dims.att
    h, d = att.heads, att.head_size
    v, chain = att.out, []
    users = [u.node for u in v.uses() if u.node.op_type != "Shape"]
    if len(users) == 1 and users[0].op_type == "Reshape" and users[0].inputs[0] is v:
        r = users[0]
        if not _reshape_keeps(dims, r, [(v, 0), h, (v, 2), d]):
            return None
        chain.append(r)
        v = r.outputs[0]
        users = [u.node for u in v.uses() if u.node.op_type != "Shape"]
    if len(users) != 1 or users[0].op_type != "Transpose" or list(users[0].attributes.get_ints("perm", [])) != [
            0, 2, 1, 3]:
        return None
    chain.append(users[0])
    v = users[0].outputs[0]
    users = [u.node for u in v.uses() if u.node.op_type != "Shape"]
    if len(users) != 1 or users[0].op_type != "Reshape" or users[0].inputs[0] is not v:
        return None
    if not _reshape_keeps(dims, users[0], [(att.out, 0), (att.out, 2), h * d]):
        return None
    chain.append(users[0])
    return users[0].outputs[0], chain


# ---------------------------------------------------------------------------------------------------
# rewriting
# ---------------------------------------------------------------------------------------------------


def _bsd(w: NodeWriter, x: ir.Value) -> ir.Value:
    """[B, S, N*D] view of x [B, N, S, D]: from before its Transpose when there is one (no copy)."""
    t = _producer(x, "Transpose")
    if t is not None and list(t.attributes.get_ints("perm", [])) == [0, 2, 1, 3]:
        src = t.inputs[0]
    else:
        src = w.op("Transpose", x, perm=[0, 2, 1, 3])
    return w.op("Reshape", src, w.const(np.array([0, 0, -1], np.int64)))


def _rotary_3d(w: NodeWriter, node: ir.Node, x3: ir.Value, heads: int) -> ir.Value:
    attrs = {k: a.value for k, a in node.attributes.items()}
    attrs["num_heads"] = heads
    name = (node.name or "rope") + "_bsd"
    rot = ir.node("RotaryEmbedding", [x3, *node.inputs[1:]], attrs, domain=_CONTRIB, name=name)
    rot.outputs[0].name = rot.name + "_out"
    w.nodes.append(rot)
    return rot.outputs[0]


def _shared_lengths(w: NodeWriter, att: _Attention, q3: ir.Value, shared: dict
                    ) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(seqlens_k [B] int32 = P+S-1 for every entry, total_sequence_length scalar int32 = P+S,
    query_seqlens [B] int32 = S: every new token is valid, which lets batches of several new tokens after a past
    through onnxruntime's CPU kernel)."""
    if "lengths" in shared:  # every layer's past has the same length: computed once, from the first layer
        return shared["lengths"]
    past = w.op("Shape", att.past_key, start=2, end=3)
    seq = w.op("Shape", q3, start=1, end=2)
    total = w.op("Add", past, seq)
    total32 = w.op("Cast", w.op("Reshape", total, w.const(np.array([], np.int64))), to=_I32)
    batch = w.op("Shape", q3, start=0, end=1)
    seqlens = w.op("Cast", w.op("Expand", w.op("Sub", total, w.const(np.array([1], np.int64))), batch), to=_I32)
    query_seqlens = w.op("Cast", w.op("Expand", seq, batch), to=_I32)
    shared["lengths"] = (seqlens, total32, query_seqlens)
    return shared["lengths"]


def _clamped_bias(w: NodeWriter, bias: ir.Value, shared: dict) -> ir.Value:
    if id(bias) not in shared:
        dtype = bias.dtype or ir.DataType.FLOAT
        lowest = np.finfo(np.float16 if dtype == ir.DataType.FLOAT16 else np.float32).min
        where = _producer(bias, "Where")
        branches = [ir.convenience.get_const_tensor(i) for i in where.inputs[1:]] if where is not None else [None]
        if dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) and all(
                t is not None and t.size <= 16 for t in branches):
            # Where(mask, a, b) with constant a, b (torch's bool mask -> 0 / -inf): clamp the constants instead
            clamped = [w.const(np.maximum(np.asarray(t.numpy(), np.float32), lowest), dtype=dtype) for t in branches]
            shared[id(bias)] = w.op("Where", where.inputs[0], *clamped)
        else:
            low = w.const(np.array(lowest, dtype=np.float32), dtype=dtype if dtype != ir.DataType.BFLOAT16 else None)
            if dtype == ir.DataType.BFLOAT16:
                low = w.op("Cast", low, to=dtype)
            shared[id(bias)] = w.op("Max", bias, low)
        shared[id(bias)].dtype = dtype
        shared[id(bias)].shape = bias.shape
    return shared[id(bias)]


def _same_computation(a: ir.Value, b: ir.Value) -> bool:
    """a and b are computed by the same op from the same values (or equal small constants): every layer's
    copy of the mask (torch's export writes Where(mask, 0, -inf) once per layer)."""
    if a is b:
        return True
    na, nb = a.producer(), b.producer()
    if na is None or na.op_type.startswith(("Random", "Multinomial", "Bernoulli", "Dropout")):
        return False  # not a function of its inputs
    if nb is None or (na.op_type, na.domain, len(na.inputs), len(na.outputs)) != (
            nb.op_type, nb.domain, len(nb.inputs), len(nb.outputs)) or na.outputs.index(a) != nb.outputs.index(b):
        return False
    if {k: v.value for k, v in na.attributes.items() if v.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        } != {k: v.value for k, v in nb.attributes.items()} or any(
            v.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for v in na.attributes.values()):
        return False
    for x, y in zip(na.inputs, nb.inputs, strict=True):
        if x is y:
            continue
        tx = ir.convenience.get_const_tensor(x) if x is not None else None
        ty = ir.convenience.get_const_tensor(y) if y is not None else None
        if tx is None or ty is None or tx.size > 64 or ty.size > 64 or tx.dtype != ty.dtype:
            return False
        ax, ay = np.asarray(tx.numpy()), np.asarray(ty.numpy())
        if ax.shape != ay.shape or not np.array_equal(ax, ay, equal_nan=True):
            return False
    return True


def _rewrite(model: ir.Model, att: _Attention, shared: dict) -> tuple[str | None, bool]:
    """Writes the GroupQueryAttention of `att`; returns why its rotation stays outside it (None: inside), and
    whether it reads the projections and gives o_proj its input directly (reshapes proven to be views)."""
    graph = model.graph
    anchor = att.softmax
    # everything it reads precedes the Softmax; the rotated values are recomputed from the projections
    w = NodeWriter(graph, anchor, "gqa")
    outside = _rotary_stays_outside(att, shared)
    attrs: dict = {"num_heads": att.heads, "kv_num_heads": att.kv_heads, "scale": float(att.scale)}
    # q, k, v as the projections computed them ([B, S, N*D]) where the graph's reshapes to heads are proven views
    dims = _Dims(att)
    flat = [_flat_projection(dims, x, n) for x, n in ((att.q_rot.inputs[0], att.heads),
                                                      (att.k_rot.inputs[0], att.kv_heads), (att.v_new, att.kv_heads))]
    q3, k3, v3 = (f if f is not None else _bsd(w, x)
                  for f, x in zip(flat, (att.q_rot.inputs[0], att.k_rot.inputs[0], att.v_new), strict=True))
    flat_out = _flat_output(dims)  # read before the graph changes: its shape tensors read the attention output
    if outside is None:  # GroupQueryAttention rotates q and k itself, by the same positions and caches
        positions, cos, sin = att.q_rot.inputs[1:4]
        attrs["do_rotary"] = 1
        attrs["rotary_interleaved"] = att.q_rot.attributes.get_int("interleaved", 0)
    else:
        q3 = _rotary_3d(w, att.q_rot, q3, att.heads)
        k3 = _rotary_3d(w, att.k_rot, k3, att.kv_heads)
        positions = cos = sin = None
    seqlens, total, query_seqlens = _shared_lengths(w, att, q3, shared)
    bias = _clamped_bias(w, att.bias, shared)
    gqa = ir.node(
        "GroupQueryAttention",
        [q3, k3, v3, att.past_key, att.past_value, seqlens, total, cos, sin, positions, bias, None, None, None,
         None, None, query_seqlens],
        attrs,
        domain=_CONTRIB,
        num_outputs=3,
        name=(att.softmax.name or "attention") + "_gqa",
    )
    for o, stem in zip(gqa.outputs, ("out", "present_key", "present_value"), strict=True):
        o.name = f"{gqa.name}_{stem}"
    dtype = att.out.dtype or att.q_rot.inputs[0].dtype
    qs = att.q_rot.inputs[0].shape
    batch, seq = (qs[0], qs[2]) if qs is not None and len(qs) == 4 else (None, None)
    for v, n in ((q3, att.heads), (k3, att.kv_heads), (v3, att.kv_heads)):
        if not any(v is f for f in flat):  # written here (the graph's own projections keep their shapes)
            v.dtype, v.shape = dtype, ir.Shape([batch, seq, n * att.head_size])
    gqa.outputs[0].dtype = dtype
    gqa.outputs[0].shape = ir.Shape([batch, seq, att.heads * att.head_size])
    for o, old in ((gqa.outputs[1], att.k_all), (gqa.outputs[2], att.v_all)):
        o.dtype = old.dtype
        o.shape = old.shape
    w.nodes.append(gqa)
    out4 = w.op("Reshape", gqa.outputs[0], w.const(np.array([0, 0, att.heads, att.head_size], np.int64)))
    out4.dtype, out4.shape = dtype, ir.Shape([batch, seq, att.heads, att.head_size])
    if flat_out is not None:  # the graph's [B, S, H*D] attention output is GroupQueryAttention's: read it
        w.commit()
        _replace(flat_out[0], gqa.outputs[0])
        for node in reversed(flat_out[1]):
            if not any(True for _ in node.outputs[0].uses()):
                graph.remove(node, safe=True)
    # the graph reads out [B, H, S, D], usually through Transpose(0, 2, 1, 3): give that Transpose's output directly
    users = list(att.out.uses())
    t = users[0].node if len(users) == 1 else None
    if (t is not None and t.op_type == "Transpose" and list(t.attributes.get_ints("perm", [])) == [0, 2, 1, 3]
            and not att.out.is_graph_output()):
        replaced, new = t.outputs[0], out4
    else:
        replaced, new = att.out, w.op("Transpose", out4, perm=[0, 2, 1, 3])
    if new is not out4:
        new.shape = replaced.shape or ir.Shape([batch, att.heads, seq, att.head_size])
    new.dtype = dtype
    w.commit()
    for rot in (att.q_rot, att.k_rot):  # shapes read from the rotated [B, H, S, D] tensors: the same as its input's
        for use in list(rot.outputs[0].uses()):
            if use.node.op_type == "Shape":
                use.node.replace_input_with(use.idx, rot.inputs[0])
    _replace(replaced, new)
    if new is not out4:
        # Transpose(Transpose(out4, 0213), 0213) is out4: the graph's transpose back to [B, S, H, D] reads out4
        for use in list(new.uses()):
            t2 = use.node
            if t2.op_type == "Transpose" and list(t2.attributes.get_ints("perm", [])) == [0, 2, 1, 3] \
                    and not t2.outputs[0].is_graph_output():
                ir.convenience.replace_all_uses_with(t2.outputs[0], out4)
                graph.remove(t2, safe=True)
        _shape_through_transpose(graph, new)
    # shapes read from the expanded keys/values: [B, H, T, D] from the cache's shape, so repeat_kv is not computed
    for rep, full in ((att.k_rep, att.k_all), (att.v_rep, att.v_all)):
        if rep is None or rep is full:
            continue
        for use in [u for u in rep.uses() if u.node.op_type == "Shape"]:
            shape_node = use.node
            w = NodeWriter(graph, shape_node, "gqa_shape")
            heads = w.const(np.array([att.heads], np.int64))
            full_shape = w.op("Concat", w.op("Shape", full, start=0, end=1), heads,
                              w.op("Shape", full, start=2, end=4), axis=0)
            start = shape_node.attributes.get_int("start", 0)
            end = shape_node.attributes.get_int("end", 4)
            if (start, end) != (0, 4):
                full_shape = w.op("Slice", full_shape, w.const(np.array([start], np.int64)),
                                  w.const(np.array([end], np.int64)))
            full_shape.dtype, full_shape.shape = _I64, shape_node.outputs[0].shape
            w.commit()
            _replace(shape_node.outputs[0], full_shape)
    # present keys/values are GroupQueryAttention's outputs -- for what follows it. What it reads itself (the
    # bias may read the key length: transformers' SDPA path slices the mask to Shape(keys)[-2]) keeps reading the
    # concatenation, which `_shape_without_concat` then reduces to the inputs' shapes.
    upstream = _ancestors(gqa)
    _replace(att.k_all, gqa.outputs[1], keep=upstream)
    _replace(att.v_all, gqa.outputs[2], keep=upstream)
    return outside, all(f is not None for f in flat) and flat_out is not None


# ---------------------------------------------------------------------------------------------------
# RoPE inside GroupQueryAttention
# ---------------------------------------------------------------------------------------------------


def _rotary_stays_outside(att: _Attention, shared: dict) -> str | None:
    """None when GroupQueryAttention's own rotation (do_rotary=1 with the q/k RotaryEmbedding's cos/sin caches
    and positions as its position_ids input) computes what the two RotaryEmbedding nodes do; else why not.
    The graph's form is checked here, the kernel's contract by `_rotary_probe` (an evaluation)."""
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
        shared[key] = _rotary_probe(*key[1:])
    return shared[key]


def _rotary_probe(heads: int, kv_heads: int, head_size: int, interleaved: int, dtype: ir.DataType) -> str | None:
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
                                                      *extra], ["o", "pk", "pv"], domain=_CONTRIB, do_rotary=1,
                               rotary_interleaved=interleaved, **attrs)]
        outside = [
            oh.make_node("RotaryEmbedding", ["q", "pos", "cos", "sin"], ["qr"], domain=_CONTRIB, num_heads=heads,
                         **rot),
            oh.make_node("RotaryEmbedding", ["k", "pos", "cos", "sin"], ["kr"], domain=_CONTRIB, num_heads=kv_heads,
                         **rot),
            oh.make_node("GroupQueryAttention", ["qr", "kr", "v", "past_k", "past_v", *tail, "", "", "", *extra],
                         ["o", "pk", "pv"], domain=_CONTRIB, **attrs),
        ]
        outs = [oh.make_tensor_value_info(n, elem, None) for n in ("o", "pk", "pv")]
        so = ort.SessionOptions()
        so.log_severity_level = 4
        sessions = []
        for nodes in (inside, outside):
            proto = oh.make_model(oh.make_graph(nodes, "probe", ins, outs),
                                  opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid(_CONTRIB, 1)])
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


def _shape_through_transpose(graph: ir.Graph, v: ir.Value) -> None:
    """Shape(Transpose(t, perm)) -> Gather(Shape(t), perm) when the Transpose is read only by Shape nodes, so
    that the transpose (a copy of q, k or v) is no longer computed."""
    t = _producer(v, "Transpose")
    users = [u.node for u in v.uses()]
    if t is None or not users or v.is_graph_output() or any(u.op_type != "Shape" for u in users):
        return
    perm = list(t.attributes.get_ints("perm", []))
    if not perm:
        return
    for shape_node in users:
        w = NodeWriter(graph, shape_node, "gqa_shape")
        full = w.op("Gather", w.op("Shape", t.inputs[0]), w.const(np.array(perm, np.int64)), axis=0)
        start = shape_node.attributes.get_int("start", 0)
        end = shape_node.attributes.get_int("end", len(perm))
        if (start, end) != (0, len(perm)):
            full = w.op("Slice", full, w.const(np.array([start], np.int64)), w.const(np.array([end], np.int64)))
        out = shape_node.outputs[0]
        full.dtype, full.shape = _I64, out.shape
        w.commit()
        _replace(out, full)


def _shape_before_rotation(graph: ir.Graph) -> None:
    """Shape(RotaryEmbedding(x, ...)) -> Shape(x) (a rotation keeps its input's shape), so that a rotation read
    only for its shape (the new keys' length, once the cache concatenation is reduced to shapes) is not computed."""
    for node in [n for n in graph if n.op_type == "Shape" and n.domain in ("", "ai.onnx")]:
        rot = _rotary(node.inputs[0])
        if rot is not None:
            node.replace_input_with(0, rot.inputs[0])


def _shape_without_concat(graph: ir.Graph) -> None:
    """Shape(Concat(past, new, axis)) -> the shape computed from the inputs' shapes, when the Concat of a cache
    input is read only for its shape (the export's total length): the concatenation (a copy of the whole
    cache) is no longer computed."""
    for node in [n for n in graph if n.op_type == "Concat" and n.domain in ("", "ai.onnx")]:
        out = node.outputs[0]
        users = [u.node for u in out.uses()]
        ranks = {len(i.shape) if i is not None and i.shape is not None else None for i in node.inputs}
        if (not users or out.is_graph_output() or any(u.op_type != "Shape" for u in users) or len(ranks) != 1
                or None in ranks or not any(i in graph.inputs for i in node.inputs)):
            continue
        if len(node.inputs) == 1:  # Concat([x]) is x
            ir.convenience.replace_all_uses_with(out, node.inputs[0])
            graph.remove(node, safe=True)
            continue
        rank = ranks.pop()
        axis = node.attributes.get_int("axis", 0)
        axis = axis + rank if axis < 0 else axis
        for shape_node in users:
            w = NodeWriter(graph, shape_node, "concat_shape")
            first = node.inputs[0]
            total = w.op("Shape", first, start=axis, end=axis + 1)
            for other in node.inputs[1:]:
                total = w.op("Add", total, w.op("Shape", other, start=axis, end=axis + 1))
            pieces = ([w.op("Shape", first, start=0, end=axis)] if axis > 0 else []) + [total]
            if axis + 1 < rank:
                pieces.append(w.op("Shape", first, start=axis + 1, end=rank))
            full = w.op("Concat", *pieces, axis=0) if len(pieces) > 1 else total
            start = shape_node.attributes.get_int("start", 0)
            end = shape_node.attributes.get_int("end", rank)
            if (start, end) != (0, rank):
                full = w.op("Slice", full, w.const(np.array([start], np.int64)), w.const(np.array([end], np.int64)))
            full.dtype, full.shape = _I64, shape_node.outputs[0].shape
            w.commit()
            _replace(shape_node.outputs[0], full)
        if not any(True for _ in out.uses()):
            graph.remove(node, safe=True)


def _ancestors(node: ir.Node) -> set[int]:
    """ids of the nodes `node` reads from, directly or not (within its graph and the enclosing ones)."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        for v in stack.pop().inputs:
            producer = v.producer() if v is not None else None
            if producer is not None and id(producer) not in seen:
                seen.add(id(producer))
                stack.append(producer)
    return seen


def _replace(old: ir.Value, new: ir.Value, *, keep: set[int] = frozenset()) -> None:
    """Every use of `old` reads `new` instead (and `new` takes its place among the graph outputs), except the
    uses by the nodes in `keep` (ids): the nodes `new`'s producer itself depends on, which would otherwise make
    a cycle."""
    if old.is_graph_output():
        name = old.name
        old.name = None
        new.name = name
    if not keep:
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        return
    for use in list(old.uses()):
        if id(use.node) not in keep:
            use.node.replace_input_with(use.idx, new)
    graph = old.graph if old.is_graph_output() else None
    if graph is not None:
        for k, out in enumerate(graph.outputs):
            if out is old:
                graph.outputs[k] = new
