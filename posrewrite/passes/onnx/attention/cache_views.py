"""Which reshapes around a KV-cache attention are views of GroupQueryAttention's [B, S, N*D] inputs and output:
shape tensors read as dimensions of known values (`Dims`), proven before the graph reads q, k, v from the
projections (`flat_projection`) and gives o_proj the attention output (`flat_output`) without a copy."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from posrewrite.passes.onnx._graph import const_tensor
from posrewrite.passes.onnx.attention.cache_match import CONTRIB, Attention, producer


class Dims:
    """Dimensions known equal by construction (a Transpose moves them, a MatMul with a 2-D weight keeps the
    leading ones, a rotation keeps all, the attention output has the query's batch and rows, a reshape proven
    to be a view keeps the ones it copies), so that shape tensors built from Shape/Gather/Concat can be read as
    "dimension k of value v"."""

    def __init__(self, att: Attention) -> None:
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
        if node.op_type == "RotaryEmbedding" and node.domain == CONTRIB:
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
    t = const_tensor(v)
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
        data, idx = _elements(node.inputs[0], depth + 1), const_tensor(node.inputs[1])
        if data is None or idx is None or node.attributes.get_int("axis", 0) != 0:
            return None
        picks = [int(k) for k in np.asarray(idx.numpy()).reshape(-1)]
        if any(not -len(data) <= k < len(data) for k in picks):
            return None
        return [data[k] for k in picks]
    if op == "Slice":
        data = _elements(node.inputs[0], depth + 1)
        bounds = [const_tensor(i) if i is not None else None for i in node.inputs[1:]]
        if data is None or len(bounds) < 2 or bounds[0] is None or bounds[1] is None:
            return None
        if len(bounds) > 2 and bounds[2] is not None and [int(a) for a in bounds[2].numpy().reshape(-1)] != [0]:
            return None
        if len(bounds) > 3 and bounds[3] is not None and [int(a) for a in bounds[3].numpy().reshape(-1)] != [1]:
            return None
        start, end = (int(np.asarray(b.numpy()).reshape(-1)[0]) for b in bounds[:2])
        return data[slice(start, end)]
    return None


def _reshape_keeps(dims: Dims, node: ir.Node, wanted: list) -> bool:
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


def flat_projection(dims: Dims, heads_view: ir.Value, n: int) -> ir.Value | None:
    """x [B, S, n*D] when heads_view [B, n, S, D] = Transpose(Reshape(x, [B, S, n, D]), 0213) with the
    reshape proven to keep x's first two dimensions: GroupQueryAttention's input, no copy and no reshape."""
    d = dims.att.head_size
    t = producer(heads_view, "Transpose")
    if t is None or list(t.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    r = producer(t.inputs[0], "Reshape")
    if r is None:
        return None
    x = r.inputs[0]
    if x.shape is None or len(x.shape) != 3 or x.shape[2] != n * d:
        return None
    if not _reshape_keeps(dims, r, [(x, 0), (x, 1), n, d]):
        return None
    dims.kept[id(r.outputs[0])] = (x, {0: 0, 1: 1})
    return x


def flat_output(dims: Dims) -> tuple[ir.Value, list[ir.Node]] | None:
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

