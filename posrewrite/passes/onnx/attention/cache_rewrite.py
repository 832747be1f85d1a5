"""One matched KV-cache attention written as com.microsoft.GroupQueryAttention (`rewrite_attention`), and
the shape reads that follow it reduced to the inputs' shapes, so that what the fused op replaced is no
longer computed (`shape_through_transpose`, `shape_before_rotation`, `shape_without_concat`)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from posrewrite.passes.onnx._build import NodeWriter
from posrewrite.passes.onnx._graph import const_tensor
from posrewrite.passes.onnx.attention import cache_probe, cache_views
from posrewrite.passes.onnx.attention.cache_match import CONTRIB, Attention, producer, rotary_node

_I64 = ir.DataType.INT64
_I32 = ir.DataType.INT32


def _bsd(w: NodeWriter, x: ir.Value) -> ir.Value:
    """[B, S, N*D] view of x [B, N, S, D]: from before its Transpose when there is one (no copy)."""
    t = producer(x, "Transpose")
    if t is not None and list(t.attributes.get_ints("perm", [])) == [0, 2, 1, 3]:
        src = t.inputs[0]
    else:
        src = w.op("Transpose", x, perm=[0, 2, 1, 3])
    return w.op("Reshape", src, w.const(np.array([0, 0, -1], np.int64)))


def _rotary_3d(w: NodeWriter, node: ir.Node, x3: ir.Value, heads: int) -> ir.Value:
    attrs = {k: a.value for k, a in node.attributes.items()}
    attrs["num_heads"] = heads
    return w.op("RotaryEmbedding", x3, *node.inputs[1:], _domain=CONTRIB, _name=(node.name or "rope") + "_bsd",
                **attrs)


def _shared_lengths(w: NodeWriter, att: Attention, q3: ir.Value, shared: dict
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
        where = producer(bias, "Where")
        branches = [const_tensor(i) for i in where.inputs[1:]] if where is not None else [None]
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


def rewrite_attention(model: ir.Model, att: Attention, shared: dict) -> tuple[str | None, bool]:
    """Writes the GroupQueryAttention of `att`; returns why its rotation stays outside it (None: inside), and
    whether it reads the projections and gives o_proj its input directly (reshapes proven to be views)."""
    graph = model.graph
    anchor = att.softmax
    # everything it reads precedes the Softmax; the rotated values are recomputed from the projections
    w = NodeWriter(graph, anchor, "gqa")
    outside = cache_probe.rotary_stays_outside(att, shared)
    attrs: dict = {"num_heads": att.heads, "kv_num_heads": att.kv_heads, "scale": float(att.scale)}
    # q, k, v as the projections computed them ([B, S, N*D]) where the graph's reshapes to heads are proven views
    dims = cache_views.Dims(att)
    flat = [cache_views.flat_projection(dims, x, n)
            for x, n in ((att.q_rot.inputs[0], att.heads), (att.k_rot.inputs[0], att.kv_heads),
                         (att.v_new, att.kv_heads))]
    q3, k3, v3 = (f if f is not None else _bsd(w, x)
                  for f, x in zip(flat, (att.q_rot.inputs[0], att.k_rot.inputs[0], att.v_new), strict=True))
    # read before the graph changes: its shape tensors read the attention output
    flat_out = cache_views.flat_output(dims)
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
    gqa = w.op_multi(
        "GroupQueryAttention", q3, k3, v3, att.past_key, att.past_value, seqlens, total, cos, sin, positions, bias,
        None, None, None, None, None, query_seqlens,
        _num_outputs=3, _domain=CONTRIB, _name=(att.softmax.name or "attention") + "_gqa", **attrs,
    )[0].producer()
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
        shape_through_transpose(graph, new)
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
    # concatenation, which `shape_without_concat` then reduces to the inputs' shapes.
    upstream = ancestors(gqa)
    _replace(att.k_all, gqa.outputs[1], keep=upstream)
    _replace(att.v_all, gqa.outputs[2], keep=upstream)
    return outside, all(f is not None for f in flat) and flat_out is not None



def shape_through_transpose(graph: ir.Graph, v: ir.Value) -> None:
    """Shape(Transpose(t, perm)) -> Gather(Shape(t), perm) when the Transpose is read only by Shape nodes, so
    that the transpose (a copy of q, k or v) is no longer computed."""
    t = producer(v, "Transpose")
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


def shape_before_rotation(graph: ir.Graph) -> None:
    """Shape(RotaryEmbedding(x, ...)) -> Shape(x) (a rotation keeps its input's shape), so that a rotation read
    only for its shape (the new keys' length, once the cache concatenation is reduced to shapes) is not computed."""
    for node in [n for n in graph if n.op_type == "Shape" and n.domain in ("", "ai.onnx")]:
        rot = rotary_node(node.inputs[0])
        if rot is not None:
            node.replace_input_with(0, rot.inputs[0])


def shape_without_concat(graph: ir.Graph) -> None:
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


def ancestors(node: ir.Node) -> set[int]:
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
